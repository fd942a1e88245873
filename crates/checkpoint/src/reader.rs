//! Reading a checkpoint: the manifest, the stored run config (read with the writer's own schema,
//! `ddpm-config`), file verification, the weights to sample with, and the trained networks.
//!
//! Two ways to pick one: resuming needs every file intact and present
//! ([`Checkpoint::open_verified`], [`Checkpoint::find_latest`], [`Checkpoint::resolve_for_resume`]);
//! sampling and evaluation need only the files they load, which are verified as they are loaded
//! ([`Checkpoint::open`], [`Checkpoint::resolve`]), so sampling from one EMA does not hash every
//! other weight file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ddpm_config::ContinuousSchedule;
use ddpm_config::TrainConfig;
use ddpm_diffusion::vdm::{schedule::PARAM_NAMES, MonotoneGammaInit};
use ddpm_diffusion::GaussianDiffusion;
use ddpm_unet::{EncoderUNet, UNet};

use crate::{
    ema_file, find_newest, open_manifest, verify_file, CheckpointError, Manifest, CHECKPOINTS_DIR,
    MANIFEST, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
};

type Result<T> = std::result::Result<T, CheckpointError>;

fn bad(path: &Path, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::invalid(path, msg)
}

/// Which parameters to load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weights {
    /// The EMA of this rate, or the first EMA rate of the run (`None`).
    Ema(Option<f64>),
    /// The raw trained parameters.
    Model,
}

/// A `--weights` value that is not `ema`, `ema:RATE` or `model`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct WeightsParseError(String);

impl std::str::FromStr for Weights {
    type Err = WeightsParseError;
    fn from_str(s: &str) -> std::result::Result<Self, WeightsParseError> {
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
                    .map_err(|_| WeightsParseError(format!("bad EMA rate in {other:?}"))),
                None => Err(WeightsParseError(format!(
                    "weights must be \"ema\", \"ema:RATE\" or \"model\", got {other:?}"
                ))),
            },
        }
    }
}

/// A checkpoint directory whose manifest has been read and format-checked.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    /// The run directory (parent of `checkpoints/`), where evaluation results go.
    pub run_dir: PathBuf,
    pub manifest: Manifest,
}

