//! One step of each sampler, as the sampling loops run it: the model output (after classifier-free
//! guidance) and the optional classifier gradient go in, the next sample comes out.
//!
//! The arithmetic is ddpm-diffusion's (`ddpm_step`, `ddim_update`, `condition_mean`,
//! `condition_score`), which the reference vectors check; these functions only choose which of those
//! to call and in which order, exactly as improved-diffusion's `p_sample` / `ddim_sample` and
//! guided-diffusion's `condition_mean` / `condition_score` do. They take the same inputs as the cases
//! of `ddpm_step.json`, `ddim_step.json` and `guidance.json`, so the conformance suite can run those
//! cases through this crate.

use candle_core::Tensor;
use ddpm_diffusion::steps::{condition_mean, condition_score, ddim_update, ddpm_update};
use ddpm_diffusion::{GaussianDiffusion, PMeanVariance};

use crate::error::Result;

/// A classifier gradient `grad_x log p(y | x_t)` and the guidance scale it is applied with.
#[derive(Debug, Clone, Copy)]
pub struct ScaledGrad<'a> {
    pub grad: &'a Tensor,
    pub scale: f64,
}

/// The result of an ancestral step.
#[derive(Debug, Clone)]
pub struct AncestralStep {
    pub x_prev: Tensor,
    /// The mean actually used (shifted by classifier guidance when a gradient was given).
    pub mean: Tensor,
    pub out: PMeanVariance,
}

/// improved-diffusion `p_sample` (+ guided-diffusion `condition_mean`): `t` indexes `diffusion`'s own
/// (possibly respaced) steps; `noise` is added where `t != 0`.
pub fn ancestral_step(
    diffusion: &GaussianDiffusion,
    model_output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    noise: &Tensor,
    clip_denoised: bool,
    guidance: Option<ScaledGrad<'_>>,
) -> Result<AncestralStep> {
    let out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised)?;
    let mean = match guidance {
        Some(g) => condition_mean(&out.mean, &out.variance, g.grad, g.scale)?,
        None => out.mean.clone(),
    };
    let x_prev = ddpm_update(&mean, &out.log_variance, t, noise)?;
    Ok(AncestralStep { x_prev, mean, out })
}

/// The result of a DDIM step.
#[derive(Debug, Clone)]
pub struct DdimResult {
    pub x_prev: Tensor,
    /// x0 used by the update (clipped, then shifted by classifier guidance if any).
    pub pred_xstart: Tensor,
    /// eps re-derived from `pred_xstart` (what the update uses).
    pub eps: Tensor,
    /// The posterior mean of the guided x0 (guided-diffusion's `condition_score` output); `None`
    /// without guidance.
    pub guided_mean: Option<Tensor>,
    /// Per-sample standard deviation of the added noise.
    pub sigma: Vec<f64>,
}

/// The two knobs of a DDIM step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimOptions {
    pub clip_denoised: bool,
    /// 0 = deterministic DDIM, 1 = the DDPM posterior variance.
    pub eta: f64,
}

/// improved-diffusion `ddim_sample` (+ guided-diffusion `condition_score`).
pub fn ddim_step(
    diffusion: &GaussianDiffusion,
    model_output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    opts: DdimOptions,
    noise: Option<&Tensor>,
    guidance: Option<ScaledGrad<'_>>,
) -> Result<DdimResult> {
    let out = diffusion.p_mean_variance(model_output, x_t, t, opts.clip_denoised)?;
    let (pred_xstart, guided_mean) = match guidance {
        Some(g) => {
            let cs = condition_score(diffusion, x_t, t, &out.pred_xstart, g.grad, g.scale)?;
            (cs.pred_xstart, Some(cs.mean))
        }
        None => (out.pred_xstart, None),
    };
    let s = ddim_update(diffusion, x_t, t, &pred_xstart, opts.eta, noise)?;
    Ok(DdimResult { x_prev: s.x_prev, pred_xstart: s.pred_xstart, eps: s.eps, guided_mean, sigma: s.sigma })
}

/// eps implied by the model output at original timestep(s) `t` of the *training* process `full`,
/// with classifier guidance (`condition_score`) applied when a gradient is given. The ODE samplers
/// (DPM-Solver++, Heun) work with eps whatever the model predicts.
pub fn guided_eps(
    full: &GaussianDiffusion,
    model_output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    guidance: Option<ScaledGrad<'_>>,
) -> Result<Tensor> {
    use ddpm_diffusion::ModelMeanType;
    let (mean_out, _) = full.split_model_output(model_output, x_t)?;
    let eps = match full.mean_type {
        ModelMeanType::Epsilon => mean_out,
        ModelMeanType::V => full.predict_eps_from_v(x_t, t, &mean_out)?,
        ModelMeanType::StartX => full.predict_eps_from_xstart(x_t, t, &mean_out)?,
    };
    match guidance {
        None => Ok(eps),
        Some(g) => {
            // guided-diffusion condition_score, through x0 and back as it does (the round trip
            // costs only rounding: ~3e-14 relative in f64).
            let x0 = full.predict_xstart_from_eps(x_t, t, &eps)?;
            Ok(condition_score(full, x_t, t, &x0, g.grad, g.scale)?.eps)
        }
    }
}
