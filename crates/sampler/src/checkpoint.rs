//! Reading the trainer's checkpoints (format `ddpm-rs-checkpoint` version 1, written by
//! `crates/train/src/checkpoint.rs` and documented in `crates/train/README.md`).
//!
//! Why a reader here instead of using ddpm-train's: the trainer draws its preview samples with this
//! crate, so depending on ddpm-train would make a cycle. The reader needs only the manifest's file
//! list, EMA rates, task and the `model` / `classifier` / `diffusion` tables of the resolved config,
//! which it parses with its own small serde structs (ignoring every other key), and it verifies the
//! size and sha256 of each file it loads, as the trainer does.
//!
//! ```text
//! RUN_DIR/checkpoints/step_000001000/
//!     manifest.json            format, format_version, step, task, config, ema_rates, files[{name, bytes, sha256}]
//!     model.safetensors        the trained parameters (U-Net names of crates/unet)
//!     ema_<rate>.safetensors   one per EMA rate, same names
//! ```

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ddpm_diffusion::{
    BetaSchedule, GaussianDiffusion, LossType, ModelMeanType, ModelVarType, NoiseSchedule,
};
use ddpm_unet::{EncoderUNet, EncoderUNetConfig, UNet, UNetConfig};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Result, SamplerError};

pub const FORMAT: &str = "ddpm-rs-checkpoint";
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// The EMA file name for `rate` (the trainer formats the rate with Rust's `{}`).
pub fn ema_file(rate: f64) -> String {
    format!("ema_{rate}.safetensors")
}

fn bad(path: &Path, message: impl Into<String>) -> SamplerError {
    SamplerError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The manifest fields the sampler uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub step: u64,
    pub task: String,
    pub config: serde_json::Value,
    #[serde(default)]
    pub ema_rates: Vec<f64>,
    pub files: Vec<FileEntry>,
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

fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let io = |e: std::io::Error| bad(path, e.to_string());
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}

/// Checkpoint directories of a run, newest first.
fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir.join(CHECKPOINTS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step_")?.parse::<u64>().ok()?;
            e.file_type().ok()?.is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    out
}

impl RunCheckpoint {
    /// Opens a checkpoint directory (with `manifest.json`) and checks its format. File hashes are
    /// checked when a file is loaded.
    pub fn open(dir: &Path) -> Result<Self> {
        let mp = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&mp).map_err(|e| bad(&mp, e.to_string()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| bad(&mp, format!("not a checkpoint manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(bad(
                &mp,
                format!("format is {:?}, expected {FORMAT:?}", manifest.format),
            ));
        }
        if manifest.format_version != FORMAT_VERSION {
            return Err(bad(
                &mp,
                format!(
                    "format version {} is not supported (this build reads {FORMAT_VERSION})",
                    manifest.format_version
                ),
            ));
        }
        let config: RunConfig = serde_json::from_value(manifest.config.clone())
            .map_err(|e| bad(&mp, format!("config: {e}")))?;
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

    /// A checkpoint directory, or a run directory (its newest checkpoint whose manifest reads;
    /// unreadable ones are reported through `warn` and skipped).
    pub fn resolve(path: &Path, mut warn: impl FnMut(&SamplerError)) -> Result<Self> {
        if path.join(MANIFEST).is_file() {
            return Self::open(path);
        }
        if !path.join(CHECKPOINTS_DIR).is_dir() {
            return Err(bad(
                path,
                "neither a checkpoint directory (no manifest.json) nor a run directory (no checkpoints/)",
            ));
        }
        for (_, dir) in list_checkpoints(path) {
            match Self::open(&dir).and_then(|c| c.verify(MODEL_FILE).map(|_| c)) {
                Ok(c) => return Ok(c),
                Err(e) => warn(&e),
            }
        }
        Err(bad(path, "run directory has no valid checkpoint"))
    }

    pub fn step(&self) -> u64 {
        self.manifest.step
    }

    pub fn task(&self) -> &str {
        &self.manifest.task
    }

    /// Checks a listed file's size and sha256; returns its path.
    pub fn verify(&self, name: &str) -> Result<PathBuf> {
        let entry = self
            .manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| bad(&self.dir.join(MANIFEST), format!("lists no {name}")))?;
        let p = self.dir.join(name);
        let (n, h) = sha256_file(&p)?;
        if n != entry.bytes {
            return Err(bad(
                &p,
                format!("size is {n} bytes, the manifest says {}", entry.bytes),
            ));
        }
        if h != entry.sha256 {
            return Err(bad(&p, "sha256 does not match the manifest (file damaged)"));
        }
        Ok(p)
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
        let skeleton = UNet::new(cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))?;
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
        let skeleton = EncoderUNet::new(cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))?;
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
