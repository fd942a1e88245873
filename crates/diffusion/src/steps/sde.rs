//! Score-SDE steps (Song et al. 2021) for a discrete DDPM chain, through the VP-SDE correspondence.
//!
//! A (possibly respaced) DDPM chain with betas `beta_k` is the discretisation of the VP-SDE
//! `dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw` with `beta(t_k) dt = beta_k`, as Song et al. map DDPM
//! models (their `VPSDE` with `N` discrete betas). The score of the noised data at step k is
//! `-eps / sqrt(1 - abar_k)` (their discrete-model `score_fn`). Every function here takes the eps the
//! model predicts (after classifier-free guidance and `condition_score`, which shifts the score by
//! `scale * grad`), so guidance composes with these steps as with DDIM.
//!
//! `t` is the chain's own index (0..N-1 on a respaced chain). The predictors add no noise where
//! `t == 0` (Song's `noise_removal`, improved-diffusion's last step); the Langevin corrector always does.

use candle_core::{DType, Tensor};

use super::nonzero_mask;
use crate::error::{DiffusionError, Result};
use crate::schedule::NoiseSchedule;
use crate::tensor::{check_batch, gather, per_sample, same_shape};

/// One predictor step: the next sample, its noise-free part and the score it used.
#[derive(Debug, Clone)]
pub struct SdeStep {
    pub x_prev: Tensor,
    pub x_mean: Tensor,
    pub score: Tensor,
}

/// `score = -eps / sqrt(1 - abar_t)` on `schedule`'s tables.
pub fn score_from_eps(schedule: &NoiseSchedule, eps: &Tensor, t: &[usize]) -> Result<Tensor> {
    check_batch(t, eps, "eps")?;
    let s = gather(&schedule.sqrt_one_minus_alphas_cumprod, t)?;
    let inv: Vec<f64> = s.iter().map(|v| -1.0 / v).collect();
    Ok(eps.broadcast_mul(&per_sample(&inv, eps)?)?)
}

fn checked_inputs(
    schedule: &NoiseSchedule,
    x: &Tensor,
    t: &[usize],
    eps: &Tensor,
    noise: &Tensor,
) -> Result<(Vec<f64>, Tensor)> {
    check_batch(t, x, "x")?;
    schedule.check_timesteps(t)?;
    same_shape(x, "x", eps, "eps")?;
    same_shape(x, "x", noise, "noise")?;
    let beta = gather(&schedule.betas, t)?;
    Ok((beta, score_from_eps(schedule, eps, t)?))
}

/// `x_mean + (t != 0) sqrt(beta) noise`.
fn add_predictor_noise(
    x_mean: Tensor,
    beta: &[f64],
    t: &[usize],
    noise: &Tensor,
    score: Tensor,
) -> Result<SdeStep> {
    let g: Vec<f64> = beta.iter().map(|b| b.sqrt()).collect();
    let scale = per_sample(&g, &x_mean)?.mul(&nonzero_mask(t, &x_mean)?)?;
    let x_prev = x_mean.add(&noise.broadcast_mul(&scale)?)?;
    Ok(SdeStep {
        x_prev,
        x_mean,
        score,
    })
}

/// Euler-Maruyama on the reverse-time VP-SDE `dx = [-1/2 beta x - beta score] dt + sqrt(beta) dw_bar`,
/// one step back with `beta(t) dt = beta_t`:
/// `x_mean = x + beta_t (x / 2 + score)`, `x_prev = x_mean + (t != 0) sqrt(beta_t) noise`.
pub fn euler_maruyama_step(
    schedule: &NoiseSchedule,
    x: &Tensor,
    t: &[usize],
    eps: &Tensor,
    noise: &Tensor,
) -> Result<SdeStep> {
    let (beta, score) = checked_inputs(schedule, x, t, eps, noise)?;
    let c_x: Vec<f64> = beta.iter().map(|b| 1.0 + 0.5 * b).collect();
    let x_mean = x
        .broadcast_mul(&per_sample(&c_x, x)?)?
        .add(&score.broadcast_mul(&per_sample(&beta, x)?)?)?;
    add_predictor_noise(x_mean, &beta, t, noise, score)
}

/// Song et al.'s reverse-diffusion predictor (the reverse SDE discretised like the forward chain):
/// `x_mean = (2 - sqrt(1 - beta_t)) x + beta_t score`, `x_prev = x_mean + (t != 0) sqrt(beta_t) noise`.
/// It agrees with [`euler_maruyama_step`] to first order in beta.
pub fn reverse_diffusion_step(
    schedule: &NoiseSchedule,
    x: &Tensor,
    t: &[usize],
    eps: &Tensor,
    noise: &Tensor,
) -> Result<SdeStep> {
    let (beta, score) = checked_inputs(schedule, x, t, eps, noise)?;
    let c_x: Vec<f64> = beta.iter().map(|b| 2.0 - (1.0 - b).sqrt()).collect();
    let x_mean = x
        .broadcast_mul(&per_sample(&c_x, x)?)?
        .add(&score.broadcast_mul(&per_sample(&beta, x)?)?)?;
    add_predictor_noise(x_mean, &beta, t, noise, score)
}

/// One Langevin corrector step's result. `step_size` is per sample.
#[derive(Debug, Clone)]
pub struct LangevinStep {
    pub x: Tensor,
    pub x_mean: Tensor,
    pub step_size: Vec<f64>,
}

