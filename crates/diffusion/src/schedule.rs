//! Beta schedules and every table derived from them, in f64 on the host.
//!
//! The tables are computed once in f64 and only cast when they are turned into per-sample coefficient
//! tensors, so training in f32 never accumulates rounding from a cumulative product done in f32
//! (diffusers keeps `alphas_cumprod` in f32, which costs about 3e-7 absolute; see the reference README).

use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};

/// The offset `s` of the cosine schedule (Nichol & Dhariwal 2021, eq. 17).
pub const COSINE_S: f64 = 0.008;
/// The cap on cosine betas; without it the last beta is 1 and `alphas_cumprod[T-1]` is 0.
pub const COSINE_MAX_BETA: f64 = 0.999;

/// Which betas to use. Serialized as `"linear"`, `"cosine"` or `{ custom = [..] }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BetaSchedule {
    /// Ho et al.'s linear schedule 1e-4..0.02, scaled by 1000/T as improved-diffusion does.
    Linear,
    /// The cosine schedule with s = 0.008 and betas capped at 0.999.
    Cosine,
    /// A user-given list of betas; its length must equal the number of timesteps.
    Custom(Vec<f64>),
}

impl BetaSchedule {
    /// The betas of this schedule for `num_timesteps` steps.
    pub fn betas(&self, num_timesteps: usize) -> Result<Vec<f64>> {
        if num_timesteps == 0 {
            return Err(DiffusionError::InvalidSchedule(
                "num_timesteps must be at least 1".into(),
            ));
        }
        match self {
            BetaSchedule::Linear => Ok(linear_betas(num_timesteps)),
            BetaSchedule::Cosine => Ok(cosine_betas(num_timesteps, COSINE_S, COSINE_MAX_BETA)),
            BetaSchedule::Custom(b) => {
                if b.len() != num_timesteps {
                    return Err(DiffusionError::InvalidSchedule(format!(
                        "custom schedule has {} betas but num_timesteps is {}",
                        b.len(),
                        num_timesteps
                    )));
                }
                Ok(b.clone())
            }
        }
    }
}

/// improved-diffusion's scaled endpoints of the linear schedule: `(1000/T * 1e-4, 1000/T * 0.02)`.
///
/// Scaling keeps the total amount of noise roughly independent of T, so T = 4000 still ends near
/// pure noise instead of over-shooting.
pub fn linear_beta_range(num_timesteps: usize) -> (f64, f64) {
    let scale = 1000.0 / num_timesteps as f64;
    (scale * 0.0001, scale * 0.02)
}

/// The linear schedule with improved-diffusion's 1000/T scaling.
pub fn linear_betas(num_timesteps: usize) -> Vec<f64> {
    let (start, end) = linear_beta_range(num_timesteps);
    linspace(start, end, num_timesteps)
}

/// `numpy.linspace(start, end, n)` bit for bit: `start + i * step` with the last entry set to `end`.
///
/// Evaluating it any other way (e.g. `start + (end - start) * i / (n - 1)`) differs in the last bit,
/// which is harmless but makes the schedule not bitwise reproducible against the references.
pub fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = end;
            v
        }
    }
}

/// The squared-cosine `alpha_bar(u)` of Nichol & Dhariwal, with the operation order of
/// improved-diffusion (`cos((u + s) / (1 + s) * pi / 2) ** 2`).
fn cosine_alpha_bar(u: f64, s: f64) -> f64 {
    let c = ((u + s) / (1.0 + s) * std::f64::consts::PI / 2.0).cos();
    c * c
}

/// The cosine schedule: `betas[i] = min(1 - abar((i+1)/T) / abar(i/T), max_beta)`.
pub fn cosine_betas(num_timesteps: usize, s: f64, max_beta: f64) -> Vec<f64> {
    let t = num_timesteps as f64;
    (0..num_timesteps)
        .map(|i| {
            let t1 = i as f64 / t;
            let t2 = (i + 1) as f64 / t;
            (1.0 - cosine_alpha_bar(t2, s) / cosine_alpha_bar(t1, s)).min(max_beta)
        })
        .collect()
}

