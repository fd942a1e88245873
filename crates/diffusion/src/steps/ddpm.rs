//! Ancestral DDPM step (improved-diffusion `p_sample`).

use candle_core::Tensor;

use super::guidance::{condition_mean, ScaledGrad};
use super::nonzero_mask;
use crate::error::Result;
use crate::gaussian_diffusion::{GaussianDiffusion, PMeanVariance};
use crate::tensor::{check_batch, same_shape};

/// The sample x_{t-1} and the quantities it was built from.
#[derive(Debug, Clone)]
pub struct DdpmStep {
    pub x_prev: Tensor,
    /// The mean actually used (shifted by classifier guidance when a gradient was given).
    pub mean: Tensor,
    pub out: PMeanVariance,
}

/// `x_prev = mean + (t != 0) * exp(0.5 * log_variance) * noise`.
pub fn ddpm_update(
    mean: &Tensor,
    log_variance: &Tensor,
    t: &[usize],
    noise: &Tensor,
) -> Result<Tensor> {
    same_shape(mean, "mean", noise, "noise")?;
    check_batch(t, mean, "mean")?;
    let std = log_variance.affine(0.5, 0.0)?.exp()?;
    let scaled = std
        .broadcast_mul(noise)?
        .broadcast_mul(&nonzero_mask(t, mean)?)?;
    Ok(mean.add(&scaled)?)
}

/// One ancestral step from the network output at x_t, with the variance type of `diffusion`
/// (improved-diffusion `p_sample`); with a classifier gradient, the mean is first shifted by
/// guided-diffusion's `condition_mean`. `t` indexes `diffusion`'s own (possibly respaced) steps;
/// `noise` is added where `t != 0`.
pub fn ddpm_step(
    diffusion: &GaussianDiffusion,
    model_output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    noise: &Tensor,
    clip_denoised: bool,
    guidance: Option<ScaledGrad<'_>>,
) -> Result<DdpmStep> {
    let out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised)?;
    let mean = match guidance {
        Some(g) => condition_mean(&out.mean, &out.variance, g.grad, g.scale)?,
        None => out.mean.clone(),
    };
    let x_prev = ddpm_update(&mean, &out.log_variance, t, noise)?;
    Ok(DdpmStep { x_prev, mean, out })
}