impl Checkpoint {
    /// Reads the manifest and checks its format; file hashes are checked when a file is loaded.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = open_manifest(dir)?;
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
        })
    }

    /// [`Self::open`], then every listed file's size and sha256, and the presence of everything a
    /// resumed run loads: resuming from a damaged file would silently corrupt the run, so nothing
    /// is trusted before it is all checked.
    pub fn open_verified(dir: &Path) -> Result<Self> {
        let ck = Self::open(dir)?;
        for f in &ck.manifest.files {
            ck.verify(&f.name)?;
        }
        let required = [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE].map(String::from);
        let emas = ck.manifest.ema_rates.iter().map(|&r| ema_file(r));
        for name in required.into_iter().chain(emas) {
            if ck.manifest.file(&name).is_none() {
                return Err(CheckpointError::NotListed {
                    path: dir.join(MANIFEST),
                    name,
                });
            }
        }
        Ok(ck)
    }

    /// The newest checkpoint of `run_dir` that [`Self::open_verified`] accepts; damaged ones are
    /// reported through `warn` and skipped. `None` when the run has no usable checkpoint.
    pub fn find_latest(run_dir: &Path, warn: impl FnMut(&CheckpointError)) -> Option<Self> {
        find_newest(run_dir, Self::open_verified, warn)
    }

    /// A checkpoint directory, or a run directory's newest checkpoint, to resume from (every file
    /// verified).
    pub fn resolve_for_resume(path: &Path, warn: impl FnMut(&CheckpointError)) -> Result<Self> {
        crate::resolve(path, Self::open_verified, warn)
    }

    /// A checkpoint directory, or a run directory's newest checkpoint whose manifest reads and whose
    /// weights files (the model and every EMA) verify, to sample or evaluate with: a damaged EMA
    /// file makes a run directory fall back to an older checkpoint, as resuming does, instead of
    /// failing when it is loaded.
    pub fn resolve(path: &Path, warn: impl FnMut(&CheckpointError)) -> Result<Self> {
        crate::resolve(path, Self::open_weights_verified, warn)
    }

    fn open_weights_verified(dir: &Path) -> Result<Self> {
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
        verify_file(&self.dir, &self.manifest, name)
    }

    /// The run config stored in the manifest (all overrides applied), in the writer's schema, and
    /// validated as a config file is: every dimension a reader allocates from is bounded, and the
    /// error names the manifest and the key.
    pub fn config(&self) -> Result<TrainConfig> {
        let mp = self.dir.join(MANIFEST);
        let cfg: TrainConfig = serde_json::from_value(self.manifest.config.clone())
            .map_err(|e| bad(&mp, format!("config: {e}")))?;
        cfg.validate().map_err(|e| match e {
            ddpm_config::ConfigError::Invalid { key, msg } => CheckpointError::Field {
                path: mp.clone(),
                field: format!("config.{key}"),
                msg,
            },
            other => bad(&mp, format!("config: {other}")),
        })?;
        Ok(cfg)
    }

    /// The diffusion process the model was trained with.
    pub fn diffusion(&self) -> Result<GaussianDiffusion> {
        self.config()?
            .diffusion
            .build()
            .map_err(|e| bad(&self.dir.join(MANIFEST), format!("config: diffusion: {e}")))
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

    /// Loads a tensor file (not verified again: see [`Self::open_verified`]), requiring exactly the
    /// `expected` names and shapes; the error lists every missing, extra or mis-shaped tensor.
    pub fn load_tensors(
        &self,
        file: &str,
        expected: &[(String, Vec<usize>)],
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let p = self.dir.join(file);
        ddpm_unet::load_checked(&p, expected, device).map_err(|e| bad(&p, e.to_string()))
    }

    /// Loads every tensor of a file, whatever its names (for tools and tests).
    pub fn load_all(&self, file: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
        let p = self.dir.join(file);
        candle_core::safetensors::load(&p, device).map_err(|e| bad(&p, e.to_string()))
    }

    /// An f64 vector from `trainer_state.safetensors` (None when absent).
    pub fn state_f64(&self, name: &str) -> Result<Option<Vec<f64>>> {
        let all = self.load_all(STATE_FILE, &Device::Cpu)?;
        match all.get(name) {
            None => Ok(None),
            Some(t) => t
                .to_dtype(DType::F64)
                .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
                .map(Some)
                .map_err(|e| bad(&self.dir.join(STATE_FILE), format!("{name}: {e}"))),
        }
    }

    /// Verifies `file` and loads it, requiring exactly the parameter names and shapes of `skeleton`
    /// plus `extra`.
    fn load_params(
        &self,
        file: &str,
        skeleton: &[(String, Tensor)],
        extra: Vec<(String, Vec<usize>)>,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        self.verify(file)?;
        let mut want: Vec<(String, Vec<usize>)> = skeleton
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        want.extend(extra);
        want.sort();
        self.load_tensors(file, &want, device)
    }

    /// The denoising U-Net of a diffusion checkpoint with the chosen weights.
    pub fn load_unet(&self, which: Weights, dtype: DType, device: &Device) -> Result<UNet> {
        let cfg = self.config()?.model.ok_or_else(|| {
            bad(
                &self.dir,
                format!(
                    "is a {:?} checkpoint without a [model] table (not a diffusion model)",
                    self.task()
                ),
            )
        })?;
        let file = self.weights_file(which)?;
        let net_err = |e: ddpm_unet::UNetError| bad(&self.dir.join(&file), e.to_string());
        // Built once on zeros just to learn the parameter names and shapes.
        let skeleton =
            UNet::new(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu)).map_err(net_err)?;
        let extra = schedule_shapes(&self.config()?);
        let tensors = self.load_params(&file, skeleton.named_parameters(), extra, device)?;
        UNet::new(&cfg, VarBuilder::from_tensors(tensors, dtype, device)).map_err(net_err)
    }

    /// The learned noise schedule of a continuous-time checkpoint (`schedule = "learned"`) from the
    /// chosen weights file (it is trained, and averaged, with the U-Net); `None` for other runs.
    pub fn load_schedule(&self, which: Weights) -> Result<Option<MonotoneGammaInit>> {
        if schedule_shapes(&self.config()?).is_empty() {
            return Ok(None);
        }
        let file = self.weights_file(which)?;
        let path = self.verify(&file)?;
        let all = self.load_all(&file, &Device::Cpu)?;
        MonotoneGammaInit::from_named(|n| all.get(n).cloned())
            .map(Some)
            .map_err(|e| bad(&path, e.to_string()))
    }

    /// The noise-aware classifier of a `task = "classifier"` checkpoint with the chosen weights.
    pub fn load_classifier(&self, which: Weights, device: &Device) -> Result<EncoderUNet> {
        let cfg = self.config()?.classifier.ok_or_else(|| {
            bad(
                &self.dir,
                format!(
                    "is a {:?} checkpoint without a [classifier] table (not a classifier)",
                    self.task()
                ),
            )
        })?;
        let file = self.weights_file(which)?;
        let net_err = |e: ddpm_unet::UNetError| bad(&self.dir.join(&file), e.to_string());
        let skeleton =
            EncoderUNet::new(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu)).map_err(net_err)?;
        let tensors = self.load_params(&file, skeleton.named_parameters(), Vec::new(), device)?;
        EncoderUNet::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, device))
            .map_err(net_err)
    }
}

