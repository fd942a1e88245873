//! Sampler step math: pure functions from a model output and the current sample to the next sample.
//!
//! The sampler crate owns the loops, randomness and I/O; these functions only do the arithmetic so it can
//! be checked against the reference vectors. Noise is always passed in (drawn by the caller from
//! `ddpm-rng`), and coefficients are computed on the host in f64.

pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod edm;
pub mod guidance;
pub mod sde;

pub use ddim::{ddim_reverse_step, ddim_sigmas, ddim_step, ddim_update, DdimStep, DiffusersDdim};
pub use ddpm::{ddpm_step, ddpm_update, DdpmStep};
pub use dpm_solver::{linspace_timesteps, DpmSolverPp2m, DpmSolverStep};
pub use edm::{edm_churn, edm_euler, edm_heun, EdmChurn};
pub use guidance::{
    cfg_combine, cfg_combine_model_output, cfg_combine_scale, condition_mean, condition_score,
    ConditionScore, ScaledGrad,
};
pub use sde::{
    euler_maruyama_step, langevin_step, langevin_step_sizes, reverse_diffusion_step,
    score_from_eps, LangevinStep, SdeStep,
};

use candle_core::Tensor;

use crate::error::Result;
use crate::tensor::per_sample;

/// `[B, 1, .., 1]` mask that is 0 where `t == 0` and 1 elsewhere: the last reverse step adds no noise.
pub(crate) fn nonzero_mask(t: &[usize], like: &Tensor) -> Result<Tensor> {
    let m: Vec<f64> = t
        .iter()
        .map(|&ti| if ti == 0 { 0.0 } else { 1.0 })
        .collect();
    per_sample(&m, like)
}
