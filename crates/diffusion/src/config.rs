//! The `[diffusion]` table shared by the trainer and the sampler, so both build the same process.

use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};
use crate::gaussian_diffusion::{GaussianDiffusion, LossType, ModelMeanType, ModelVarType};
use crate::schedule::{BetaSchedule, NoiseSchedule};

/// Defaults follow improved-diffusion's (linear schedule, 1000 steps, eps prediction, fixed-large
/// variance, MSE, no timestep rescaling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    pub beta_schedule: BetaSchedule,
    pub num_timesteps: usize,
    pub mean_type: ModelMeanType,
    pub var_type: ModelVarType,
    pub loss_type: LossType,
    pub rescale_timesteps: bool,
    pub min_snr_gamma: Option<f64>,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            beta_schedule: BetaSchedule::Linear,
            num_timesteps: 1000,
            mean_type: ModelMeanType::Epsilon,
            var_type: ModelVarType::FixedLarge,
            loss_type: LossType::Mse,
            rescale_timesteps: false,
            min_snr_gamma: None,
        }
    }
}

impl DiffusionConfig {
    /// Checks the combination and builds the full (training) process.
    pub fn build(&self) -> Result<GaussianDiffusion> {
        if self.min_snr_gamma.is_some()
            && matches!(self.loss_type, LossType::Kl | LossType::RescaledKl)
        {
            return Err(DiffusionError::InvalidUse(
                "min_snr_gamma weights the MSE term and cannot be used with a KL loss".into(),
            ));
        }
        let schedule = NoiseSchedule::new(&self.beta_schedule, self.num_timesteps)?;
        GaussianDiffusion::new(schedule, self.mean_type, self.var_type, self.loss_type)
            .with_rescale_timesteps(self.rescale_timesteps)
            .with_min_snr_gamma(self.min_snr_gamma)
    }

    /// The process for sampling with a `timestep_respacing` string ("" or "full" keeps every step).
    pub fn build_respaced(&self, section_counts: &str) -> Result<GaussianDiffusion> {
        let d = self.build()?;
        match section_counts.trim() {
            "" | "full" => Ok(d),
            s => d.respace(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_builds_and_respaces() {
        let d = DiffusionConfig::default().build().unwrap();
        assert_eq!(d.num_timesteps(), 1000);
        let r = DiffusionConfig::default().build_respaced("ddim50").unwrap();
        assert_eq!(r.num_timesteps(), 50);
        assert_eq!(r.timestep_map[1], 20);
        assert_eq!(r.model_timesteps(&[49]).unwrap(), vec![980.0]);
        let bad = DiffusionConfig {
            min_snr_gamma: Some(-1.0),
            ..Default::default()
        };
        assert!(bad.build().is_err());
    }
}
