//! The run configuration schema: a TOML file, `--set key.path=value` overrides, defaults,
//! validation, and the config hash that checkpoints carry.
//!
//! One schema for every reader: the trainer parses it from the user's file, writes it resolved
//! into each checkpoint manifest, and the sampler and evaluator read that copy back with the same
//! types and defaults (`ddpm_checkpoint::Checkpoint::config`), so a checkpoint cannot be read with
//! other defaults than the ones it was written with.
//!
//! Every value is checked before any work starts (no dataset is opened, no model is built) and a
//! bad value is reported with its dotted key, e.g. `optim.lr must be > 0, got -1`. Unknown keys
//! are errors (every table denies unknown fields): a typo must not silently fall back to a default.

use std::fmt;
use std::path::{Path, PathBuf};

use ddpm_diffusion::GaussianDiffusion;
use serde::{Deserialize, Serialize};

pub use ddpm_unet::{EncoderUNetConfig, UNetConfig};

mod continuous;
mod distill;
mod hash;

pub use continuous::{ContinuousSchedule, ContinuousSpec, TimeKind, DEFAULT_SCHEDULE_HIDDEN};
pub use distill::{DistillConfig, DistillWeighting};

/// Keys left out of the config hash: they change what is logged, saved or previewed, or where, but
/// not the training trajectory, so a run may be resumed with different values. `data.batch` is the
/// per-rank batch: what matters for the trajectory is the global batch (ranks x per-rank batch),
/// which resume checks separately, so a run may continue on a different number of ranks.
pub const HASH_EXCLUDED_KEYS: &[&str] = &[
    "schedule",
    "preview",
    "out_dir",
    "data.prefetch",
    "data.batch",
];

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// A value failed validation; `key` is the dotted path.
    #[error("{key} {msg}")]
    Invalid { key: String, msg: String },
    #[error("{0}")]
    Parse(String),
}

/// Re-keys an error of a nested config's own validation (`num_heads ...` -> `model.num_heads ...`).
fn prefixed(table: &str, e: ddpm_unet::UNetError) -> ConfigError {
    match e {
        ddpm_unet::UNetError::Config { field, message } => ConfigError::Invalid {
            key: format!("{table}.{field}"),
            msg: message,
        },
        other => ConfigError::Invalid {
            key: table.to_string(),
            msg: format!("is invalid: {other}"),
        },
    }
}

fn invalid(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        msg: msg.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Train the denoising U-Net.
    #[default]
    Diffusion,
    /// Train a noise-aware classifier (`ddpm_unet::EncoderUNet`) on `x_t` for classifier guidance.
    Classifier,
    /// One round of progressive distillation (the `[distill]` table): a student U-Net, initialised
    /// from the teacher, learns to do in one DDIM step what the teacher does in two.
    Distill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Linear,
    Cosine,
    /// VDM's learned monotone schedule (`time = "continuous"` only).
    Learned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    #[default]
    Eps,
    V,
    X0,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Variance {
    #[default]
    FixedSmall,
    FixedLarge,
    LearnedRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// L_simple: MSE on the prediction target (Ho et al.).
    #[default]
    Simple,
    /// L_simple + lambda L_vlb with learned-range variance (Nichol & Dhariwal; improved-diffusion's RESCALED_MSE).
    Hybrid,
    /// The variational bound only (improved-diffusion's RESCALED_KL).
    Vlb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSampling {
    #[default]
    Uniform,
    /// improved-diffusion's LossSecondMomentResampler.
    LossAware,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default = "d_timesteps")]
    pub timesteps: usize,
    #[serde(default)]
    pub prediction: Prediction,
    #[serde(default)]
    pub variance: Variance,
    #[serde(default)]
    pub loss: Loss,
    #[serde(default)]
    pub timestep_sampling: TimestepSampling,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023); absent = off.
    #[serde(default)]
    pub min_snr_gamma: Option<f64>,
    /// Probability of replacing a label by the null class (classifier-free guidance training).
    #[serde(default)]
    pub label_dropout: f64,
    /// task = "classifier" only: `false` trains on clean images (t = 0 for every example), as
    /// guided-diffusion's `--noised False`: the classifier that evaluates samples (`ddpm-eval fid`
    /// runs it at t = 0) is more accurate when it spends no capacity on noise. Guidance needs the
    /// default, a noise-aware classifier. Not serialised when true, so older configs hash the same.
    #[serde(default = "d_true", skip_serializing_if = "is_true")]
    pub classifier_noised: bool,
    /// `"discrete"` (default) or `"continuous"` (VDM, see `continuous.rs`). Not serialised when
    /// discrete, and the three keys below not when unset, so older configs hash the same.
    #[serde(default, skip_serializing_if = "TimeKind::is_discrete")]
    pub time: TimeKind,
    /// Continuous time: `gamma(0)` (-13.3), the lowest noise level (log-SNR 13.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma_min: Option<f64>,
    /// Continuous time: `gamma(1)` (5), the highest noise level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma_max: Option<f64>,
    /// `schedule = "learned"`: hidden units of the monotone network (1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_hidden: Option<usize>,
}

