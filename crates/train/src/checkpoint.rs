//! Checkpoints: what a training run saves, how it is published atomically, and how a run finds
//! and validates one to resume from. The format (names, manifest, format checks) is
//! `ddpm-checkpoint`'s, shared with the sampler; this module adds writing and the trainer's own
//! requirements (every file verified up front, the optimizer and state files present).
//!
//! The layout is in `ddpm-checkpoint` and `crates/train/README.md`.
//!
//! A checkpoint directory is assembled under a hidden temporary name, every file fsynced, then
//! renamed into place and the parent directory fsynced: a checkpoint exists completely or not at
//! all. Readers still verify sizes and hashes, so a damaged copy is skipped with a warning rather
//! than loaded.
//!
//! The tensor names and the manifest fields are documented in `crates/train/README.md`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::atomic::{publish_dir, write_synced};

// The format itself lives in ddpm-checkpoint so that the sampler reads exactly what is written here;
// re-exported because callers and tests know these names as `ddpm_train::checkpoint::*`.
pub use ddpm_checkpoint::{
    ema_file, list_checkpoints, sha256_hex, step_dir_name, CheckpointError, FileEntry, Manifest,
    OptimizerState, RngState, CHECKPOINTS_DIR, FORMAT, FORMAT_VERSION, MANIFEST, MODEL_FILE,
    OPTIMIZER_FILE, STATE_FILE,
};

fn bad(path: &Path, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::invalid(path, msg)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    CheckpointError::io(path)
}

/// Serialises named tensors (sorted by name, so equal contents give equal bytes).
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    path_for_errors: &Path,
) -> Result<Vec<u8>, CheckpointError> {
    let sorted: BTreeMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::tensor::serialize(sorted, None)
        .map_err(|e| bad(path_for_errors, format!("serialise: {e}")))
}

/// Accumulates the files of one checkpoint in a staging directory and publishes them.
pub struct CheckpointWriter {
    staging: PathBuf,
    final_dir: PathBuf,
    files: Vec<FileEntry>,
}

