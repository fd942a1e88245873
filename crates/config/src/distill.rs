//! The `[distill]` table: one round of progressive distillation (Salimans & Ho 2022).
//!
//! The run's `[model]` and `[diffusion]` are the teacher's (ddpm-train copies them in), except that
//! the student predicts v: an eps prediction cannot give x0 at the first step of a few-step sampler,
//! where `alpha_bar` is ~0. What the round is for is read back from here by `ddpm-sample` (DDIM on
//! the `trailing` grid of [`DistillConfig::student_steps`], no x0 clipping) and by the previews.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{invalid, ConfigError, Loss, Prediction, Task, TimestepSampling, TrainConfig};

/// The loss weighting of the student (see `ddpm_diffusion::distill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DistillWeighting {
    /// `max(SNR, 1) ||x - x_hat||^2`, the paper's truncated-SNR weighting.
    #[default]
    TruncatedSnr,
    /// `(SNR + 1) ||x - x_hat||^2 = ||v - v_hat||^2`.
    SnrPlusOne,
}

impl DistillWeighting {
    pub fn to_diffusion(self) -> ddpm_diffusion::DistillWeighting {
        match self {
            Self::TruncatedSnr => ddpm_diffusion::DistillWeighting::TruncatedSnr,
            Self::SnrPlusOne => ddpm_diffusion::DistillWeighting::SnrPlusOne,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The teacher's checkpoint directory. ddpm-train resolves a run directory (`--teacher RUN`) to its
    /// newest valid checkpoint and stores that absolute path, so the config hash pins the teacher and
    /// the manifest records it.
    pub teacher: PathBuf,
    /// N: the teacher's DDIM steps on the trailing grid; the student learns to sample in N / 2.
    pub teacher_steps: usize,
    /// Classifier-free guidance weight w folded into the teacher's targets,
    /// `(1 + w) out_cond - w out_uncond`: the student is then a guided model sampled without `--cfg`.
    /// Needs a class-conditional teacher trained with label dropout.
    #[serde(default)]
    pub guidance: f64,
    /// Which teacher weights: `ema` (the first EMA rate), `ema:RATE` or `model` (parsed by
    /// ddpm-checkpoint's `Weights` when the teacher is loaded).
    #[serde(default = "d_teacher_weights")]
    pub teacher_weights: String,
    #[serde(default)]
    pub weighting: DistillWeighting,
}

fn d_teacher_weights() -> String {
    "ema".into()
}

impl DistillConfig {
    /// The student's DDIM steps: half the teacher's.
    pub fn student_steps(&self) -> usize {
        self.teacher_steps / 2
    }

    /// The `ddpm-sample --steps` spec of the student's grid.
    pub fn student_spec(&self) -> String {
        format!("trailing{}", self.student_steps())
    }

    /// The teacher's grid spec.
    pub fn teacher_spec(&self) -> String {
        format!("trailing{}", self.teacher_steps)
    }
}

impl TrainConfig {
    /// The distillation round this run is, if it is one: its model is a student sampled with DDIM
    /// on `distill.student_spec()` without x0 clipping (its "x0" is a one-step target, not an image).
    pub fn distilled(&self) -> Option<&DistillConfig> {
        match self.task {
            Task::Distill => self.distill.as_ref(),
            _ => None,
        }
    }

    /// `[distill]`, against the task, the process and the network.
    pub(crate) fn validate_distill(&self) -> Result<(), ConfigError> {
        let d = match (self.task, &self.distill) {
            (Task::Distill, Some(d)) => d,
            (Task::Distill, None) => {
                return Err(invalid(
                    "distill",
                    "table is missing (needed for task = \"distill\")",
                ))
            }
            (_, Some(_)) => {
                return Err(invalid(
                    "distill",
                    "table is only used with task = \"distill\"; remove it",
                ))
            }
            (_, None) => return Ok(()),
        };
        if d.teacher.as_os_str().is_empty() {
            return Err(invalid("distill.teacher", "must not be empty"));
        }
        let big_t = self.diffusion.timesteps;
        if d.teacher_steps < 2 || d.teacher_steps % 2 != 0 || d.teacher_steps > big_t {
            return Err(invalid(
                "distill.teacher_steps",
                format!(
                    "must be even and in 2..=diffusion.timesteps ({big_t}), got {}",
                    d.teacher_steps
                ),
            ));
        }
        if !(d.guidance.is_finite() && d.guidance >= 0.0) {
            return Err(invalid(
                "distill.guidance",
                format!("must be >= 0, got {}", d.guidance),
            ));
        }
        let conditional = self.model.as_ref().is_some_and(|m| m.num_classes.is_some());
        if d.guidance > 0.0 && !conditional {
            return Err(invalid(
                "distill.guidance",
                "> 0 needs a class-conditional model (model.num_classes)",
            ));
        }
        let diff = &self.diffusion;
        let rules: [(bool, &str, &str); 4] = [
            (
                diff.prediction == Prediction::V,
                "diffusion.prediction",
                "must be \"v\" for a distilled student (eps cannot give x0 where alpha_bar ~ 0)",
            ),
            (
                diff.loss == Loss::Simple,
                "diffusion.loss",
                "must be \"simple\" with task = \"distill\" (the loss is the distillation MSE)",
            ),
            (
                diff.timestep_sampling == TimestepSampling::Uniform,
                "diffusion.timestep_sampling",
                "must be \"uniform\" with task = \"distill\" (steps are drawn on the student's grid)",
            ),
            (
                diff.min_snr_gamma.is_none(),
                "diffusion.min_snr_gamma",
                "cannot be used with task = \"distill\" (distill.weighting sets the weights)",
            ),
        ];
        for (ok, key, msg) in rules {
            if !ok {
                return Err(invalid(key, msg));
            }
        }
        Ok(())
    }
}