fn d_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            schedule: Schedule::Linear,
            timesteps: 1000,
            prediction: Prediction::Eps,
            variance: Variance::FixedSmall,
            loss: Loss::Simple,
            timestep_sampling: TimestepSampling::Uniform,
            min_snr_gamma: None,
            label_dropout: 0.0,
            classifier_noised: true,
            time: TimeKind::Discrete,
            gamma_min: None,
            gamma_max: None,
            schedule_hidden: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// HDF5 file written by `ddpm-data convert`.
    pub path: PathBuf,
    /// Examples per rank per step (global batch = batch * world size).
    pub batch: usize,
    /// Random horizontal flips.
    #[serde(default)]
    pub flip: bool,
    /// Batches prepared ahead by the loader thread.
    #[serde(default = "d_prefetch")]
    pub prefetch: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    #[serde(default = "d_betas")]
    pub betas: [f64; 2],
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Maximum global gradient norm; absent = no clipping.
    #[serde(default)]
    pub grad_clip: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    #[serde(default = "d_ema_rates")]
    pub rates: Vec<f64>,
    /// Use `min(rate, (1+n)/(10+n))` so short runs get a useful average early.
    #[serde(default)]
    pub warmup: bool,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            rates: d_ema_rates(),
            warmup: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub total_steps: u64,
    #[serde(default = "d_log_every")]
    pub log_every: u64,
    #[serde(default = "d_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Preview samples every this many steps; 0 = only at the end.
    #[serde(default)]
    pub sample_every: u64,
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    /// Stop with an error after this many consecutive non-finite steps (loss or gradient NaN/inf;
    /// such steps are skipped). Checkpoints written while steps are non-finite prune nothing, so
    /// the ones from before the blow-up are kept.
    #[serde(default = "d_max_nonfinite")]
    pub max_nonfinite_steps: u64,
}

/// The preview sample grid written during and after training (not the full sampler: that is
/// `ddpm-sample`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewConfig {
    /// DDIM steps on a respaced schedule.
    #[serde(default = "d_preview_steps")]
    pub steps: usize,
    /// Images per class (or in total for unconditional models).
    #[serde(default = "d_per_class")]
    pub per_class: usize,
    #[serde(default)]
    pub eta: f64,
    /// Classifier-free guidance scale w (eps = (1+w) eps_cond - w eps_uncond); needs label_dropout > 0.
    #[serde(default)]
    pub guidance: f64,
    /// Which EMA rate to sample with; absent = the first in `ema.rates`.
    #[serde(default)]
    pub ema_rate: Option<f64>,
}

