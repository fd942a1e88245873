//! The continuous-time ELBO (VDM eq. 17 and its T-step form), per example in bits/dim, and the
//! low-discrepancy time sampler that lowers its variance.
//!
//! Tensor versions take per-example `[B]` noise levels and keep gradients flowing into them (the
//! learned schedule is trained through them); the `_f64` versions are the same formulas on host
//! values for one example, used by the reference checks and by finite differences.

use candle_core::Tensor;

use super::{alpha2, log_sigmoid, sigma2};
use crate::error::{DiffusionError, Result};
use crate::losses::{discretized_gaussian_log_likelihood, discretized_gaussian_log_likelihood_f64};
use crate::tensor::{mean_flat, same_shape};

const LN_2: f64 = std::f64::consts::LN_2;

/// The three ELBO terms of each example and their sum (bits/dim, `[B]` host values).
#[derive(Debug, Clone, PartialEq)]
pub struct ContinuousElbo {
    pub prior_bpd: Vec<f64>,
    pub diffusion_bpd: Vec<f64>,
    pub reconstruction_bpd: Vec<f64>,
    pub total_bpd: Vec<f64>,
}

impl ContinuousElbo {
    pub fn new(prior: Vec<f64>, diffusion: Vec<f64>, reconstruction: Vec<f64>) -> Result<Self> {
        if prior.len() != diffusion.len() || prior.len() != reconstruction.len() {
            return Err(DiffusionError::Shape(format!(
                "ELBO terms for {}, {} and {} examples",
                prior.len(),
                diffusion.len(),
                reconstruction.len()
            )));
        }
        let total = (0..prior.len())
            .map(|i| prior[i] + diffusion[i] + reconstruction[i])
            .collect();
        Ok(Self {
            prior_bpd: prior,
            diffusion_bpd: diffusion,
            reconstruction_bpd: reconstruction,
            total_bpd: total,
        })
    }
}

/// `sigmoid(x)` for tensors as `(tanh(x/2) + 1) / 2`: no overflow and a finite gradient everywhere.
pub fn sigmoid_t(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?)
}

/// `[B]` -> `[B, 1, .., 1]` with the rank of `like`, for broadcasting per-example values.
fn per_example(v: &Tensor, like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1usize; like.rank()];
    shape[0] = v.dim(0)?;
    Ok(v.reshape(shape)?)
}

/// `(alpha, sigma)` of per-example noise levels `gamma` (`[B]` or `[1]`), shaped to broadcast
/// against `like`.
pub fn alpha_sigma(gamma: &Tensor, like: &Tensor) -> Result<(Tensor, Tensor)> {
    let g = per_example(gamma, like)?;
    Ok((sigmoid_t(&g.neg()?)?.sqrt()?, sigmoid_t(&g)?.sqrt()?))
}

/// `z = alpha(gamma) x + sigma(gamma) eps` per example.
pub fn q_sample(x: &Tensor, eps: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    same_shape(x, "x", eps, "eps")?;
    let (a, s) = alpha_sigma(gamma, x)?;
    Ok(x.broadcast_mul(&a)?.add(&eps.broadcast_mul(&s)?)?)
}

/// Prior term `KL(N(alpha_1 x, sigma_1^2) || N(0, 1))` averaged over dimensions, in bits/dim.
/// `gamma_1` is `[1]` (or `[B]`).
pub fn prior_bpd(x: &Tensor, gamma_1: &Tensor) -> Result<Tensor> {
    let g = per_example(gamma_1, x)?;
    let s2 = sigmoid_t(&g)?;
    let a2 = sigmoid_t(&g.neg()?)?;
    // 0.5 (sigma^2 + alpha^2 x^2 - ln sigma^2 - 1)
    let kl = x
        .sqr()?
        .broadcast_mul(&a2)?
        .broadcast_add(&s2.sub(&s2.log()?)?)?
        .affine(0.5, -0.5)?;
    Ok(mean_flat(&kl)?.affine(1.0 / LN_2, 0.0)?)
}

/// f64 prior term of one example with data `x` (all dimensions).
pub fn prior_bpd_f64(x: &[f64], gamma_1: f64) -> f64 {
    let (s2, a2, ls2) = (sigma2(gamma_1), alpha2(gamma_1), log_sigmoid(gamma_1));
    let sum: f64 = x.iter().map(|v| 0.5 * (s2 + a2 * v * v - ls2 - 1.0)).sum();
    sum / x.len() as f64 / LN_2
}