/// Names and shapes of a learned noise schedule's parameters, stored next to the U-Net's in the
/// model and EMA files of a continuous-time run with `schedule = "learned"` (empty otherwise).
fn schedule_shapes(cfg: &TrainConfig) -> Vec<(String, Vec<usize>)> {
    match cfg.diffusion.continuous().map(|s| s.schedule) {
        Some(ContinuousSchedule::Learned { hidden }) => PARAM_NAMES
            .iter()
            .zip([1, 1, 1, hidden, hidden, hidden])
            .map(|(n, len)| (n.to_string(), vec![len]))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fixture_manifest, CheckpointWriter};

    const CONFIG: &str = "out_dir = \"run\"\n[model]\nimage_size = 8\nin_channels = 1\n\
        model_channels = 8\nnum_res_blocks = 1\nattention_resolutions = []\nchannel_mult = [1]\n\
        num_groups = 4\n[diffusion]\nschedule = \"cosine\"\ntimesteps = 10\n[data]\npath = \"d.h5\"\nbatch = 2\n\
        [optim]\nlr = 1e-3\n[schedule]\ntotal_steps = 1\n[preview]\nsteps = 2\n";

    fn write(run: &Path, config: serde_json::Value) -> Checkpoint {
        let mut w = CheckpointWriter::begin(run, 1).unwrap();
        w.add_bytes(MODEL_FILE, b"not read here").unwrap();
        let mut m = fixture_manifest(1);
        m.config_hash = ddpm_config::config_hash(&config, &m.hash_excluded_keys);
        m.config = config;
        Checkpoint::open(&w.finish(m).unwrap()).unwrap()
    }

    /// The stored config is read with the writer's schema: the same value back, the same process
    /// built from it, and an unknown key (which the sampler's old reader ignored) is an error naming
    /// the manifest.
    #[test]
    fn config_is_read_with_the_writers_schema() {
        let run = tempfile::tempdir().unwrap();
        let cfg = TrainConfig::from_toml_str(CONFIG, &Default::default()).unwrap();
        let ck = write(run.path(), serde_json::to_value(&cfg).unwrap());
        assert_eq!(ck.config().unwrap(), cfg);
        let d = ck.diffusion().unwrap();
        assert_eq!(d.num_timesteps(), 10);
        assert_eq!(d.var_type, ddpm_diffusion::ModelVarType::FixedSmall);
        assert_eq!(ck.run_dir, run.path());

        let mut v = serde_json::to_value(&cfg).unwrap();
        v["diffusion"]["variances"] = "fixed_large".into();
        let ck = write(run.path(), v);
        let e = ck.config().unwrap_err().to_string();
        assert!(e.contains(MANIFEST) && e.contains("variances"), "{e}");
    }

    #[test]
    fn weights_parse_and_select_a_file() {
        assert_eq!("ema".parse::<Weights>().unwrap(), Weights::Ema(None));
        assert_eq!(
            "ema:0.5".parse::<Weights>().unwrap(),
            Weights::Ema(Some(0.5))
        );
        assert_eq!("model".parse::<Weights>().unwrap(), Weights::Model);
        assert!("ema:x".parse::<Weights>().is_err());
        let run = tempfile::tempdir().unwrap();
        let ck = write(run.path(), serde_json::json!({}));
        assert_eq!(
            ck.weights_file(Weights::Ema(None)).unwrap(),
            "ema_0.5.safetensors"
        );
        assert_eq!(ck.weights_file(Weights::Model).unwrap(), MODEL_FILE);
        let e = ck
            .weights_file(Weights::Ema(Some(0.9)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no EMA of rate 0.9"), "{e}");
    }
}