impl Default for PreviewConfig {
    fn default() -> Self {
        Self {
            steps: d_preview_steps(),
            per_class: d_per_class(),
            eta: 0.0,
            guidance: 0.0,
            ema_rate: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default)]
    pub task: Task,
    #[serde(default)]
    pub seed: u64,
    /// Run directory (checkpoints, metrics, pictures); `--out` overrides.
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// The denoising U-Net (task = "diffusion").
    #[serde(default)]
    pub model: Option<UNetConfig>,
    /// The noise-aware classifier (task = "classifier").
    #[serde(default)]
    pub classifier: Option<EncoderUNetConfig>,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    #[serde(default)]
    pub ema: EmaConfig,
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub preview: PreviewConfig,
    /// Data-parallel settings; absent = defaults (not serialised then, so older configs hash the same).
    #[serde(default, skip_serializing_if = "DistConfig::is_default")]
    pub dist: DistConfig,
    /// How one optimizer step is computed; absent = defaults (not serialised then, so older configs
    /// hash the same).
    #[serde(default, skip_serializing_if = "StepConfig::is_default")]
    pub train: StepConfig,
    /// task = "distill" only (see `distill.rs`); not serialised when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

/// How one optimizer step is computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Gradient accumulation: each rank runs `accumulate` micro-batches of `data.batch` examples
    /// (forward and backward each) and averages their gradients before the one all-reduce and
    /// optimizer update of the step. The global batch is `ranks x accumulate x data.batch`, and the
    /// step computes what one batch of `accumulate x data.batch` per rank would, up to summation
    /// order: the same examples, timesteps, noise and dropout (see `TrainLoop::forward_backward`).
    #[serde(default = "d_accumulate")]
    pub accumulate: usize,
    /// With 2+ compute threads, split each micro-batch into one equal shard per thread and run
    /// the shards' forward and backward side by side, each on its own thread (as single-thread
    /// data-parallel ranks would, without their processes), then average their gradients. It
    /// computes what `accumulate` does with that many more micro-batches (same examples,
    /// timesteps, noise and dropout), and keeps both cores busy through the serial parts of
    /// candle's autograd. Off, when the micro-batch does not split evenly, or for models of more
    /// than 20M parameters (where repeating the per-parameter work in every shard costs more
    /// than it saves): one pass over the whole micro-batch with every op threaded.
    #[serde(default = "d_thread_shards")]
    pub thread_shards: bool,
    /// The dtype of the forward and backward pass. The parameters, their gradients, the optimizer
    /// state, the EMAs and the checkpoints stay f32 in either case.
    #[serde(default)]
    pub precision: Precision,
}

/// Compute precision of the training step (`train.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision as PyTorch's bf16 autocast: convolutions, matrix products and element-wise
    /// ops run on bf16 copies of the f32 master weights; GroupNorm statistics, softmax, the loss
    /// (and the VDM schedule) are computed in f32.
    Bf16,
}

fn d_accumulate() -> usize {
    1
}

fn d_thread_shards() -> bool {
    true
}

impl Default for StepConfig {
    fn default() -> Self {
        Self {
            accumulate: d_accumulate(),
            thread_shards: d_thread_shards(),
            precision: Precision::default(),
        }
    }
}

impl StepConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// How gradients travel between ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// Gradient bucket size in MiB: each step all-reduces the gradients packed into buckets of
    /// at most this size. Large buckets amortise per-call latency (NCCL, networks); on one host
    /// OpenMPI was faster with smaller ones (bench/RESULTS.md).
    #[serde(default = "d_bucket_mb")]
    pub bucket_mb: f64,
    /// Seconds one collective may wait for the other ranks before the job ends with an error
    /// naming the ranks that did not arrive (a stalled rank would otherwise hang the job).
    #[serde(default = "d_timeout_s")]
    pub timeout_s: f64,
}

fn d_bucket_mb() -> f64 {
    25.0
}
fn d_timeout_s() -> f64 {
    ddpm_dist::DEFAULT_TIMEOUT_S
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            bucket_mb: d_bucket_mb(),
            timeout_s: d_timeout_s(),
        }
    }
}

impl DistConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The bucket size in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * 1024.0 * 1024.0) as usize
    }
}

fn d_timesteps() -> usize {
    1000
}
fn d_prefetch() -> usize {
    2
}
fn d_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn d_eps() -> f64 {
    1e-8
}
fn d_ema_rates() -> Vec<f64> {
    vec![0.9999]
}
fn d_log_every() -> u64 {
    100
}
fn d_checkpoint_every() -> u64 {
    5000
}
fn d_keep() -> usize {
    3
}
fn d_max_nonfinite() -> u64 {
    100
}
fn d_preview_steps() -> usize {
    50
}
fn d_per_class() -> usize {
    8
}

impl Variance {
    pub fn name(self) -> &'static str {
        match self {
            Variance::FixedSmall => "fixed_small",
            Variance::FixedLarge => "fixed_large",
            Variance::LearnedRange => "learned_range",
        }
    }
}