/// Per-sample Euclidean norms of `[B, ...]`, in f64 on the host.
fn norms(x: &Tensor) -> Result<Vec<f64>> {
    Ok(x.to_dtype(DType::F64)?
        .flatten_from(1)?
        .sqr()?
        .sum(1)?
        .sqrt()?
        .to_vec1::<f64>()?)
}

/// The signal-to-noise step-size rule: `eps_i = 2 alpha_t (snr ||noise|| / ||score||)^2` with
/// `alpha_t = 1 - beta_t` (Song et al.'s VP Langevin corrector). The norms are per sample, not the
/// batch means Song's code uses, so a sample does not depend on the batch it is in. A zero score gives
/// step size 0 (the sample is left as it is).
pub fn langevin_step_sizes(
    schedule: &NoiseSchedule,
    t: &[usize],
    score: &Tensor,
    noise: &Tensor,
    snr: f64,
) -> Result<Vec<f64>> {
    check_batch(t, score, "score")?;
    same_shape(score, "score", noise, "noise")?;
    if !(snr.is_finite() && snr >= 0.0) {
        return Err(DiffusionError::InvalidUse(format!(
            "the Langevin snr must be finite and >= 0, got {snr}"
        )));
    }
    let beta = gather(&schedule.betas, t)?;
    let (gn, nn) = (norms(score)?, norms(noise)?);
    Ok(beta
        .iter()
        .zip(gn.iter().zip(&nn))
        .map(|(b, (g, n))| {
            if *g == 0.0 {
                0.0
            } else {
                2.0 * (1.0 - b) * (snr * n / g).powi(2)
            }
        })
        .collect())
}

/// One Langevin MCMC step at noise level t: `x_mean = x + eps_i score`,
/// `x = x_mean + sqrt(2 eps_i) noise`, with `eps_i` from [`langevin_step_sizes`].
pub fn langevin_step(
    schedule: &NoiseSchedule,
    x: &Tensor,
    t: &[usize],
    eps: &Tensor,
    noise: &Tensor,
    snr: f64,
) -> Result<LangevinStep> {
    check_batch(t, x, "x")?;
    same_shape(x, "x", eps, "eps")?;
    same_shape(x, "x", noise, "noise")?;
    let score = score_from_eps(schedule, eps, t)?;
    let step_size = langevin_step_sizes(schedule, t, &score, noise, snr)?;
    let x_mean = x.add(&score.broadcast_mul(&per_sample(&step_size, x)?)?)?;
    let amp: Vec<f64> = step_size.iter().map(|e| (2.0 * e).sqrt()).collect();
    let x_new = x_mean.add(&noise.broadcast_mul(&per_sample(&amp, x)?)?)?;
    Ok(LangevinStep {
        x: x_new,
        x_mean,
        step_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::BetaSchedule;
    use candle_core::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_vec(v.to_vec(), (v.len(), 1), &Device::Cpu).unwrap()
    }

    #[test]
    fn one_step_by_hand() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000).unwrap();
        let (x, eps, z) = (t(&[1.0, 2.0]), t(&[0.5, -1.0]), t(&[0.25, 0.25]));
        let ts = [500, 0];
        let em = euler_maruyama_step(&s, &x, &ts, &eps, &z).unwrap();
        let got = em.x_prev.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (b, &k) in ts.iter().enumerate() {
            let (beta, sd) = (s.betas[k], s.sqrt_one_minus_alphas_cumprod[k]);
            let xb = [1.0, 2.0][b];
            let score = -[0.5, -1.0][b] / sd;
            let mean = xb + beta * (0.5 * xb + score);
            let want = if k == 0 {
                mean
            } else {
                mean + beta.sqrt() * 0.25
            };
            assert!((got[b] - want).abs() < 1e-15, "{b}: {} vs {want}", got[b]);
        }
        let rd = reverse_diffusion_step(&s, &x, &ts, &eps, &z).unwrap();
        let got = rd.x_mean.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (beta, sd) = (s.betas[500], s.sqrt_one_minus_alphas_cumprod[500]);
        let want = (2.0 - (1.0 - beta).sqrt()) * 1.0 - beta * 0.5 / sd;
        assert!((got[0] - want).abs() < 1e-15);
    }

    #[test]
    fn langevin_step_size_rule_and_checks() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 100).unwrap();
        let x = t(&[1.0, 1.0]);
        // score = -eps / sd; per-sample norms are |score| and |noise| (one element each)
        let (eps, z) = (t(&[2.0, 0.0]), t(&[3.0, 3.0]));
        let step = langevin_step(&s, &x, &[4, 4], &eps, &z, 0.1).unwrap();
        let g = 2.0 / s.sqrt_one_minus_alphas_cumprod[4];
        let want = 2.0 * (1.0 - s.betas[4]) * (0.1 * 3.0 / g).powi(2);
        assert!((step.step_size[0] - want).abs() < 1e-15 * want);
        assert_eq!(
            step.step_size[1], 0.0,
            "a zero score leaves the sample as it is"
        );
        assert_eq!(
            step.x.flatten_all().unwrap().to_vec1::<f64>().unwrap()[1],
            1.0
        );
        assert!(langevin_step(&s, &x, &[4, 4], &eps, &z, -0.1).is_err());
        assert!(langevin_step(&s, &x, &[4, 100], &eps, &z, 0.1).is_err());
        assert!(langevin_step(&s, &x, &[4], &eps, &z, 0.1).is_err());
        assert!(euler_maruyama_step(&s, &x, &[4, 4], &eps, &t(&[1.0])).is_err());
    }
}
