//! DPM-Solver++(2M) (Lu et al. 2022), as diffusers' `DPMSolverMultistepScheduler` runs it with
//! `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`, `lower_order_final=True`,
//! `final_sigmas_type="zero"` and `timestep_spacing="linspace"`.
//!
//! It is a multistep method: step i reuses the x0 prediction of step i-1, which the solver keeps. The first
//! step has no history and the last step (to sigma = 0) is first order, which is also what makes few-step
//! sampling stable.

use candle_core::Tensor;

use crate::error::{DiffusionError, Result};
use crate::gaussian_diffusion::ModelMeanType;
use crate::schedule::NoiseSchedule;
use crate::tensor::same_shape;

/// diffusers' "linspace" spacing: `round_half_even(linspace(0, T-1, n+1))`, reversed, last dropped.
pub fn linspace_timesteps(num_train_timesteps: usize, n: usize) -> Result<Vec<usize>> {
    if n == 0 || num_train_timesteps < 2 {
        return Err(DiffusionError::InvalidUse(format!(
            "need at least one step and two training timesteps (got {n} steps of {num_train_timesteps})"
        )));
    }
    let pts = crate::schedule::linspace(0.0, (num_train_timesteps - 1) as f64, n + 1);
    let mut ts: Vec<usize> = pts.iter().map(|p| p.round_ties_even() as usize).collect();
    ts.reverse();
    ts.pop();
    if ts.windows(2).any(|w| w[1] >= w[0]) {
        return Err(DiffusionError::InvalidUse(format!(
            "{n} steps give repeated timesteps out of {num_train_timesteps}"
        )));
    }
    Ok(ts)
}

/// What one solver step produced.
#[derive(Debug, Clone)]
pub struct DpmSolverStep {
    pub x_next: Tensor,
    pub x0_pred: Tensor,
    /// 1 or 2.
    pub order: usize,
}

/// The solver state: its timesteps, the per-step noise levels and the previous x0 prediction.
#[derive(Debug, Clone)]
pub struct DpmSolverPp2m {
    pub timesteps: Vec<usize>,
    /// `sqrt((1 - ac) / ac)` at each timestep, plus a final 0: `n + 1` entries.
    pub sigmas: Vec<f64>,
    /// `1 / sqrt(sigma^2 + 1)`: `n + 1` entries, the last is 1.
    pub alpha_t: Vec<f64>,
    /// `sigma * alpha_t`: `n + 1` entries, the last is 0.
    pub sigma_t: Vec<f64>,
    /// `ln alpha_t - ln sigma_t` for the first `n` entries (the final one is +inf and never used as such).
    pub lambda_t: Vec<f64>,
    pub mean_type: ModelMeanType,
    step_index: usize,
    prev_x0: Option<Tensor>,
    clip_x0: bool,
}

impl DpmSolverPp2m {
    /// A solver for `n` steps on the full training schedule, for an eps-predicting model.
    pub fn new(schedule: &NoiseSchedule, n: usize) -> Result<Self> {
        Self::from_timesteps(schedule, linspace_timesteps(schedule.num_timesteps(), n)?)
    }

    /// As [`Self::new`], but the steps span only the training timesteps whose half-log-SNR
    /// `lambda(t) = ln(alpha_t / sigma_t)` is at least `lambda_min` (diffusers'
    /// `lambda_min_clipped`, which it calls critical for the cosine schedule): there alpha_bar at
    /// t = T-1 is ~2e-9, the first data prediction divides the model's eps error by ~5e-5 and the
    /// samples turn to speckle noise. -5.1 (diffusers' value) leaves the linear schedule untouched
    /// (its lambda(T-1) is about -5.07).
    pub fn with_lambda_min(schedule: &NoiseSchedule, n: usize, lambda_min: f64) -> Result<Self> {
        let big_t = schedule.num_timesteps();
        let clipped = schedule
            .alphas_cumprod
            .iter()
            .filter(|&&a| 0.5 * (a / (1.0 - a)).ln() < lambda_min)
            .count();
        let last = big_t - clipped;
        if last < 2 {
            return Err(DiffusionError::InvalidUse(format!(
                "lambda_min {lambda_min} leaves {last} of {big_t} timesteps"
            )));
        }
        // linspace over [0, last - 1], as diffusers; the timesteps stay training indices.
        Self::from_timesteps(schedule, linspace_timesteps(last, n)?)
    }