impl DiffusionConfig {
    /// The full (training) diffusion process this table describes; trainer, sampler and
    /// evaluator all build it here.
    pub fn build(&self) -> ddpm_diffusion::Result<GaussianDiffusion> {
        use ddpm_diffusion::{BetaSchedule, LossType, ModelMeanType, ModelVarType, NoiseSchedule};
        let schedule = match (self.schedule, self.continuous()) {
            (_, Some(spec)) => BetaSchedule::Custom(self.continuous_tables(&spec)?.betas),
            (Schedule::Linear, None) => BetaSchedule::Linear,
            (Schedule::Cosine, None) => BetaSchedule::Cosine,
            (Schedule::Learned, None) => {
                return Err(ddpm_diffusion::DiffusionError::InvalidSchedule(
                    "schedule = \"learned\" needs time = \"continuous\"".into(),
                ))
            }
        };
        let mean = match self.prediction {
            Prediction::Eps => ModelMeanType::Epsilon,
            Prediction::V => ModelMeanType::V,
            Prediction::X0 => ModelMeanType::StartX,
        };
        let var = match self.variance {
            Variance::FixedSmall => ModelVarType::FixedSmall,
            Variance::FixedLarge => ModelVarType::FixedLarge,
            Variance::LearnedRange => ModelVarType::LearnedRange,
        };
        let loss = match self.loss {
            Loss::Simple => LossType::Mse,
            Loss::Hybrid => LossType::RescaledMse,
            Loss::Vlb => LossType::RescaledKl,
        };
        let s = NoiseSchedule::new(&schedule, self.timesteps)?;
        GaussianDiffusion::new(s, mean, var, loss).with_min_snr_gamma(self.min_snr_gamma)
    }
}

/// Command-line changes applied on top of the file, in this order: `--set`s, then the plain flags.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub sets: Vec<String>,
    pub steps: Option<u64>,
    pub batch: Option<usize>,
    pub out: Option<PathBuf>,
}

