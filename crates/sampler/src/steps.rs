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
use ddpm_diffusion::steps::{condition_score, ddim_update};
use ddpm_diffusion::GaussianDiffusion;

use crate::error::Result;

/// guided-diffusion `condition_mean`, as the ancestral sampler applies it (re-exported so the
/// `guidance.json` cases can run through this crate).
pub use ddpm_diffusion::steps::condition_mean;

/// improved-diffusion `p_sample` (+ guided-diffusion `condition_mean`), the step the ancestral
/// sampler runs; the arithmetic is ddpm-diffusion's `ddpm_step`.
pub use ddpm_diffusion::steps::{ddpm_step as ancestral_step, DdpmStep as AncestralStep};

/// A classifier gradient and its scale (ddpm-diffusion's, shared by every guided step).
pub use ddpm_diffusion::steps::ScaledGrad;

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
    Ok(DdimResult {
        x_prev: s.x_prev,
        pred_xstart: s.pred_xstart,
        eps: s.eps,
        guided_mean,
        sigma: s.sigma,
    })
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

/// Which update [`fused_step`] performs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FusedUpdate {
    /// Ancestral step with the process's fixed variance.
    Ddpm,
    /// DDIM step with this eta.
    Ddim { eta: f64 },
}

/// The DDPM / DDIM update of [`ancestral_step`] / [`ddim_step`] (without guidance) through
/// ddpm-kernels' fused op: x0 from the model output, optional clipping, and the update with its noise
/// in one pass over memory. Only for fixed variances and f32 tensors; per-sample `t` index
/// `diffusion`'s own (possibly respaced) tables. Returns `(x_prev, pred_xstart)`.
pub fn fused_step(
    diffusion: &GaussianDiffusion,
    update: FusedUpdate,
    clip_denoised: bool,
    model_output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    noise: ddpm_kernels::StepNoise<'_>,
) -> Result<(Tensor, Tensor)> {
    use crate::error::SamplerError;
    use ddpm_diffusion::{ModelMeanType, ModelVarType};
    use ddpm_kernels::{Prediction, StepCoefs};
    let s = &diffusion.schedule;
    s.check_timesteps(t)?;
    if t.len() != x_t.dim(0)? {
        return Err(SamplerError::Config(format!(
            "{} timesteps for a batch of {}",
            t.len(),
            x_t.dim(0)?
        )));
    }
    let pred = match diffusion.mean_type {
        ModelMeanType::Epsilon => Prediction::Epsilon,
        ModelMeanType::V => Prediction::V,
        ModelMeanType::StartX => Prediction::StartX,
    };
    let coefs: Vec<StepCoefs> = t
        .iter()
        .map(|&k| {
            let (a, ap) = (s.alphas_cumprod[k], s.alphas_cumprod_prev[k]);
            match update {
                FusedUpdate::Ddim { eta } => Ok(StepCoefs::ddim(pred, a, ap, eta)),
                FusedUpdate::Ddpm => {
                    let log_var = match diffusion.var_type {
                        ModelVarType::FixedSmall => s.posterior_log_variance_clipped[k],
                        ModelVarType::FixedLarge => s.fixed_large_log_variance[k],
                        other => {
                            return Err(SamplerError::Config(format!(
                                "the fused update needs a fixed variance, not {other:?}"
                            )))
                        }
                    };
                    // improved-diffusion adds no noise at the last step (t == 0).
                    let sigma = if k == 0 { 0.0 } else { (0.5 * log_var).exp() };
                    Ok(StepCoefs::ddpm(pred, a, ap, sigma))
                }
            }
        })
        .collect::<Result<_>>()?;
    let clip = clip_denoised.then_some((-1.0f32, 1.0f32));
    let out = ddpm_kernels::fused_sampler_step(x_t, model_output, &coefs, clip, noise)?;
    Ok((out.x_prev, out.x0_pred))
}