impl CheckpointWriter {
    pub fn begin(run_dir: &Path, step: u64) -> Result<Self, CheckpointError> {
        let root = run_dir.join(CHECKPOINTS_DIR);
        fs::create_dir_all(&root).map_err(io(&root))?;
        let name = step_dir_name(step);
        let staging = root.join(format!(".tmp-{name}.{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        fs::create_dir(&staging).map_err(io(&staging))?;
        Ok(Self {
            staging,
            final_dir: root.join(name),
            files: Vec::new(),
        })
    }

    pub fn add_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let p = self.staging.join(name);
        write_synced(&p, bytes).map_err(io(&p))?;
        self.files.push(FileEntry {
            name: name.into(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        });
        Ok(())
    }

    pub fn add_tensors(
        &mut self,
        name: &str,
        tensors: &[(String, Tensor)],
    ) -> Result<(), CheckpointError> {
        let bytes = safetensors_bytes(tensors, &self.staging.join(name))?;
        self.add_bytes(name, &bytes)
    }

    /// Writes the manifest (with the file list filled in) and renames the directory into place.
    pub fn finish(self, mut manifest: Manifest) -> Result<PathBuf, CheckpointError> {
        manifest.files = self.files;
        let text = manifest.to_sealed_json();
        let mp = self.staging.join(MANIFEST);
        write_synced(&mp, text.as_bytes()).map_err(io(&mp))?;
        publish_dir(&self.staging, &self.final_dir).map_err(io(&self.final_dir))?;
        Ok(self.final_dir)
    }

    /// Abandons a partly written checkpoint.
    pub fn abort(self) {
        let _ = fs::remove_dir_all(&self.staging);
    }
}

/// A validated checkpoint on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Checkpoint {
    /// Reads the manifest and checks every listed file's size and sha256: resuming from a damaged
    /// file would silently corrupt the run, so nothing is trusted before it is all checked.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let manifest = ddpm_checkpoint::open_manifest(dir)?;
        for f in &manifest.files {
            ddpm_checkpoint::verify_file(dir, &manifest, &f.name)?;
        }
        let required = [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE].map(String::from);
        let emas = manifest.ema_rates.iter().map(|&r| ema_file(r));
        for name in required.into_iter().chain(emas) {
            if manifest.file(&name).is_none() {
                return Err(CheckpointError::NotListed {
                    path: dir.join(MANIFEST),
                    name,
                });
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Loads a tensor file, requiring exactly the `expected` names and shapes; the error lists every
    /// missing, extra or mis-shaped tensor.
    pub fn load_tensors(
        &self,
        file: &str,
        expected: &[(String, Vec<usize>)],
        device: &Device,
    ) -> Result<HashMap<String, Tensor>, CheckpointError> {
        let p = self.dir.join(file);
        ddpm_unet::load_checked(&p, expected, device).map_err(|e| bad(&p, e.to_string()))
    }

    /// Loads every tensor of a file, whatever its names (for the sampler and tools).
    pub fn load_all(
        &self,
        file: &str,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>, CheckpointError> {
        let p = self.dir.join(file);
        candle_core::safetensors::load(&p, device).map_err(|e| bad(&p, e.to_string()))
    }

    /// The training config stored in the manifest (overrides applied).
    pub fn config(&self) -> Result<crate::config::TrainConfig, CheckpointError> {
        serde_json::from_value(self.manifest.config.clone())
            .map_err(|e| bad(&self.dir.join(MANIFEST), format!("config: {e}")))
    }

    /// The weights file to sample with: `ema_<rate>.safetensors` (the first EMA rate when `rate` is
    /// None), or `model.safetensors` for the raw weights (`rate = Some(1.0)`).
    pub fn weights_file(&self, rate: Option<f64>) -> Result<String, CheckpointError> {
        match rate {
            Some(1.0) => Ok(MODEL_FILE.to_string()),
            Some(r) if self.manifest.ema_rates.contains(&r) => Ok(ema_file(r)),
            Some(r) => Err(bad(
                &self.dir,
                format!(
                    "has no EMA with rate {r} (rates: {:?})",
                    self.manifest.ema_rates
                ),
            )),
            None => Ok(self
                .manifest
                .ema_rates
                .first()
                .map(|&r| ema_file(r))
                .unwrap_or_else(|| MODEL_FILE.to_string())),
        }
    }

    /// The denoising U-Net of a diffusion checkpoint with the chosen weights (see [`Self::weights_file`]).
    pub fn load_unet(
        &self,
        rate: Option<f64>,
        device: &Device,
    ) -> Result<ddpm_unet::UNet, CheckpointError> {
        let cfg = self.config()?;
        let model_cfg = cfg
            .model
            .ok_or_else(|| bad(&self.dir, "is not a diffusion checkpoint (no [model])"))?;
        let file = self.weights_file(rate)?;
        let tensors = self.load_all(&file, device)?;
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        ddpm_unet::UNet::new(&model_cfg, vb).map_err(|e| bad(&self.dir.join(&file), e.to_string()))
    }

    /// The classifier of a `task = "classifier"` checkpoint with the chosen weights.
    pub fn load_classifier(
        &self,
        rate: Option<f64>,
        device: &Device,
    ) -> Result<ddpm_unet::EncoderUNet, CheckpointError> {
        let cfg = self.config()?;
        let c = cfg.classifier.ok_or_else(|| {
            bad(
                &self.dir,
                "is not a classifier checkpoint (no [classifier])",
            )
        })?;
        let file = self.weights_file(rate)?;
        let tensors = self.load_all(&file, device)?;
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        ddpm_unet::EncoderUNet::new(&c, vb).map_err(|e| bad(&self.dir.join(&file), e.to_string()))
    }

    /// An f64 vector from `trainer_state.safetensors` (None when absent).
    pub fn state_f64(&self, name: &str) -> Result<Option<Vec<f64>>, CheckpointError> {
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
}

/// The newest checkpoint of `run_dir` that validates; damaged ones are reported through `warn` and
/// skipped. `None` when the run has no usable checkpoint.
pub fn find_latest(run_dir: &Path, warn: impl FnMut(&CheckpointError)) -> Option<Checkpoint> {
    ddpm_checkpoint::find_newest(run_dir, Checkpoint::open, warn)
}

/// Resolves what the user pointed at: a checkpoint directory (has a manifest) or a run directory
/// (its newest valid checkpoint).
pub fn resolve(
    path: &Path,
    warn: impl FnMut(&CheckpointError),
) -> Result<Checkpoint, CheckpointError> {
    ddpm_checkpoint::resolve(path, Checkpoint::open, warn)
}

/// Deletes the checkpoints older than the newest `keep` valid ones (fully verified by
/// [`Checkpoint::open`]); `just_written` counts as valid. See `ddpm_checkpoint::prune`.
pub fn prune(
    run_dir: &Path,
    keep: usize,
    just_written: Option<&Path>,
) -> Result<Vec<PathBuf>, CheckpointError> {
    ddpm_checkpoint::prune(run_dir, keep, just_written, |d| Checkpoint::open(d).is_ok())
}

pub use ddpm_checkpoint::clean_staging;

#[cfg(test)]
mod tests {
    use super::*;

    fn write(run: &Path, step: u64) -> PathBuf {
        let t = vec![(
            "w".to_string(),
            Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
        )];
        let mut w = CheckpointWriter::begin(run, step).unwrap();
        w.add_tensors(MODEL_FILE, &t).unwrap();
        w.add_tensors(&ema_file(0.5), &t).unwrap();
        w.add_tensors(OPTIMIZER_FILE, &t).unwrap();
        w.add_tensors(STATE_FILE, &t).unwrap();
        w.finish(ddpm_checkpoint::fixture_manifest(step)).unwrap()
    }

    #[test]
    fn write_open_prune() {
        let dir = tempfile::tempdir().unwrap();
        for s in [5, 10, 15] {
            write(dir.path(), s);
        }
        let c = find_latest(dir.path(), |e| panic!("{e}")).unwrap();
        assert_eq!(c.manifest.step, 15);
        let t = c
            .load_tensors(MODEL_FILE, &[("w".into(), vec![2])], &Device::Cpu)
            .unwrap();
        assert_eq!(t["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        let err = c
            .load_tensors(MODEL_FILE, &[("w".into(), vec![3])], &Device::Cpu)
            .unwrap_err();
        assert!(err.to_string().contains('w'), "{err}");
        let removed = prune(dir.path(), 2, None).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(
            list_checkpoints(dir.path())
                .iter()
                .map(|c| c.0)
                .collect::<Vec<_>>(),
            vec![15, 10]
        );
        // no staging leftovers
        let names: Vec<String> = fs::read_dir(dir.path().join(CHECKPOINTS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("step_")), "{names:?}");
    }

    #[test]
    fn corrupt_newest_is_skipped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1);
        let newest = write(dir.path(), 2);
        let p = newest.join(MODEL_FILE);
        let mut bytes = fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&p, bytes).unwrap();
        let mut warnings = Vec::new();
        let c = find_latest(dir.path(), |e| warnings.push(e.to_string())).unwrap();
        assert_eq!(c.manifest.step, 1);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("sha256"), "{warnings:?}");
        // a checkpoint directory without manifest (crash before publish cannot produce one, but a
        // partial copy can) is skipped too
        fs::remove_file(newest.join(MANIFEST)).unwrap();
        let c = find_latest(dir.path(), |_| {}).unwrap();
        assert_eq!(c.manifest.step, 1);
    }

    #[test]
    fn staging_leftovers_are_not_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let w = CheckpointWriter::begin(dir.path(), 3).unwrap();
        // simulate a crash: staging dir left behind, never published
        std::mem::forget(w);
        assert!(find_latest(dir.path(), |_| {}).is_none());
        clean_staging(dir.path());
        assert_eq!(
            fs::read_dir(dir.path().join(CHECKPOINTS_DIR))
                .unwrap()
                .count(),
            0
        );
    }
}