impl TrainConfig {
    /// Reads, overrides and validates a config file.
    pub fn load(path: &Path, ov: &Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Parse(format!("cannot read config {}: {e}", path.display()))
        })?;
        Self::from_toml_str(&text, ov).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            ConfigError::Invalid { key, msg } => ConfigError::Invalid {
                key,
                msg: format!("{msg} (config {})", path.display()),
            },
        })
    }

    pub fn from_toml_str(text: &str, ov: &Overrides) -> Result<Self, ConfigError> {
        // Parse the file on its own first so its errors point at its own lines.
        let mut cfg: TrainConfig =
            toml::from_str(text).map_err(|e| describe_toml_error(text, &e, ""))?;
        if !ov.sets.is_empty() {
            let mut table: toml::Table =
                toml::from_str(text).map_err(|e| describe_toml_error(text, &e, ""))?;
            for s in &ov.sets {
                apply_set(&mut table, s)?;
            }
            // Re-render so deserialisation errors carry a position, hence a key name.
            let merged = toml::to_string(&table).map_err(|e| ConfigError::Parse(e.to_string()))?;
            cfg = toml::from_str(&merged)
                .map_err(|e| describe_toml_error(&merged, &e, "after --set overrides: "))?;
        }
        if let Some(s) = ov.steps {
            cfg.schedule.total_steps = s;
        }
        if let Some(b) = ov.batch {
            cfg.data.batch = b;
        }
        if let Some(o) = &ov.out {
            cfg.out_dir = Some(o.clone());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn out_dir(&self) -> &Path {
        self.out_dir.as_deref().expect("validated")
    }

    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let num_classes = self.validate_networks()?;
        self.validate_diffusion(num_classes)?;
        self.validate_data()?;
        self.validate_optim()?;
        self.validate_ema()?;
        self.validate_schedule()?;
        self.validate_preview()?;
        self.validate_distill()?;
        self.validate_out_dir()
    }

    /// The network table the task needs (and no other); returns the number of classes.
    fn validate_networks(&self) -> Result<Option<usize>, ConfigError> {
        let num_classes = match (self.task, &self.model, &self.classifier) {
            (Task::Diffusion, None, _) => {
                return Err(invalid(
                    "model",
                    "table is missing (needed for task = \"diffusion\")",
                ))
            }
            (Task::Diffusion, Some(_), Some(_)) => {
                return Err(invalid(
                    "classifier",
                    "table is only used with task = \"classifier\"; remove it",
                ))
            }
            (Task::Classifier, _, None) => {
                return Err(invalid(
                    "classifier",
                    "table is missing (needed for task = \"classifier\")",
                ))
            }
            (Task::Classifier, Some(_), _) => {
                return Err(invalid(
                    "model",
                    "table is only used with task = \"diffusion\"; remove it",
                ))
            }
            (Task::Diffusion, Some(m), None) => {
                m.validate().map_err(|e| prefixed("model", e))?;
                m.num_classes
            }
            (Task::Classifier, None, Some(c)) => {
                c.validate().map_err(|e| prefixed("classifier", e))?;
                Some(c.num_classes)
            }
            (Task::Distill, _, Some(_)) => {
                return Err(invalid(
                    "classifier",
                    "table is only used with task = \"classifier\"; remove it",
                ))
            }
            // ddpm-train copies the teacher's [model] in before validating (crates/train/src/distill.rs)
            (Task::Distill, None, None) => {
                return Err(invalid(
                    "model",
                    "table is missing (task = \"distill\" takes the teacher's; run through ddpm-train --teacher)",
                ))
            }
            (Task::Distill, Some(m), None) => {
                m.validate().map_err(|e| prefixed("model", e))?;
                m.num_classes
            }
        };
        Ok(num_classes)
    }

    /// `[diffusion]`, against the network and the task.
    fn validate_diffusion(&self, num_classes: Option<usize>) -> Result<(), ConfigError> {
        let d = &self.diffusion;
        if d.timesteps < 2 || d.timesteps > 100_000 {
            return Err(invalid(
                "diffusion.timesteps",
                format!("must be in 2..=100000, got {}", d.timesteps),
            ));
        }
        d.validate_time(self.task)?;
        let learned = d.variance == Variance::LearnedRange;
        if let Some(m) = &self.model {
            if learned != m.learn_sigma {
                return Err(invalid(
                    "model.learn_sigma",
                    format!(
                        "must be {learned} when diffusion.variance = \"{}\" (the model outputs the variance only when it is learned)",
                        d.variance.name()
                    ),
                ));
            }
        }
        if d.loss == Loss::Hybrid && !learned {
            return Err(invalid(
                "diffusion.loss",
                "= \"hybrid\" needs diffusion.variance = \"learned_range\" (the vlb term trains the variance)",
            ));
        }
        if let Some(g) = d.min_snr_gamma {
            if !(g.is_finite() && g > 0.0) {
                return Err(invalid(
                    "diffusion.min_snr_gamma",
                    format!("must be > 0, got {g}"),
                ));
            }
            if d.loss == Loss::Vlb {
                return Err(invalid(
                    "diffusion.min_snr_gamma",
                    "weights the MSE term and cannot be used with loss = \"vlb\"",
                ));
            }
        }
        if let Err(e) = d.build() {
            return Err(invalid(
                "diffusion",
                format!(
                    "does not give a valid process (schedule = \"{}\", timesteps = {}): {e}",
                    d.schedule, d.timesteps
                ),
            ));
        }
        if !(0.0..1.0).contains(&d.label_dropout) {
            return Err(invalid(
                "diffusion.label_dropout",
                format!("must be in [0, 1), got {}", d.label_dropout),
            ));
        }
        if !d.classifier_noised && self.task != Task::Classifier {
            return Err(invalid(
                "diffusion.classifier_noised",
                "= false is only meaningful with task = \"classifier\"",
            ));
        }
        if d.label_dropout > 0.0 && (num_classes.is_none() || self.task == Task::Classifier) {
            return Err(invalid(
                "diffusion.label_dropout",
                "> 0 needs a class-conditional diffusion model (model.num_classes)",
            ));
        }
        Ok(())
    }

    /// `[data]` and `[dist]`.
    fn validate_data(&self) -> Result<(), ConfigError> {
        if self.data.path.as_os_str().is_empty() {
            return Err(invalid("data.path", "must not be empty"));
        }
        if !(self.dist.bucket_mb.is_finite() && self.dist.bucket_mb >= 0.001) {
            return Err(invalid(
                "dist.bucket_mb",
                format!("must be at least 0.001 MiB, got {}", self.dist.bucket_mb),
            ));
        }
        if let Err(m) = ddpm_dist::validate_timeout_s(self.dist.timeout_s) {
            return Err(invalid("dist.timeout_s", m));
        }
        if self.train.accumulate == 0 || self.train.accumulate > 4096 {
            return Err(invalid(
                "train.accumulate",
                format!("must be in 1..=4096, got {}", self.train.accumulate),
            ));
        }
        if self.data.batch.saturating_mul(self.train.accumulate) > 65_536 {
            return Err(invalid(
                "train.accumulate",
                format!(
                    "data.batch x train.accumulate = {} x {} exceeds 65536 examples per rank and step",
                    self.data.batch, self.train.accumulate
                ),
            ));
        }
        if self.data.batch == 0 || self.data.batch > 65_536 {
            return Err(invalid(
                "data.batch",
                format!("must be in 1..=65536, got {}", self.data.batch),
            ));
        }
        if self.data.prefetch > 1024 {
            return Err(invalid(
                "data.prefetch",
                format!("must be <= 1024, got {}", self.data.prefetch),
            ));
        }
        Ok(())
    }

    /// `[optim]`.
    fn validate_optim(&self) -> Result<(), ConfigError> {
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(invalid("optim.lr", format!("must be > 0, got {}", o.lr)));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(invalid(
                    &format!("optim.betas[{i}]"),
                    format!("must be in [0, 1), got {b}"),
                ));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(invalid("optim.eps", format!("must be > 0, got {}", o.eps)));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(invalid(
                "optim.weight_decay",
                format!("must be >= 0, got {}", o.weight_decay),
            ));
        }
        if o.lr * o.weight_decay >= 1.0 {
            return Err(invalid(
                "optim.weight_decay",
                format!(
                    "times optim.lr must be < 1 (decay factor 1 - lr*wd), got {}",
                    o.lr * o.weight_decay
                ),
            ));
        }
        if let Some(c) = o.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(invalid("optim.grad_clip", format!("must be > 0, got {c}")));
            }
        }
        Ok(())
    }

    /// `[ema]`.
    fn validate_ema(&self) -> Result<(), ConfigError> {
        if self.ema.rates.is_empty() {
            return Err(invalid("ema.rates", "must list at least one rate"));
        }
        for (i, r) in self.ema.rates.iter().enumerate() {
            if !(r.is_finite() && *r > 0.0 && *r < 1.0) {
                return Err(invalid(
                    &format!("ema.rates[{i}]"),
                    format!("must be in (0, 1), got {r}"),
                ));
            }
            if self.ema.rates[..i].contains(r) {
                return Err(invalid(
                    &format!("ema.rates[{i}]"),
                    format!("duplicates rate {r}"),
                ));
            }
        }
        Ok(())
    }

    /// `[schedule]`.
    fn validate_schedule(&self) -> Result<(), ConfigError> {
        let s = &self.schedule;
        if s.total_steps == 0 {
            return Err(invalid("schedule.total_steps", "must be >= 1, got 0"));
        }
        if s.total_steps > u32::MAX as u64 {
            // The RNG counter holds the step in 32 bits.
            return Err(invalid(
                "schedule.total_steps",
                format!("must be < 2^32, got {}", s.total_steps),
            ));
        }
        if s.log_every == 0 {
            return Err(invalid("schedule.log_every", "must be >= 1, got 0"));
        }
        if s.checkpoint_every == 0 {
            return Err(invalid("schedule.checkpoint_every", "must be >= 1, got 0"));
        }
        if s.keep_checkpoints == 0 {
            return Err(invalid("schedule.keep_checkpoints", "must be >= 1, got 0"));
        }
        if s.max_nonfinite_steps == 0 {
            return Err(invalid(
                "schedule.max_nonfinite_steps",
                "must be >= 1, got 0",
            ));
        }
        Ok(())
    }

    /// `[preview]`, against the diffusion process and the EMA rates.
    fn validate_preview(&self) -> Result<(), ConfigError> {
        let d = &self.diffusion;
        let p = &self.preview;
        if p.steps < 2 || p.steps > d.timesteps {
            return Err(invalid(
                "preview.steps",
                format!(
                    "must be in 2..=diffusion.timesteps ({}), got {}",
                    d.timesteps, p.steps
                ),
            ));
        }
        if p.per_class == 0 || p.per_class > 256 {
            return Err(invalid(
                "preview.per_class",
                format!("must be in 1..=256, got {}", p.per_class),
            ));
        }
        if !(p.eta.is_finite() && p.eta >= 0.0) {
            return Err(invalid(
                "preview.eta",
                format!("must be >= 0, got {}", p.eta),
            ));
        }
        if !(p.guidance.is_finite() && p.guidance >= 0.0) {
            return Err(invalid(
                "preview.guidance",
                format!("must be >= 0, got {}", p.guidance),
            ));
        }
        if p.guidance > 0.0 && d.label_dropout == 0.0 {
            return Err(invalid(
                "preview.guidance",
                "> 0 needs a model trained with diffusion.label_dropout > 0",
            ));
        }
        if let Some(r) = p.ema_rate {
            if !self.ema.rates.contains(&r) {
                return Err(invalid(
                    "preview.ema_rate",
                    format!("{r} is not one of ema.rates {:?}", self.ema.rates),
                ));
            }
        }
        Ok(())
    }

    /// `out_dir` (set in the file or with `--out`).
    fn validate_out_dir(&self) -> Result<(), ConfigError> {
        match &self.out_dir {
            None => {
                return Err(invalid(
                    "out_dir",
                    "must be set (in the config or with --out)",
                ))
            }
            Some(p) if p.as_os_str().is_empty() => {
                return Err(invalid("out_dir", "must not be empty"))
            }
            _ => {}
        }
        Ok(())
    }

    /// The config as canonical JSON (keys sorted at every level), the form stored in manifests.
    pub fn canonical_json(&self) -> String {
        canonical(&serde_json::to_value(self).expect("config serialises"))
    }

    /// sha256 of the canonical JSON with [`HASH_EXCLUDED_KEYS`] removed: equal hashes mean the same
    /// training trajectory.
    pub fn hash(&self) -> String {
        let v = serde_json::to_value(self).expect("config serialises");
        hash::config_hash(&v, HASH_EXCLUDED_KEYS)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render config as TOML: {e}\n"))
    }
}

