//! Reading the trainer's checkpoints for sampling and evaluation.
//!
//! The format (names, manifest, format/version checks, file verification) is `ddpm-checkpoint`'s,
//! shared with the writer in ddpm-train. This crate cannot depend on ddpm-train itself (the trainer
//! draws its preview samples with sampler code, so that would be a cycle), hence its own typed view
//! of the stored config: small serde structs for the `model` / `classifier` / `diffusion` / `data`
//! tables that ignore every other key. Files are verified when loaded rather than all at open, so
//! sampling from one EMA does not hash every other weight file of the checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ddpm_checkpoint::CheckpointError;
use ddpm_diffusion::{
    BetaSchedule, GaussianDiffusion, LossType, ModelMeanType, ModelVarType, NoiseSchedule,
};
use ddpm_unet::{EncoderUNet, EncoderUNetConfig, UNet, UNetConfig};
use serde::Deserialize;

use crate::error::{Result, SamplerError};

// Re-exported so that the sampler's callers keep one import path for checkpoint names.
pub use ddpm_checkpoint::{
    ema_file, FileEntry, Manifest, CHECKPOINTS_DIR, FORMAT, FORMAT_VERSION, MANIFEST, MODEL_FILE,
};

fn bad(path: &Path, message: impl Into<String>) -> SamplerError {
    CheckpointError::invalid(path, message).into()
}

/// The `[diffusion]` table of the training config (only what sampling needs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DiffusionSection {
    /// "linear" or "cosine".
    pub schedule: String,
    pub timesteps: usize,
    /// "eps", "v" or "x0".
    pub prediction: String,
    /// "fixed_small", "fixed_large" or "learned_range".
    pub variance: String,
    /// Probability of the null label in training: > 0 means the model knows the null label (CFG).
    pub label_dropout: f64,
}

impl Default for DiffusionSection {
    fn default() -> Self {
        // the trainer's defaults
        Self {
            schedule: "linear".into(),
            timesteps: 1000,
            prediction: "eps".into(),
            variance: "fixed_small".into(),
            label_dropout: 0.0,
        }
    }
}

impl DiffusionSection {
    /// The training process (not respaced).
    pub fn build(&self) -> Result<GaussianDiffusion> {
        let field = |k: &str, v: &str| {
            SamplerError::Config(format!("diffusion.{k} = {v:?} is not supported"))
        };
        let schedule = match self.schedule.as_str() {
            "linear" => BetaSchedule::Linear,
            "cosine" => BetaSchedule::Cosine,
            other => return Err(field("schedule", other)),
        };
        let mean = match self.prediction.as_str() {
            "eps" | "epsilon" => ModelMeanType::Epsilon,
            "v" => ModelMeanType::V,
            "x0" | "start_x" => ModelMeanType::StartX,
            other => return Err(field("prediction", other)),
        };
        let var = match self.variance.as_str() {
            "fixed_small" => ModelVarType::FixedSmall,
            "fixed_large" => ModelVarType::FixedLarge,
            "learned_range" => ModelVarType::LearnedRange,
            other => return Err(field("variance", other)),
        };
        // The trainer's bound: a manifest must not make the schedule allocate without limit.
        if !(2..=100_000).contains(&self.timesteps) {
            return Err(SamplerError::Config(format!(
                "diffusion.timesteps must be in 2..=100000, got {}",
                self.timesteps
            )));
        }
        let s = NoiseSchedule::new(&schedule, self.timesteps)?;
        Ok(GaussianDiffusion::new(s, mean, var, LossType::Mse))
    }
}

/// The `[data]` table (only the path, to find class names).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DataSection {
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// The parts of the resolved training config the sampler reads.
#[derive(Debug, Clone, Deserialize)]
pub struct RunConfig {
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub model: Option<UNetConfig>,
    #[serde(default)]
    pub classifier: Option<EncoderUNetConfig>,
    #[serde(default)]
    pub diffusion: DiffusionSection,
    #[serde(default)]
    pub data: DataSection,
}

/// Which parameters to load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weights {
    /// The EMA of this rate, or the first EMA rate of the run (`None`).
    Ema(Option<f64>),
    /// The raw trained parameters.
    Model,
}

impl std::str::FromStr for Weights {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ema" => Ok(Weights::Ema(None)),
            "model" | "raw" => Ok(Weights::Model),
            other => match other
                .strip_prefix("ema:")
                .or_else(|| other.strip_prefix("ema="))
            {
                Some(r) => r
                    .parse::<f64>()
                    .map(|r| Weights::Ema(Some(r)))
                    .map_err(|_| SamplerError::Config(format!("bad EMA rate in {other:?}"))),
                None => Err(SamplerError::Config(format!(
                    "weights must be \"ema\", \"ema:RATE\" or \"model\", got {other:?}"
                ))),
            },
        }
    }
}

/// A validated checkpoint directory.
#[derive(Debug, Clone)]
pub struct RunCheckpoint {
    pub dir: PathBuf,
    /// The run directory (parent of `checkpoints/`), where evaluation results go.
    pub run_dir: PathBuf,
    pub manifest: Manifest,
    pub config: RunConfig,
}

