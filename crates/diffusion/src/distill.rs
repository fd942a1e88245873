//! Progressive distillation (Salimans & Ho 2022, Algorithm 2) on a discrete-time process: the
//! nested timestep grids of a round and the student's closed-form one-step target.
//!
//! A round halves the number of DDIM steps: the student's one step `t -> t''` must land where the
//! teacher's two steps `t -> t' -> t''` land. The grids are "trailing" (they end at `T - 1`, where
//! `x_T` is drawn): `t_k = round((k + 1) T / n) - 1`. The grid of `n` steps is exactly every other
//! point of the grid of `2n` (the odd-indexed ones), so each student interval covers two teacher
//! intervals on any `T`, which strided (`ddimN`) or evenly spaced grids do not guarantee.

use candle_core::Tensor;

use crate::error::{DiffusionError, Result};
use crate::gaussian_diffusion::{GaussianDiffusion, TrainingLosses};
use crate::tensor::{gather, mean_flat, per_sample, same_shape};

/// The `n`-step trailing grid over `num_timesteps` training steps, ascending:
/// `t_k = round_half_up((k + 1) T / n) - 1` for `k = 0..n`, computed in integers so that the grid of
/// `n` is exactly the odd-indexed points of the grid of `2n`.
pub fn trailing_timesteps(num_timesteps: usize, n: usize) -> Result<Vec<usize>> {
    if n == 0 || n > num_timesteps {
        return Err(DiffusionError::InvalidRespacing {
            spec: format!("trailing{n}"),
            num_timesteps,
            reason: format!("needs 1..={num_timesteps} steps"),
        });
    }
    let big_t = num_timesteps as u128;
    let n128 = n as u128;
    Ok((0..n as u128)
        .map(|k| (((k + 1) * 2 * big_t + n128) / (2 * n128)) as usize - 1)
        .collect())
}

/// How the distillation loss weights timesteps, in x-space: `w(t) ||x_tilde - x_hat||^2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistillWeighting {
    /// `max(SNR, 1)`, the paper's "truncated SNR" weighting: x-space MSE where the signal dominates,
    /// eps-space-like where the noise does, and never 0 at `SNR -> 0` (the first sampling step).
    TruncatedSnr,
    /// `SNR + 1`: the plain MSE on v (`||v - v_hat||^2 = (SNR + 1) ||x - x_hat||^2`).
    SnrPlusOne,
}

/// The loss weight of a timestep with `snr = abar / (1 - abar)`.
pub fn distill_weight(snr: f64, weighting: DistillWeighting) -> f64 {
    match weighting {
        DistillWeighting::TruncatedSnr => snr.max(1.0),
        DistillWeighting::SnrPlusOne => snr + 1.0,
    }
}

/// The x0 a single deterministic DDIM step from `z_t` (at `abar_t`) must use to land exactly on
/// `z_end` (at `abar_end`, 1 = the clean end), per example:
/// `x_tilde = (z_end - r z_t) / (alpha_end - r alpha_t)` with `r = sigma_end / sigma_t`,
/// `alpha = sqrt(abar)`, `sigma = sqrt(1 - abar)` (the paper's Algorithm 2 target). At the clean end
/// `r = 0` and the target is `z_end` itself.
pub fn one_step_target(
    z_t: &Tensor,
    z_end: &Tensor,
    abar_t: &[f64],
    abar_end: &[f64],
) -> Result<Tensor> {
    same_shape(z_t, "z_t", z_end, "z_end")?;
    if abar_t.len() != abar_end.len() {
        return Err(DiffusionError::Shape(format!(
            "{} start and {} end noise levels",
            abar_t.len(),
            abar_end.len()
        )));
    }
    let mut c_end = Vec::with_capacity(abar_t.len());
    let mut c_t = Vec::with_capacity(abar_t.len());
    for (&a, &e) in abar_t.iter().zip(abar_end) {
        let valid = (0.0..1.0).contains(&a) && a < e && e <= 1.0; // false for NaN too
        if !valid {
            return Err(DiffusionError::InvalidUse(format!(
                "a distillation step needs 0 <= abar_t < abar_end <= 1, got {a} -> {e}"
            )));
        }
        let r = (1.0 - e).sqrt() / (1.0 - a).sqrt();
        let den = e.sqrt() - r * a.sqrt();
        c_end.push(1.0 / den);
        c_t.push(-r / den);
    }
    Ok(z_end
        .broadcast_mul(&per_sample(&c_end, z_end)?)?
        .add(&z_t.broadcast_mul(&per_sample(&c_t, z_t)?)?)?)
}