/// Turns a TOML/serde error into `table.key: message (line N)` using the error's position: the key
/// is read from the offending line and the table from the nearest `[header]` above it.
fn describe_toml_error(text: &str, e: &toml::de::Error, prefix: &str) -> ConfigError {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else {
        return ConfigError::Parse(format!("{prefix}{msg}"));
    };
    // An empty span at 0 is the top-level table (e.g. a missing top-level field).
    if span.is_empty() && span.start == 0 {
        return ConfigError::Parse(format!("{prefix}{msg}"));
    }
    // Line numbers of a re-rendered document (after --set) would not match the user's file.
    let show_line = prefix.is_empty();
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .unwrap_or_default();
    let key = if line.starts_with('[') {
        line.trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string()
    } else {
        let k = line
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        // an unknown-field error names the field; prefer it when the line is not a key line
        let k = if k.is_empty() { "" } else { k };
        if table.is_empty() {
            k.to_string()
        } else if k.is_empty() {
            table.clone()
        } else {
            format!("{table}.{k}")
        }
    };
    let at = if show_line {
        format!(" (line {line_no})")
    } else {
        String::new()
    };
    if key.is_empty() {
        ConfigError::Parse(format!("{prefix}{msg}{at}"))
    } else {
        ConfigError::Parse(format!("{prefix}{key}: {msg}{at}"))
    }
}

