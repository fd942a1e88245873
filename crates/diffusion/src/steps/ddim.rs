//! DDIM steps (Song et al. 2021), two conventions:
//!
//! * improved-diffusion `ddim_sample` on a (respaced) [`GaussianDiffusion`]: eps is re-derived from the
//!   (possibly clipped) x0 before stepping, so clipping keeps the trajectory consistent.
//! * diffusers `DDIMScheduler` ([`DiffusersDdim`]): the model's eps is used as is, even after clipping x0
//!   (diffusers' default `use_clipped_model_output=False`).

use candle_core::Tensor;

use super::nonzero_mask;
use crate::error::{DiffusionError, Result};
use crate::gaussian_diffusion::{GaussianDiffusion, ModelMeanType};
use crate::schedule::NoiseSchedule;
use crate::tensor::{check_batch, gather, per_sample, same_shape};

/// One DDIM step's result. `sigma` is the per-sample standard deviation of the added noise.
#[derive(Debug, Clone)]
pub struct DdimStep {
    pub x_prev: Tensor,
    pub pred_xstart: Tensor,
    pub eps: Tensor,
    pub sigma: Vec<f64>,
}

/// Per-sample `eta * sqrt((1 - ap) / (1 - a)) * sqrt(1 - a / ap)` on the diffusion's tables.
pub fn ddim_sigmas(diffusion: &GaussianDiffusion, t: &[usize], eta: f64) -> Result<Vec<f64>> {
    let s = &diffusion.schedule;
    let a = gather(&s.alphas_cumprod, t)?;
    let ap = gather(&s.alphas_cumprod_prev, t)?;
    Ok(a.iter()
        .zip(&ap)
        .map(|(&a, &ap)| eta * ((1.0 - ap) / (1.0 - a)).sqrt() * (1.0 - a / ap).sqrt())
        .collect())
}

/// The DDIM update from a given x0 prediction (after clipping and/or guidance):
/// `x_prev = x0 sqrt(ap) + sqrt(1 - ap - sigma^2) eps + (t != 0) sigma noise`, eps re-derived from x0.
///
/// `noise` may be `None` only when `eta == 0`.
pub fn ddim_update(
    diffusion: &GaussianDiffusion,
    x_t: &Tensor,
    t: &[usize],
    pred_xstart: &Tensor,
    eta: f64,
    noise: Option<&Tensor>,
) -> Result<DdimStep> {
    check_batch(t, x_t, "x_t")?;
    diffusion.schedule.check_timesteps(t)?;
    let eps = diffusion.predict_eps_from_xstart(x_t, t, pred_xstart)?;
    let sigma = ddim_sigmas(diffusion, t, eta)?;
    let ap = gather(&diffusion.schedule.alphas_cumprod_prev, t)?;
    let c_x0: Vec<f64> = ap.iter().map(|a| a.sqrt()).collect();
    let c_eps: Vec<f64> = ap
        .iter()
        .zip(&sigma)
        .map(|(&ap, &s)| (1.0 - ap - s * s).sqrt())
        .collect();
    let mean = pred_xstart
        .broadcast_mul(&per_sample(&c_x0, x_t)?)?
        .add(&eps.broadcast_mul(&per_sample(&c_eps, x_t)?)?)?;
    let x_prev = match noise {
        Some(z) => {
            same_shape(x_t, "x_t", z, "noise")?;
            let scale = per_sample(&sigma, x_t)?.mul(&nonzero_mask(t, x_t)?)?;
            mean.add(&z.broadcast_mul(&scale)?)?
        }
        None if eta == 0.0 => mean,
        None => {
            return Err(DiffusionError::InvalidUse(
                "DDIM with eta > 0 needs noise".into(),
            ))
        }
    };
    Ok(DdimStep {
        x_prev,
        pred_xstart: pred_xstart.clone(),
        eps,
        sigma,
    })
}

/// One improved-diffusion DDIM step from the network output (any mean/variance type of `diffusion`).
pub fn ddim_step(
    diffusion: &GaussianDiffusion,
    model_output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    clip_denoised: bool,
    eta: f64,
    noise: Option<&Tensor>,
) -> Result<DdimStep> {
    let out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised)?;
    ddim_update(diffusion, x_t, t, &out.pred_xstart, eta, noise)
}

/// The deterministic reverse (encoding) step x_t -> x_{t+1} of improved-diffusion
/// `ddim_reverse_sample` (eta = 0).
pub fn ddim_reverse_step(
    diffusion: &GaussianDiffusion,
    model_output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    clip_denoised: bool,
) -> Result<Tensor> {
    let out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised)?;
    let s = &diffusion.schedule;
    let c: Vec<f64> = gather(&s.alphas_cumprod_next, t)?;
    let c_x0: Vec<f64> = c.iter().map(|a| a.sqrt()).collect();
    let c_eps: Vec<f64> = c.iter().map(|a| (1.0 - a).sqrt()).collect();
    let eps = out.eps;
    Ok(out
        .pred_xstart
        .broadcast_mul(&per_sample(&c_x0, x_t)?)?
        .add(&eps.broadcast_mul(&per_sample(&c_eps, x_t)?)?)?)
}