impl RunCheckpoint {
    /// Opens a checkpoint directory (with `manifest.json`) and checks its format. File hashes are
    /// checked when a file is loaded.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = ddpm_checkpoint::open_manifest(dir)?;
        let config: RunConfig = serde_json::from_value(manifest.config.clone())
            .map_err(|e| bad(&dir.join(MANIFEST), format!("config: {e}")))?;
        let run_dir = dir
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == CHECKPOINTS_DIR))
            .and_then(Path::parent)
            .unwrap_or(dir)
            .to_path_buf();
        Ok(Self {
            dir: dir.to_path_buf(),
            run_dir,
            manifest,
            config,
        })
    }

    /// A checkpoint directory, or a run directory (its newest checkpoint whose manifest reads and
    /// whose weights files verify; rejected ones are reported through `warn` and skipped).
    pub fn resolve(path: &Path, warn: impl FnMut(&SamplerError)) -> Result<Self> {
        ddpm_checkpoint::resolve(path, Self::open_usable, warn)
    }

    /// Opens a checkpoint and verifies every weights file a sampler may load (the model and each
    /// EMA), so that a damaged EMA file makes [`Self::resolve`] fall back to an older checkpoint,
    /// as the trainer does, instead of failing at load time.
    fn open_usable(dir: &Path) -> Result<Self> {
        let c = Self::open(dir)?;
        c.verify(MODEL_FILE)?;
        for &r in &c.manifest.ema_rates {
            c.verify(&ema_file(r))?;
        }
        Ok(c)
    }

    pub fn step(&self) -> u64 {
        self.manifest.step
    }

    pub fn task(&self) -> &str {
        &self.manifest.task
    }

    /// Checks a listed file's size and sha256; returns its path.
    pub fn verify(&self, name: &str) -> Result<PathBuf> {
        Ok(ddpm_checkpoint::verify_file(
            &self.dir,
            &self.manifest,
            name,
        )?)
    }

    /// The file holding the requested weights.
    pub fn weights_file(&self, which: Weights) -> Result<String> {
        match which {
            Weights::Model => Ok(MODEL_FILE.to_string()),
            Weights::Ema(rate) => {
                let rates = &self.manifest.ema_rates;
                let r = match rate {
                    Some(r) if rates.contains(&r) => r,
                    Some(r) => {
                        return Err(bad(
                            &self.dir,
                            format!("has no EMA of rate {r} (it has {rates:?})"),
                        ));
                    }
                    None => *rates
                        .first()
                        .ok_or_else(|| bad(&self.dir, "has no EMA weights; use --weights model"))?,
                };
                Ok(ema_file(r))
            }
        }
    }

    /// The diffusion process the model was trained with.
    pub fn diffusion(&self) -> Result<GaussianDiffusion> {
        self.config.diffusion.build()
    }

    /// Loads the tensors of `file` (verified), requiring exactly the names and shapes of `expected`.
    fn load_params(
        &self,
        file: &str,
        expected: &[(String, Tensor)],
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let path = self.verify(file)?;
        let mut want: Vec<(String, Vec<usize>)> = expected
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        want.sort();
        ddpm_unet::load_checked(&path, &want, device).map_err(|e| bad(&path, e.to_string()))
    }

    /// The denoising U-Net with the chosen weights.
    pub fn load_unet(&self, which: Weights, dtype: DType, device: &Device) -> Result<UNet> {
        let cfg = self.config.model.as_ref().ok_or_else(|| {
            bad(
                &self.dir,
                format!(
                    "is a {:?} checkpoint without a [model] table (not a diffusion model)",
                    self.task()
                ),
            )
        })?;
        // Build once on zeros just to learn the parameter names and shapes.
        // Validated (dimensions bounded) before anything is allocated; the error names the file.
        let skeleton = UNet::new(cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))
            .map_err(|e| bad(&self.dir.join(MANIFEST), format!("config.model: {e}")))?;
        let file = self.weights_file(which)?;
        let tensors = self.load_params(&file, skeleton.named_parameters(), device)?;
        Ok(UNet::new(
            cfg,
            VarBuilder::from_tensors(tensors, dtype, device),
        )?)
    }

    /// The noise-aware classifier of a `task = "classifier"` run.
    pub fn load_classifier(&self, which: Weights, device: &Device) -> Result<EncoderUNet> {
        let cfg = self.config.classifier.as_ref().ok_or_else(|| {
            bad(
                &self.dir,
                format!(
                    "is a {:?} checkpoint without a [classifier] table (not a classifier)",
                    self.task()
                ),
            )
        })?;
        let skeleton = EncoderUNet::new(cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))
            .map_err(|e| bad(&self.dir.join(MANIFEST), format!("config.classifier: {e}")))?;
        let file = self.weights_file(which)?;
        let tensors = self.load_params(&file, skeleton.named_parameters(), device)?;
        Ok(EncoderUNet::new(
            cfg,
            VarBuilder::from_tensors(tensors, DType::F32, device),
        )?)
    }

    /// Class names of the training data when its HDF5 file is still there, else `class_0`, ...
    pub fn class_names(&self, num_classes: usize) -> Vec<String> {
        if let Some(p) = &self.config.data.path {
            if let Ok(ds) = ddpm_data::Hdf5Dataset::open(p) {
                if ds.class_names().len() == num_classes {
                    return ds.class_names().to_vec();
                }
            }
        }
        (0..num_classes).map(|k| format!("class_{k}")).collect()
    }
}