pub use hash::{canonical, config_hash, parsed_config_hash};

/// Applies `key.path=value`; the value is parsed as a TOML value (`1e-4`, `true`, `[16, 8]`,
/// `"text"`), and a bare word that is not valid TOML is taken as a string (`schedule=cosine`).
pub fn apply_set(table: &mut toml::Table, set: &str) -> Result<(), ConfigError> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| ConfigError::Parse(format!("--set {set:?}: expected key.path=value")))?;
    let key = key.trim();
    let raw = raw.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(ConfigError::Parse(format!(
            "--set {set:?}: bad key {key:?}"
        )));
    }
    if raw.is_empty() {
        return Err(ConfigError::Parse(format!(
            "--set {set:?}: missing value for {key}"
        )));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_)
            if raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c)) =>
        {
            toml::Value::String(raw.to_string())
        }
        Err(e) => {
            return Err(ConfigError::Parse(format!(
                "--set {key}: value {raw:?} is not valid TOML: {}",
                e.message()
            )))
        }
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for (i, p) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| {
            ConfigError::Parse(format!(
                "--set {key}: {} is not a table",
                parts[..=i].join(".")
            ))
        })?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
            Schedule::Learned => "learned",
        })
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Task::Diffusion => "diffusion",
            Task::Classifier => "classifier",
            Task::Distill => "distill",
        })
    }
}
