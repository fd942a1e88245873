//! Guidance: classifier-free (Ho & Salimans 2022) and classifier guidance (guided-diffusion
//! `condition_mean` / `condition_score`, Dhariwal & Nichol 2021).

use candle_core::Tensor;

use crate::error::Result;
use crate::gaussian_diffusion::GaussianDiffusion;
use crate::tensor::{check_batch, extract, same_shape};

/// Classifier-free guidance with GLIDE's `w`: `(1 + w) eps_cond - w eps_uncond` (w = 0 is the plain
/// conditional model).
pub fn cfg_combine(eps_cond: &Tensor, eps_uncond: &Tensor, w: f64) -> Result<Tensor> {
    same_shape(eps_cond, "eps_cond", eps_uncond, "eps_uncond")?;
    Ok(eps_cond
        .affine(1.0 + w, 0.0)?
        .sub(&eps_uncond.affine(w, 0.0)?)?)
}

/// The same with diffusers' `guidance_scale = s = 1 + w`: `eps_uncond + s (eps_cond - eps_uncond)`.
pub fn cfg_combine_scale(eps_cond: &Tensor, eps_uncond: &Tensor, s: f64) -> Result<Tensor> {
    same_shape(eps_cond, "eps_cond", eps_uncond, "eps_uncond")?;
    Ok(eps_uncond.add(&eps_cond.sub(eps_uncond)?.affine(s, 0.0)?)?)
}

/// Classifier-free guidance on full network outputs: the mean channels are combined with
/// [`cfg_combine`]; learned-variance channels are taken from the conditional output (as GLIDE does).
pub fn cfg_combine_model_output(
    diffusion: &GaussianDiffusion,
    out_cond: &Tensor,
    out_uncond: &Tensor,
    x_t: &Tensor,
    w: f64,
) -> Result<Tensor> {
    let (mc, vc) = diffusion.split_model_output(out_cond, x_t)?;
    let (mu, _) = diffusion.split_model_output(out_uncond, x_t)?;
    let m = cfg_combine(&mc, &mu, w)?;
    Ok(match vc {
        Some(v) => Tensor::cat(&[&m, &v], 1)?,
        None => m,
    })
}

/// A classifier gradient `grad_x log p(y | x_t)` and the guidance scale it is applied with.
#[derive(Debug, Clone, Copy)]
pub struct ScaledGrad<'a> {
    pub grad: &'a Tensor,
    pub scale: f64,
}

/// Sohl-Dickstein et al.'s classifier guidance: shift the mean by `variance * scale * grad`, where
/// `grad = grad_x log p(y | x_t)` and `variance` is the reverse-process variance (not its log).
pub fn condition_mean(
    mean: &Tensor,
    variance: &Tensor,
    grad: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    same_shape(mean, "mean", grad, "grad")?;
    Ok(mean.add(&variance.broadcast_mul(&grad.affine(scale, 0.0)?)?)?)
}

/// The result of score-based conditioning.
#[derive(Debug, Clone)]
pub struct ConditionScore {
    pub eps: Tensor,
    pub pred_xstart: Tensor,
    pub mean: Tensor,
}

/// Song et al.'s score conditioning (guided-diffusion `condition_score`): subtract
/// `sqrt(1 - ac) * scale * grad` from the eps implied by `pred_xstart`, then rebuild x0 and the mean.
/// Use it for DDIM; feed `pred_xstart` to [`super::ddim_update`].
pub fn condition_score(
    diffusion: &GaussianDiffusion,
    x_t: &Tensor,
    t: &[usize],
    pred_xstart: &Tensor,
    grad: &Tensor,
    scale: f64,
) -> Result<ConditionScore> {
    check_batch(t, x_t, "x_t")?;
    same_shape(x_t, "x_t", grad, "grad")?;
    let eps = diffusion.predict_eps_from_xstart(x_t, t, pred_xstart)?;
    let s = extract(&diffusion.schedule.sqrt_one_minus_alphas_cumprod, t, x_t)?;
    let eps = eps.sub(&s.broadcast_mul(&grad.affine(scale, 0.0)?)?)?;
    let pred_xstart = diffusion.predict_xstart_from_eps(x_t, t, &eps)?;
    let mean = diffusion.q_posterior_mean(&pred_xstart, x_t, t)?;
    Ok(ConditionScore {
        eps,
        pred_xstart,
        mean,
    })
}