/// Every quantity improved-diffusion's `GaussianDiffusion.__init__` derives from the betas.
///
/// Field names follow improved-diffusion and the reference README so the two can be compared by name.
/// Index 0 of `posterior_log_variance_clipped` and of the fixed-large tables uses `posterior_variance[1]`,
/// because `posterior_variance[0]` is exactly 0 and its log would be -inf.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    pub alphas_cumprod_next: Vec<f64>,
    pub sqrt_alphas_cumprod: Vec<f64>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    pub log_one_minus_alphas_cumprod: Vec<f64>,
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
    pub fixed_large_variance: Vec<f64>,
    pub fixed_large_log_variance: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds the tables of a named schedule.
    pub fn new(schedule: &BetaSchedule, num_timesteps: usize) -> Result<Self> {
        Self::from_betas(schedule.betas(num_timesteps)?)
    }

    /// Builds the tables from explicit betas.
    ///
    /// Requires at least 2 steps (the clipped log-variance at index 0 borrows index 1) and every beta in
    /// the open interval (0, 1): a beta of 1 makes `alphas_cumprod` 0 from there on, and then x0 cannot be
    /// recovered from eps (`sqrt_recip_alphas_cumprod` is infinite), so it would only produce inf/NaN.
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        let n = betas.len();
        if n < 2 {
            return Err(DiffusionError::InvalidSchedule(format!(
                "need at least 2 timesteps, got {n}"
            )));
        }
        for (i, &b) in betas.iter().enumerate() {
            if !(b.is_finite() && b > 0.0 && b < 1.0) {
                return Err(DiffusionError::InvalidSchedule(format!(
                    "betas[{i}] = {b} is not in the open interval (0, 1)"
                )));
            }
        }
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0f64;
        for &a in &alphas {
            acc *= a;
            alphas_cumprod.push(acc);
        }
        if alphas_cumprod[n - 1] <= 0.0 {
            return Err(DiffusionError::InvalidSchedule(
                "alphas_cumprod underflows to 0; the schedule destroys the signal completely"
                    .into(),
            ));
        }
        let ac = &alphas_cumprod;
        let mut alphas_cumprod_prev = Vec::with_capacity(n);
        alphas_cumprod_prev.push(1.0);
        alphas_cumprod_prev.extend_from_slice(&ac[..n - 1]);
        let mut alphas_cumprod_next = ac[1..].to_vec();
        alphas_cumprod_next.push(0.0);

        let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
        let sqrt_alphas_cumprod = map(&|i| ac[i].sqrt());
        let sqrt_one_minus_alphas_cumprod = map(&|i| (1.0 - ac[i]).sqrt());
        let log_one_minus_alphas_cumprod = map(&|i| (1.0 - ac[i]).ln());
        let sqrt_recip_alphas_cumprod = map(&|i| (1.0 / ac[i]).sqrt());
        let sqrt_recipm1_alphas_cumprod = map(&|i| (1.0 / ac[i] - 1.0).sqrt());
        let acp = &alphas_cumprod_prev;
        let posterior_variance = map(&|i| betas[i] * (1.0 - acp[i]) / (1.0 - ac[i]));
        let pv = &posterior_variance;
        let posterior_log_variance_clipped = map(&|i| if i == 0 { pv[1] } else { pv[i] }.ln());
        let posterior_mean_coef1 = map(&|i| betas[i] * acp[i].sqrt() / (1.0 - ac[i]));
        let posterior_mean_coef2 = map(&|i| (1.0 - acp[i]) * alphas[i].sqrt() / (1.0 - ac[i]));
        let fixed_large_variance = map(&|i| if i == 0 { pv[1] } else { betas[i] });
        let fixed_large_log_variance = fixed_large_variance.iter().map(|v| v.ln()).collect();

        Ok(Self {
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_prev,
            alphas_cumprod_next,
            sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod,
            log_one_minus_alphas_cumprod,
            sqrt_recip_alphas_cumprod,
            sqrt_recipm1_alphas_cumprod,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
            fixed_large_variance,
            fixed_large_log_variance,
        })
    }

    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// Signal-to-noise ratio `ac / (1 - ac)` per timestep.
    pub fn snr(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|a| a / (1.0 - a)).collect()
    }

    /// Returns an error unless every `t` is a valid index into the tables.
    pub fn check_timesteps(&self, t: &[usize]) -> Result<()> {
        let n = self.num_timesteps();
        match t.iter().find(|&&ti| ti >= n) {
            Some(&bad) => Err(DiffusionError::TimestepOutOfRange {
                t: bad,
                num_timesteps: n,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_endpoints_and_scaling() {
        let b = linear_betas(1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(b[0], 1e-4);
        assert_eq!(b[999], 0.02);
        let b = linear_betas(100);
        assert!((b[0] - 0.001).abs() < 1e-18);
        assert!((b[99] - 0.2).abs() < 1e-16);
    }

    #[test]
    fn linspace_matches_numpy_definition() {
        assert_eq!(linspace(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(linspace(2.0, 3.0, 1), vec![2.0]);
        assert!(linspace(2.0, 3.0, 0).is_empty());
    }

    #[test]
    fn schedules_are_monotone_and_valid() {
        // Linear betas end at 20/T, so the schedule only exists for T > 20.
        let cases = [
            (BetaSchedule::Linear, vec![21usize, 50, 100, 1000, 4000]),
            (BetaSchedule::Cosine, vec![2, 10, 100, 1000, 4000]),
        ];
        for (sched, ts) in cases {
            for t in ts {
                let s = NoiseSchedule::new(&sched, t).unwrap();
                assert!(s.betas.iter().all(|&b| b > 0.0 && b < 1.0), "{sched:?} {t}");
                for w in s.alphas_cumprod.windows(2) {
                    assert!(w[1] < w[0], "{sched:?} T={t}: ac not strictly decreasing");
                }
                assert_eq!(s.posterior_variance[0], 0.0);
                assert_eq!(s.alphas_cumprod_prev[0], 1.0);
                assert_eq!(s.alphas_cumprod_next[t - 1], 0.0);
                assert_eq!(
                    s.posterior_log_variance_clipped[0],
                    s.posterior_log_variance_clipped[1]
                );
                assert_eq!(s.fixed_large_variance[0], s.posterior_variance[1]);
                // The posterior variance is a weighted version of beta and never exceeds it.
                for i in 0..t {
                    assert!(s.posterior_variance[i] <= s.betas[i]);
                    assert!(s.posterior_log_variance_clipped[i].is_finite());
                }
            }
        }
    }

    #[test]
    fn cosine_caps_last_beta() {
        let b = cosine_betas(1000, COSINE_S, COSINE_MAX_BETA);
        assert_eq!(b[999], 0.999);
        let s = NoiseSchedule::from_betas(b).unwrap();
        assert!(s.alphas_cumprod[999] > 1e-9 && s.alphas_cumprod[999] < 1e-8);
    }

    #[test]
    fn hand_checked_two_step_schedule() {
        let s = NoiseSchedule::from_betas(vec![0.5, 0.5]).unwrap();
        assert_eq!(s.alphas_cumprod, vec![0.5, 0.25]);
        // pv[1] = 0.5 * (1 - 0.5) / (1 - 0.25) = 1/3
        assert!((s.posterior_variance[1] - 1.0 / 3.0).abs() < 1e-15);
        // coef1[1] = 0.5 * sqrt(0.5) / 0.75, coef2[1] = 0.5 * sqrt(0.5) / 0.75
        let c = 0.5 * 0.5f64.sqrt() / 0.75;
        assert!((s.posterior_mean_coef1[1] - c).abs() < 1e-15);
        assert!((s.posterior_mean_coef2[1] - c).abs() < 1e-15);
        // At t = 0 the posterior is the data itself: coef1 = 1, coef2 = 0.
        assert!((s.posterior_mean_coef1[0] - 1.0).abs() < 1e-15);
        assert_eq!(s.posterior_mean_coef2[0], 0.0);
    }

    #[test]
    fn invalid_schedules_are_rejected() {
        assert!(NoiseSchedule::from_betas(vec![]).is_err());
        assert!(NoiseSchedule::from_betas(vec![0.1]).is_err());
        assert!(NoiseSchedule::from_betas(vec![0.1, 0.0]).is_err());
        assert!(NoiseSchedule::from_betas(vec![0.1, 1.0]).is_err());
        assert!(NoiseSchedule::from_betas(vec![0.1, -0.2]).is_err());
        assert!(NoiseSchedule::from_betas(vec![0.1, f64::NAN]).is_err());
        assert!(NoiseSchedule::new(&BetaSchedule::Custom(vec![0.1, 0.2]), 3).is_err());
        assert!(NoiseSchedule::new(&BetaSchedule::Linear, 0).is_err());
        // improved-diffusion's 1000/T scaling pushes the last linear beta to 2.0 at T = 10.
        assert!(NoiseSchedule::new(&BetaSchedule::Linear, 10).is_err());
        let s = NoiseSchedule::new(&BetaSchedule::Cosine, 10).unwrap();
        assert!(s.check_timesteps(&[0, 9]).is_ok());
        assert!(s.check_timesteps(&[10]).is_err());
    }

    #[test]
    fn serde_names() {
        use serde::de::value::{Error, StrDeserializer};
        let de = |name: &str| BetaSchedule::deserialize(StrDeserializer::<Error>::new(name));
        assert_eq!(de("linear").unwrap(), BetaSchedule::Linear);
        assert_eq!(de("cosine").unwrap(), BetaSchedule::Cosine);
        assert!(de("quadratic").is_err());
    }
}
