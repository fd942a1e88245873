//! Samplers and evaluation for ddpm-rs: DDPM (ancestral), DDIM, DPM-Solver++(2M), a Heun
//! probability-flow ODE sampler, the score-SDE samplers (reverse-SDE Euler-Maruyama,
//! predictor-corrector) and EDM's stochastic sampler over any [`Denoiser`], with class labels, classifier-free guidance and
//! classifier guidance; and the pieces of the `ddpm-sample` / `ddpm-eval` binaries (distributed
//! generation, image output, bits/dim, the classifier Frechet distance). Checkpoints are read with
//! `ddpm-checkpoint`, their config with `ddpm-config`.
//!
//! The step arithmetic lives in `ddpm-diffusion` (checked against reference vectors) and, for the
//! fused DDPM/DDIM update, `ddpm-kernels`; this crate owns the loops, the randomness (ddpm-rng
//! `Stream::Sampler`, keyed by seed, step and global image index) and the I/O.

/// A [`SamplerError::Usage`] from a format string (the commands' checks of their options).
macro_rules! usage {
    ($($t:tt)*) => { $crate::SamplerError::Usage(format!($($t)*)) };
}

macro_rules! bail_usage {
    ($($t:tt)*) => { return Err(usage!($($t)*)) };
}

pub mod bpd;
pub mod continuous;
pub mod continuous_cmd;
pub mod denoiser;
pub mod device;
pub mod error;
pub mod eval_cmd;
pub mod fid;
pub mod generate;
pub mod guidance;
pub mod images;
pub mod linalg;
pub mod sample_cmd;
pub mod sampler;
pub mod sde;
pub mod steps;

pub use ddpm_checkpoint::{Checkpoint, CheckpointError, Weights};
pub use ddpm_diffusion::steps::EdmChurn;
pub use denoiser::{Denoiser, EncoderClassifier, NoisyClassifier, UNetDenoiser};
pub use error::{Result, SamplerError};
pub use generate::{generate, GenerateJob, Generated, LabelPlan};
pub use guidance::{classifier_grad, guided_model_output, ClassifierGuidance, Guidance};
pub use sampler::{
    edm_churned_levels, heun_timesteps, respacing_for, BatchSpec, Progress, Sampler, SamplerKind,
    SamplerSettings,
};
pub use sde::{Predictor, ScoreSdeOptions};
pub use steps::{
    ancestral_step, ddim_step, fused_step, guided_eps, AncestralStep, DdimOptions, DdimResult,
    FusedUpdate, ScaledGrad,
};