/// diffusers `DDIMScheduler` with `timestep_spacing="leading"`, `steps_offset=0`, `set_alpha_to_one=True`
/// on the full (non-respaced) schedule.
///
/// Step i goes from `timesteps[i]` to `prev_timesteps[i] = timesteps[i] - T / n` (negative for the last
/// step, whose target is alpha = 1).
#[derive(Debug, Clone)]
pub struct DiffusersDdim {
    pub timesteps: Vec<usize>,
    pub prev_timesteps: Vec<i64>,
    pub alpha_prod_t: Vec<f64>,
    pub alpha_prod_t_prev: Vec<f64>,
    pub clip_sample: bool,
    pub mean_type: ModelMeanType,
}

impl DiffusersDdim {
    pub fn new(
        schedule: &NoiseSchedule,
        num_inference_steps: usize,
        clip_sample: bool,
    ) -> Result<Self> {
        let big_t = schedule.num_timesteps();
        if num_inference_steps == 0 || num_inference_steps > big_t {
            return Err(DiffusionError::InvalidUse(format!(
                "num_inference_steps must be in 1..={big_t}, got {num_inference_steps}"
            )));
        }
        let ratio = big_t / num_inference_steps;
        let timesteps: Vec<usize> = (0..num_inference_steps).rev().map(|i| i * ratio).collect();
        let prev_timesteps: Vec<i64> = timesteps.iter().map(|&t| t as i64 - ratio as i64).collect();
        let ac = &schedule.alphas_cumprod;
        let alpha_prod_t = timesteps.iter().map(|&t| ac[t]).collect();
        let alpha_prod_t_prev = prev_timesteps
            .iter()
            .map(|&p| if p >= 0 { ac[p as usize] } else { 1.0 })
            .collect();
        Ok(Self {
            timesteps,
            prev_timesteps,
            alpha_prod_t,
            alpha_prod_t_prev,
            clip_sample,
            mean_type: ModelMeanType::Epsilon,
        })
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Step `i` (0-based, all samples at `timesteps[i]`): returns `(x_prev, pred_x0)`.
    ///
    /// `noise` is needed only for `eta > 0`; like diffusers, noise is added at every step (its scale is
    /// 0 on the last one, where alpha_prev = 1).
    pub fn step(
        &self,
        i: usize,
        model_output: &Tensor,
        x: &Tensor,
        eta: f64,
        noise: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        same_shape(x, "sample", model_output, "model output")?;
        let (a, ap) = match (self.alpha_prod_t.get(i), self.alpha_prod_t_prev.get(i)) {
            (Some(&a), Some(&ap)) => (a, ap),
            _ => {
                return Err(DiffusionError::InvalidUse(format!(
                    "step {i} of a {}-step schedule",
                    self.num_steps()
                )))
            }
        };
        let beta = 1.0 - a;
        let (mut x0, eps) = match self.mean_type {
            ModelMeanType::Epsilon => (
                x.sub(&model_output.affine(beta.sqrt(), 0.0)?)?
                    .affine(1.0 / a.sqrt(), 0.0)?,
                model_output.clone(),
            ),
            ModelMeanType::StartX => {
                let eps = x
                    .sub(&model_output.affine(a.sqrt(), 0.0)?)?
                    .affine(1.0 / beta.sqrt(), 0.0)?;
                (model_output.clone(), eps)
            }
            ModelMeanType::V => (
                x.affine(a.sqrt(), 0.0)?
                    .sub(&model_output.affine(beta.sqrt(), 0.0)?)?,
                model_output
                    .affine(a.sqrt(), 0.0)?
                    .add(&x.affine(beta.sqrt(), 0.0)?)?,
            ),
        };
        if self.clip_sample {
            x0 = x0.clamp(-1.0, 1.0)?;
        }
        let variance = (1.0 - ap) / (1.0 - a) * (1.0 - a / ap);
        let std = eta * variance.sqrt();
        let dir = eps.affine((1.0 - ap - std * std).sqrt(), 0.0)?;
        let mut prev = x0.affine(ap.sqrt(), 0.0)?.add(&dir)?;
        if eta > 0.0 {
            let z = noise.ok_or_else(|| {
                DiffusionError::InvalidUse("DDIM with eta > 0 needs noise".into())
            })?;
            same_shape(x, "sample", z, "noise")?;
            prev = prev.add(&z.affine(std, 0.0)?)?;
        }
        Ok((prev, x0))
    }
}
