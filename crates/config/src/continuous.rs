//! `[diffusion] time = "continuous"`: the continuous-time (VDM) process a config describes, and
//! its validation. The keys are optional and left out of the serialised config when unset, so
//! configs written before they existed hash the same.

use ddpm_diffusion::vdm::{FixedGamma, DEFAULT_GAMMA_MAX, DEFAULT_GAMMA_MIN};
use ddpm_diffusion::NoiseSchedule;
use serde::{Deserialize, Serialize};

use crate::{
    invalid, ConfigError, DiffusionConfig, Loss, Prediction, Schedule, Task, TimestepSampling,
    Variance,
};

/// Discrete timesteps (improved-diffusion, the default) or continuous time t in [0, 1] (VDM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeKind {
    #[default]
    Discrete,
    Continuous,
}

impl TimeKind {
    pub fn is_discrete(&self) -> bool {
        *self == TimeKind::Discrete
    }
}

/// The width VDM gives the learned schedule's hidden layer.
pub const DEFAULT_SCHEDULE_HIDDEN: usize = 1024;

/// The schedule of a continuous-time run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ContinuousSchedule {
    Fixed(FixedGamma),
    /// VDM's monotone network with `hidden` units, starting from linear log-SNR between the ends.
    Learned {
        hidden: usize,
    },
}

/// Everything the trainer, sampler and evaluator need to know about a continuous-time process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContinuousSpec {
    pub schedule: ContinuousSchedule,
    /// The initial (fixed: the) endpoints `gamma(0)`, `gamma(1)`. The network is conditioned on
    /// `1000 (gamma - gamma_min) / (gamma_max - gamma_min)`, the noise level on the scale of
    /// discrete timesteps, so it sees the same input range whatever the schedule.
    pub gamma_min: f64,
    pub gamma_max: f64,
}

impl ContinuousSpec {
    /// The U-Net's conditioning value for noise level `gamma`.
    pub fn model_input(&self, gamma: f64) -> f64 {
        1000.0 * (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
    }

    /// The fixed schedule that starts a run (for "learned": linear log-SNR, its initial shape).
    pub fn initial_fixed(&self) -> FixedGamma {
        match self.schedule {
            ContinuousSchedule::Fixed(f) => f,
            ContinuousSchedule::Learned { .. } => FixedGamma::LinearLogSnr {
                gamma_min: self.gamma_min,
                gamma_max: self.gamma_max,
            },
        }
    }
}

impl DiffusionConfig {
    /// The continuous-time process, when `time = "continuous"`.
    pub fn continuous(&self) -> Option<ContinuousSpec> {
        if self.time.is_discrete() {
            return None;
        }
        let gamma_min = self.gamma_min.unwrap_or(DEFAULT_GAMMA_MIN);
        let gamma_max = self.gamma_max.unwrap_or(DEFAULT_GAMMA_MAX);
        let schedule = match self.schedule {
            Schedule::Linear => ContinuousSchedule::Fixed(FixedGamma::LinearLogSnr {
                gamma_min,
                gamma_max,
            }),
            Schedule::Cosine => ContinuousSchedule::Fixed(FixedGamma::Cosine {
                gamma_min,
                gamma_max,
            }),
            Schedule::Learned => ContinuousSchedule::Learned {
                hidden: self.schedule_hidden.unwrap_or(DEFAULT_SCHEDULE_HIDDEN),
            },
        };
        Some(ContinuousSpec {
            schedule,
            gamma_min,
            gamma_max,
        })
    }

    /// A `timesteps`-step discrete process on the (initial) continuous schedule,
    /// `alphas_cumprod[i] = sigmoid(-gamma((i + 1) / T))`. Only bookkeeping uses it (table sizes);
    /// continuous-time runs train, sample and evaluate with `ddpm_diffusion::vdm`.
    pub(crate) fn continuous_tables(
        &self,
        spec: &ContinuousSpec,
    ) -> ddpm_diffusion::Result<NoiseSchedule> {
        let f = spec.initial_fixed();
        f.validate()?;
        let n = self.timesteps;
        let ac: Vec<f64> = (0..=n)
            .map(|i| ddpm_diffusion::vdm::alpha2(f.gamma(i as f64 / n as f64)))
            .collect();
        NoiseSchedule::from_betas((1..=n).map(|i| 1.0 - ac[i] / ac[i - 1]).collect())
    }

    /// The checks specific to the time axis: which keys go with which `time`.
    pub(crate) fn validate_time(&self, task: Task) -> Result<(), ConfigError> {
        let Some(spec) = self.continuous() else {
            for (key, set) in [
                ("diffusion.gamma_min", self.gamma_min.is_some()),
                ("diffusion.gamma_max", self.gamma_max.is_some()),
                ("diffusion.schedule_hidden", self.schedule_hidden.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "is only used with diffusion.time = \"continuous\"",
                    ));
                }
            }
            if self.schedule == Schedule::Learned {
                return Err(invalid(
                    "diffusion.schedule",
                    "= \"learned\" needs diffusion.time = \"continuous\"",
                ));
            }
            return Ok(());
        };
        let needs = |key: &str, what: &str| {
            invalid(
                key,
                format!("must be {what} with diffusion.time = \"continuous\""),
            )
        };
        if task != Task::Diffusion {
            return Err(needs("task", "\"diffusion\""));
        }
        if self.prediction != Prediction::Eps {
            return Err(needs("diffusion.prediction", "\"eps\""));
        }
        if self.variance != Variance::FixedSmall {
            return Err(needs("diffusion.variance", "\"fixed_small\" (the default)"));
        }
        if self.loss != Loss::Vlb {
            return Err(needs(
                "diffusion.loss",
                "\"vlb\" (the continuous-time ELBO is what it trains)",
            ));
        }
        if self.timestep_sampling != TimestepSampling::Uniform {
            return Err(needs(
                "diffusion.timestep_sampling",
                "\"uniform\" (times are low-discrepancy)",
            ));
        }
        if self.min_snr_gamma.is_some() {
            return Err(needs("diffusion.min_snr_gamma", "unset"));
        }
        if !(spec.gamma_min.is_finite()
            && spec.gamma_max.is_finite()
            && spec.gamma_min < spec.gamma_max)
        {
            return Err(invalid(
                "diffusion.gamma_min",
                format!(
                    "must be finite and below diffusion.gamma_max, got {} and {}",
                    spec.gamma_min, spec.gamma_max
                ),
            ));
        }
        if let ContinuousSchedule::Learned { hidden } = spec.schedule {
            if !(1..=65536).contains(&hidden) {
                return Err(invalid(
                    "diffusion.schedule_hidden",
                    format!("must be in 1..=65536, got {hidden}"),
                ));
            }
        } else if self.schedule_hidden.is_some() {
            return Err(invalid(
                "diffusion.schedule_hidden",
                "is only used with schedule = \"learned\"",
            ));
        }
        Ok(())
    }
}