/// One deterministic DDIM step with a given x0 between arbitrary noise levels, per example:
/// `alpha_end x0 + (sigma_end / sigma_t) (z_t - alpha_t x0)` (the teacher's and the student's step
/// in Algorithm 2; the same update as [`crate::steps::ddim_update`] with `eta = 0`).
pub fn ddim_jump(z_t: &Tensor, x0: &Tensor, abar_t: &[f64], abar_end: &[f64]) -> Result<Tensor> {
    same_shape(z_t, "z_t", x0, "x0")?;
    let r: Vec<f64> = abar_t
        .iter()
        .zip(abar_end)
        .map(|(&a, &e)| (1.0 - e).sqrt() / (1.0 - a).sqrt())
        .collect();
    let c_x0: Vec<f64> = abar_t
        .iter()
        .zip(abar_end)
        .zip(&r)
        .map(|((&a, &e), &r)| e.sqrt() - r * a.sqrt())
        .collect();
    Ok(x0
        .broadcast_mul(&per_sample(&c_x0, x0)?)?
        .add(&z_t.broadcast_mul(&per_sample(&r, z_t)?)?)?)
}

/// The student's per-example loss: `w(t) mean((x_hat - target_x0)^2)`, where `x_hat` is the x0 the
/// student's output implies at original timesteps `t` of the training process `diffusion` (any
/// prediction type; learned-variance channels are ignored) and `w` the chosen weighting of
/// `SNR(t)`. `mse` is the unweighted x-space error.
pub fn distill_losses(
    diffusion: &GaussianDiffusion,
    model_output: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    target_x0: &Tensor,
    weighting: DistillWeighting,
) -> Result<TrainingLosses> {
    same_shape(x_t, "x_t", target_x0, "target_x0")?;
    let (mean_out, _) = diffusion.split_model_output(model_output, x_t)?;
    let x_hat = diffusion.predict_xstart(&mean_out, x_t, t)?;
    let mse = mean_flat(&x_hat.sub(target_x0)?.sqr()?)?;
    let w: Vec<f64> = gather(&diffusion.schedule.alphas_cumprod, t)?
        .iter()
        .map(|&a| distill_weight(a / (1.0 - a), weighting))
        .collect();
    let loss = mse.mul(&per_sample(&w, &mse)?)?;
    Ok(TrainingLosses {
        loss,
        mse,
        vb: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn trailing_grids_are_nested_and_end_at_t_minus_1() {
        assert_eq!(
            trailing_timesteps(1000, 4).unwrap(),
            vec![249, 499, 749, 999]
        );
        assert_eq!(trailing_timesteps(10, 3).unwrap(), vec![2, 6, 9]); // 3.33, 6.67, 10
        assert_eq!(
            trailing_timesteps(8, 8).unwrap(),
            (0..8).collect::<Vec<_>>()
        );
        for big_t in [8, 10, 999, 1000, 4000] {
            let mut n = 1;
            while 2 * n <= big_t.min(512) {
                let coarse = trailing_timesteps(big_t, n).unwrap();
                let fine = trailing_timesteps(big_t, 2 * n).unwrap();
                let odd: Vec<usize> = fine.iter().skip(1).step_by(2).copied().collect();
                assert_eq!(coarse, odd, "T = {big_t}, n = {n}");
                assert!(fine.windows(2).all(|w| w[0] < w[1]), "T = {big_t}, n = {n}");
                assert_eq!(*fine.last().unwrap(), big_t - 1);
                n *= 2;
            }
        }
        assert!(trailing_timesteps(8, 9).is_err());
        assert!(trailing_timesteps(8, 0).is_err());
    }

    fn t64(v: &[f64]) -> Tensor {
        Tensor::from_slice(v, (v.len(), 1), &Device::Cpu).unwrap()
    }

    /// The target's defining property: one DDIM step from z_t with x_tilde lands on z_end.
    #[test]
    fn one_ddim_step_with_the_target_lands_on_the_end() {
        let z_t = t64(&[0.3, -1.2, 2.0]);
        let z_end = t64(&[0.1, 0.7, -0.4]);
        let a_t = [0.2, 1e-8, 0.6];
        let a_e = [0.5, 0.3, 1.0];
        let x = one_step_target(&z_t, &z_end, &a_t, &a_e).unwrap();
        let back = ddim_jump(&z_t, &x, &a_t, &a_e).unwrap();
        let d: Vec<f64> = (back - &z_end)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(d.iter().all(|v| v.abs() < 1e-12), "{d:?}");
        // the clean end: the target is z_end itself
        let x: Vec<Vec<f64>> = x.to_vec2().unwrap();
        assert!((x[2][0] + 0.4).abs() < 1e-15);
        // hand-checked: a_t = 0.2, a_e = 0.5: r = sqrt(.5/.8), x = (z_e - r z_t) / (sqrt(.5) - r sqrt(.2))
        let r = (0.5f64 / 0.8).sqrt();
        let want = (0.1 - r * 0.3) / (0.5f64.sqrt() - r * 0.2f64.sqrt());
        assert!((x[0][0] - want).abs() < 1e-12);
        assert!(one_step_target(&z_t, &z_end, &[0.4, 0.1, 0.1], &a_e).is_ok());
        assert!(one_step_target(&z_t, &z_end, &[0.6, 0.1, 0.1], &a_e).is_err());
    }

    /// Two teacher DDIM steps with an x0 that does not change are one step: then the target is that x0.
    #[test]
    fn a_constant_x0_is_its_own_target() {
        let z_t = t64(&[0.3, -1.2]);
        let x0 = t64(&[0.5, -0.25]);
        let (a_t, a_mid, a_e) = ([0.1, 0.2], [0.3, 0.5], [0.6, 1.0]);
        let mid = ddim_jump(&z_t, &x0, &a_t, &a_mid).unwrap();
        let end = ddim_jump(&mid, &x0, &a_mid, &a_e).unwrap();
        let x = one_step_target(&z_t, &end, &a_t, &a_e).unwrap();
        let d: Vec<f64> = (x - &x0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(d.iter().all(|v| v.abs() < 1e-12), "{d:?}");
        let f = z_t.to_dtype(DType::F32).unwrap();
        assert_eq!(
            one_step_target(&f, &f, &[0.1, 0.1], &[0.2, 0.2])
                .unwrap()
                .dtype(),
            DType::F32
        );
    }

    /// With v-prediction and SNR + 1 weighting the loss is the plain MSE on v.
    #[test]
    fn snr_plus_one_loss_is_the_v_mse() {
        use crate::{BetaSchedule, LossType, ModelMeanType, ModelVarType, NoiseSchedule};
        let s = NoiseSchedule::new(&BetaSchedule::Cosine, 20).unwrap();
        let d =
            GaussianDiffusion::new(s, ModelMeanType::V, ModelVarType::FixedSmall, LossType::Mse);
        let dev = Device::Cpu;
        let x0 = Tensor::from_slice(&[0.3, -0.7, 0.1, 0.9], (2, 2), &dev).unwrap();
        let noise = Tensor::from_slice(&[1.1, -0.2, 0.5, -1.4], (2, 2), &dev).unwrap();
        let t = [3usize, 17];
        let x_t = d.q_sample(&x0, &t, &noise).unwrap();
        let v_hat = Tensor::from_slice(&[0.2, 0.0, -0.3, 0.4], (2, 2), &dev).unwrap();
        let l = distill_losses(&d, &v_hat, &x_t, &t, &x0, DistillWeighting::SnrPlusOne).unwrap();
        let v = d.v_target(&x0, &noise, &t).unwrap();
        let want: Vec<f64> = mean_flat(&(v - &v_hat).unwrap().sqr().unwrap())
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f64> = l.loss.to_vec1().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    #[test]
    fn weights() {
        assert_eq!(distill_weight(0.25, DistillWeighting::TruncatedSnr), 1.0);
        assert_eq!(distill_weight(4.0, DistillWeighting::TruncatedSnr), 4.0);
        assert_eq!(distill_weight(0.25, DistillWeighting::SnrPlusOne), 1.25);
    }
}