/// Continuous-time diffusion term `0.5 gamma'(t) ||eps - eps_hat||^2 / (D ln 2)` per example.
pub fn diffusion_bpd_continuous(eps: &Tensor, eps_hat: &Tensor, dgamma: &Tensor) -> Result<Tensor> {
    same_shape(eps, "eps", eps_hat, "eps_hat")?;
    let mse = mean_flat(&eps.sub(eps_hat)?.sqr()?)?;
    Ok(mse.mul(dgamma)?.affine(0.5 / LN_2, 0.0)?)
}

/// f64 continuous-time diffusion term of one example.
pub fn diffusion_bpd_continuous_f64(eps: &[f64], eps_hat: &[f64], dgamma: f64) -> f64 {
    0.5 * dgamma * mse_f64(eps, eps_hat) / LN_2
}

fn mse_f64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / a.len() as f64
}

/// T-step diffusion term `0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2 / (D ln 2)`, with
/// `s = t - 1/T`; `gamma_t`, `gamma_s` are `[B]`.
pub fn diffusion_bpd_discrete(
    eps: &Tensor,
    eps_hat: &Tensor,
    gamma_t: &Tensor,
    gamma_s: &Tensor,
    num_steps: usize,
) -> Result<Tensor> {
    same_shape(eps, "eps", eps_hat, "eps_hat")?;
    let mse = mean_flat(&eps.sub(eps_hat)?.sqr()?)?;
    let w = gamma_t.sub(gamma_s)?.exp()?.affine(1.0, -1.0)?;
    Ok(mse.mul(&w)?.affine(0.5 * num_steps as f64 / LN_2, 0.0)?)
}

/// f64 T-step diffusion term of one example.
pub fn diffusion_bpd_discrete_f64(
    eps: &[f64],
    eps_hat: &[f64],
    gamma_t: f64,
    gamma_s: f64,
    num_steps: usize,
) -> f64 {
    0.5 * num_steps as f64 * (gamma_t - gamma_s).exp_m1() * mse_f64(eps, eps_hat) / LN_2
}

/// Reconstruction term `-log p(x | z_0)` in bits/dim: the discretised Gaussian of `losses.rs`
/// (256 bins on [-1, 1]) with mean `z_0 / alpha_0` and log standard deviation `gamma_0 / 2`
/// (`sigma_0 / alpha_0 = exp(gamma_0 / 2)`). `z_0` is one draw of `q(z_0|x)`.
pub fn reconstruction_bpd(x: &Tensor, z0: &Tensor, gamma_0: &Tensor) -> Result<Tensor> {
    same_shape(x, "x", z0, "z0")?;
    let g = per_example(gamma_0, x)?;
    let alpha = sigmoid_t(&g.neg()?)?.sqrt()?;
    let mean = z0.broadcast_div(&alpha)?;
    let log_scale = g.affine(0.5, 0.0)?;
    let ll = discretized_gaussian_log_likelihood(x, &mean, &log_scale)?;
    Ok(mean_flat(&ll)?.affine(-1.0 / LN_2, 0.0)?)
}

/// f64 reconstruction term of one example.
pub fn reconstruction_bpd_f64(x: &[f64], z0: &[f64], gamma_0: f64) -> f64 {
    let alpha = alpha2(gamma_0).sqrt();
    let sum: f64 = x
        .iter()
        .zip(z0)
        .map(|(&xv, &z)| -discretized_gaussian_log_likelihood_f64(xv, z / alpha, 0.5 * gamma_0))
        .sum();
    sum / x.len() as f64 / LN_2
}

/// Low-discrepancy times (VDM appendix): example `p` of a global batch of `n` gets
/// `t_p = (u + p / n) mod 1` for one shared uniform `u`, so the batch covers [0, 1) evenly while
/// each `t_p` is still uniform. Returns the times of examples `first..first + count`.
pub fn low_discrepancy_times(u: f64, first: u64, n: u64, count: usize) -> Vec<f64> {
    (0..count as u64)
        .map(|i| (u + (first + i) as f64 / n as f64).rem_euclid(1.0))
        .collect()
}

/// The T-step grid: `t -> ceil(t T) / T`, so `t` lies in `{1/T, .., 1}` (VDM's discretisation;
/// `t = 0` maps to `1/T` so that `s = t - 1/T` stays in range).
pub fn discretize_time(t: f64, num_steps: usize) -> f64 {
    let n = num_steps as f64;
    (t * n).ceil().max(1.0) / n
}