    fn from_timesteps(schedule: &NoiseSchedule, timesteps: Vec<usize>) -> Result<Self> {
        let ac = &schedule.alphas_cumprod;
        let sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| ((1.0 - ac[t]) / ac[t]).sqrt())
            .collect();
        Ok(Self::from_sigmas(timesteps, sigmas))
    }

    /// A solver over explicit noise levels `gamma = -log SNR` (decreasing; a continuous-time
    /// schedule evaluated on the sampler's time grid, the final 0-noise step excluded). Its
    /// `timesteps` are the step indices `0..n`; the caller maps them to its own times.
    pub fn from_gammas(gammas: &[f64]) -> Result<Self> {
        if gammas.is_empty() || gammas.windows(2).any(|w| w[1] >= w[0]) {
            return Err(DiffusionError::InvalidUse(
                "DPM-Solver++ needs at least one strictly decreasing noise level".into(),
            ));
        }
        let sigmas = gammas.iter().map(|g| (0.5 * g).exp()).collect();
        Ok(Self::from_sigmas((0..gammas.len()).collect(), sigmas))
    }

    /// `sigmas[i] = sqrt((1 - abar) / abar)` of each step; the final sigma = 0 is appended.
    fn from_sigmas(timesteps: Vec<usize>, mut sigmas: Vec<f64>) -> Self {
        let n = timesteps.len();
        sigmas.push(0.0);
        let alpha_t: Vec<f64> = sigmas.iter().map(|s| 1.0 / (s * s + 1.0).sqrt()).collect();
        let sigma_t: Vec<f64> = sigmas.iter().zip(&alpha_t).map(|(s, a)| s * a).collect();
        let lambda_t = alpha_t[..n]
            .iter()
            .zip(&sigma_t[..n])
            .map(|(a, s)| a.ln() - s.ln())
            .collect();
        Self {
            timesteps,
            sigmas,
            alpha_t,
            sigma_t,
            lambda_t,
            mean_type: ModelMeanType::Epsilon,
            step_index: 0,
            prev_x0: None,
            clip_x0: false,
        }
    }

    /// Clamps every data prediction to [-1, 1] before it enters the update (static thresholding,
    /// which DPM-Solver++ is designed to take): for pixel models on the cosine schedule the early
    /// x0 estimates are far outside the data range and, unclamped, end up as speckle noise.
    pub fn with_clip(mut self, clip: bool) -> Self {
        self.clip_x0 = clip;
        self
    }

    /// Interprets the model output as `mean_type` (eps by default).
    pub fn with_mean_type(mut self, mean_type: ModelMeanType) -> Self {
        self.mean_type = mean_type;
        self
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Index of the next step to take.
    pub fn step_index(&self) -> usize {
        self.step_index
    }

    /// The timestep at which the model must be evaluated for the next step, or `None` when done.
    pub fn current_timestep(&self) -> Option<usize> {
        self.timesteps.get(self.step_index).copied()
    }

    /// The order used at step `i`: first order without history (i = 0) and for the final step to sigma = 0.
    pub fn order(&self, i: usize) -> usize {
        if i == 0 || i + 1 == self.num_steps() {
            1
        } else {
            2
        }
    }

    /// Converts the model output at step i to the x0 prediction (diffusers `convert_model_output`).
    fn x0_from_output(&self, i: usize, out: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (a, s) = (self.alpha_t[i], self.sigma_t[i]);
        Ok(match self.mean_type {
            ModelMeanType::Epsilon => x.sub(&out.affine(s, 0.0)?)?.affine(1.0 / a, 0.0)?,
            ModelMeanType::StartX => out.clone(),
            ModelMeanType::V => x.affine(a, 0.0)?.sub(&out.affine(s, 0.0)?)?,
        })
    }

    /// Takes the next step from sample `x` given the model output at [`Self::current_timestep`].
    pub fn step(&mut self, model_output: &Tensor, x: &Tensor) -> Result<DpmSolverStep> {
        same_shape(x, "sample", model_output, "model output")?;
        let i = self.step_index;
        let n = self.num_steps();
        if i >= n {
            return Err(DiffusionError::InvalidUse(format!(
                "all {n} solver steps were already taken"
            )));
        }
        let mut x0 = self.x0_from_output(i, model_output, x)?;
        if self.clip_x0 {
            x0 = x0.clamp(-1.0, 1.0)?;
        }
        let order = self.order(i);
        let x_next = if i + 1 == n {
            // sigma_{n} = 0: lambda = +inf, exp(-h) = 0, alpha = 1 and the update is exactly x0.
            x0.clone()
        } else {
            let h = self.lambda_t[i + 1] - self.lambda_t[i];
            let c_x = self.sigma_t[i + 1] / self.sigma_t[i];
            let c_d = -(self.alpha_t[i + 1] * ((-h).exp() - 1.0));
            let base = x.affine(c_x, 0.0)?.add(&x0.affine(c_d, 0.0)?)?;
            if order == 1 {
                base
            } else {
                let prev = self.prev_x0.as_ref().ok_or_else(|| {
                    DiffusionError::InvalidUse("second-order step without a previous x0".into())
                })?;
                let h0 = self.lambda_t[i] - self.lambda_t[i - 1];
                let r0 = h0 / h;
                let d1 = x0.sub(prev)?.affine(1.0 / r0, 0.0)?;
                base.add(&d1.affine(0.5 * c_d, 0.0)?)?
            }
        };
        self.prev_x0 = Some(x0.clone());
        self.step_index += 1;
        Ok(DpmSolverStep {
            x_next,
            x0_pred: x0,
            order,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::BetaSchedule;

    #[test]
    fn lambda_min_clips_the_cosine_end_only() {
        let lin = NoiseSchedule::new(&BetaSchedule::Linear, 1000).unwrap();
        let a = DpmSolverPp2m::new(&lin, 20).unwrap();
        let b = DpmSolverPp2m::with_lambda_min(&lin, 20, -5.1).unwrap();
        assert_eq!(
            a.timesteps, b.timesteps,
            "the linear schedule must be unchanged"
        );
        let cos = NoiseSchedule::new(&BetaSchedule::Cosine, 1000).unwrap();
        let c = DpmSolverPp2m::with_lambda_min(&cos, 20, -5.1).unwrap();
        let first = c.timesteps[0];
        assert!((990..999).contains(&first), "first timestep {first}");
        let ac = cos.alphas_cumprod[first];
        assert!(0.5 * (ac / (1.0 - ac)).ln() >= -5.1);
        let ac = cos.alphas_cumprod[first + 1];
        assert!(0.5 * (ac / (1.0 - ac)).ln() < -5.1);
        assert!(DpmSolverPp2m::with_lambda_min(&cos, 20, 50.0).is_err());
    }

    #[test]
    fn linspace_spacing_matches_diffusers() {
        let ts = linspace_timesteps(1000, 20).unwrap();
        assert_eq!(ts[..3], [999, 949, 899]);
        // 999 * 9 / 20 = 449.55 -> 450, 999 * 10 / 20 = 499.5 -> 500 (ties to even).
        assert_eq!(ts[9..12], [549, 500, 450]);
        assert_eq!(ts[19], 50);
        assert!(linspace_timesteps(10, 20).is_err());
    }

    #[test]
    fn orders_and_final_step() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000).unwrap();
        let solver = DpmSolverPp2m::new(&s, 5).unwrap();
        let orders: Vec<usize> = (0..5).map(|i| solver.order(i)).collect();
        assert_eq!(orders, vec![1, 2, 2, 2, 1]);
        assert_eq!(solver.sigmas[5], 0.0);
        assert_eq!(solver.alpha_t[5], 1.0);
        assert_eq!(solver.lambda_t.len(), 5);
    }
}
