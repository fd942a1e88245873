//! Ancestral DDPM step (improved-diffusion `p_sample`).

use candle_core::Tensor;

use super::nonzero_mask;
use crate::error::Result;
use crate::gaussian_diffusion::{GaussianDiffusion, PMeanVariance};
use crate::tensor::{check_batch, same_shape};

/// The sample x_{t-1} and the quantities it was built from.
#[derive(Debug, Clone)]
pub struct DdpmStep {
    pub x_prev: Tensor,
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

/// One ancestral step from the network output at x_t, with the variance type of `diffusion`.
pub fn ddpm_step(
    diffusion: &GaussianDiffusion,
    model_output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    noise: &Tensor,
    clip_denoised: bool,
) -> Result<DdpmStep> {
    let out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised)?;
    let x_prev = ddpm_update(&out.mean, &out.log_variance, t, noise)?;
    Ok(DdpmStep { x_prev, out })
}
