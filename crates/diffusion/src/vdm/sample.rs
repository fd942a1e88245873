//! Sampler steps for a continuous-time schedule: any number of steps on `t = 1 -> 0`.
//!
//! Every step goes from noise level `gamma_t` to a lower `gamma_s` given the model's eps prediction
//! at `z_t`; how the times are chosen (and therefore the schedule, fixed or learned) only enters
//! through these two numbers.

use candle_core::Tensor;

use super::{alpha2, sigma2};
use crate::error::{DiffusionError, Result};
use crate::tensor::same_shape;

/// `n + 1` equally spaced times `1, 1 - 1/n, .., 0` (the sampler visits them in this order).
pub fn time_grid(n: usize) -> Result<Vec<f64>> {
    if n == 0 {
        return Err(DiffusionError::InvalidUse(
            "a sampler needs at least one step".into(),
        ));
    }
    Ok((0..=n).map(|i| 1.0 - i as f64 / n as f64).collect())
}

/// Coefficients of the ancestral step `z_s = a z_t - b eps_hat + c noise` (VDM's `sample_step`,
/// the exact posterior `q(z_s | z_t, x = x_hat)`): with `k = -expm1(gamma_s - gamma_t)`,
/// `a = alpha_s / alpha_t`, `b = a k sigma_t`, `c = sigma_s sqrt(k)`.
pub fn ancestral_coefficients(gamma_t: f64, gamma_s: f64) -> Result<[f64; 3]> {
    if gamma_s > gamma_t {
        return Err(DiffusionError::InvalidUse(format!(
            "an ancestral step must lower the noise level: gamma_s = {gamma_s} > gamma_t = {gamma_t}"
        )));
    }
    let k = -(gamma_s - gamma_t).exp_m1();
    let a = (alpha2(gamma_s) / alpha2(gamma_t)).sqrt();
    Ok([
        a,
        a * k * sigma2(gamma_t).sqrt(),
        sigma2(gamma_s).sqrt() * k.sqrt(),
    ])
}

/// One ancestral step from `z_t` to `z_s`; `noise` is standard normal of `z_t`'s shape.
pub fn ancestral_step(
    z_t: &Tensor,
    eps_hat: &Tensor,
    noise: &Tensor,
    gamma_t: f64,
    gamma_s: f64,
) -> Result<Tensor> {
    same_shape(z_t, "z_t", eps_hat, "eps_hat")?;
    same_shape(z_t, "z_t", noise, "noise")?;
    let [a, b, c] = ancestral_coefficients(gamma_t, gamma_s)?;
    Ok(z_t
        .affine(a, 0.0)?
        .sub(&eps_hat.affine(b, 0.0)?)?
        .add(&noise.affine(c, 0.0)?)?)
}

/// The deterministic DDIM step (eta = 0): `x_hat = (z_t - sigma_t eps_hat) / alpha_t`, then
/// `z_s = alpha_s x_hat + sigma_s eps_hat`. With `clip`, `x_hat` is clamped to [-1, 1] and eps
/// re-derived from it (as improved-diffusion's DDIM).
pub fn ddim_step(
    z_t: &Tensor,
    eps_hat: &Tensor,
    gamma_t: f64,
    gamma_s: f64,
    clip: bool,
) -> Result<Tensor> {
    same_shape(z_t, "z_t", eps_hat, "eps_hat")?;
    let (at, st) = (alpha2(gamma_t).sqrt(), sigma2(gamma_t).sqrt());
    let (as_, ss) = (alpha2(gamma_s).sqrt(), sigma2(gamma_s).sqrt());
    let mut x = z_t.sub(&eps_hat.affine(st, 0.0)?)?.affine(1.0 / at, 0.0)?;
    let mut eps = eps_hat.clone();
    if clip {
        x = x.clamp(-1.0, 1.0)?;
        eps = z_t.sub(&x.affine(at, 0.0)?)?.affine(1.0 / st, 0.0)?;
    }
    Ok(x.affine(as_, 0.0)?.add(&eps.affine(ss, 0.0)?)?)
}

/// The data estimate at the end of sampling: `z_0 / alpha_0`, the mean of the decoder
/// `p(x | z_0)`, clamped to [-1, 1].
pub fn final_mean(z0: &Tensor, gamma_0: f64) -> Result<Tensor> {
    Ok(z0
        .affine(1.0 / alpha2(gamma_0).sqrt(), 0.0)?
        .clamp(-1.0, 1.0)?)
}
