//! Writing a checkpoint: its files are assembled in a hidden staging directory, every file fsynced,
//! the manifest written last, then the directory renamed into place and the parent fsynced, so a
//! checkpoint exists completely or not at all. Also pruning old checkpoints and removing the
//! staging directories of interrupted writes.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use ddpm_io::{fsync_dir, publish_dir, write_synced};

use crate::{
    list_checkpoints, sha256_hex, step_dir_name, CheckpointError, FileEntry, Manifest,
    CHECKPOINTS_DIR, MANIFEST,
};

/// Serialises named tensors (sorted by name, so equal contents give equal bytes).
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    path_for_errors: &Path,
) -> Result<Vec<u8>, CheckpointError> {
    ddpm_unet::safetensors_bytes(path_for_errors, tensors, None)
        .map_err(|e| CheckpointError::invalid(path_for_errors, format!("serialise: {e}")))
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
        fs::create_dir_all(&root).map_err(CheckpointError::io(&root))?;
        let name = step_dir_name(step);
        let staging = root.join(format!(".tmp-{name}.{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(CheckpointError::io(&staging))?;
        }
        fs::create_dir(&staging).map_err(CheckpointError::io(&staging))?;
        Ok(Self {
            staging,
            final_dir: root.join(name),
            files: Vec::new(),
        })
    }

    pub fn add_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let p = self.staging.join(name);
        write_synced(&p, bytes).map_err(CheckpointError::io(&p))?;
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
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| CheckpointError::invalid(&self.staging, e.to_string()))?;
        let mp = self.staging.join(MANIFEST);
        write_synced(&mp, text.as_bytes()).map_err(CheckpointError::io(&mp))?;
        publish_dir(&self.staging, &self.final_dir)
            .map_err(CheckpointError::io(&self.final_dir))?;
        Ok(self.final_dir)
    }

    /// Abandons a partly written checkpoint.
    pub fn abort(self) {
        let _ = fs::remove_dir_all(&self.staging);
    }
}

/// Deletes all but the newest `keep` checkpoints. Returns the deleted directories.
pub fn prune(run_dir: &Path, keep: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut removed = Vec::new();
    for (_, dir) in list_checkpoints(run_dir).into_iter().skip(keep) {
        fs::remove_dir_all(&dir).map_err(CheckpointError::io(&dir))?;
        removed.push(dir);
    }
    let root = run_dir.join(CHECKPOINTS_DIR);
    if !removed.is_empty() {
        fsync_dir(&root).map_err(CheckpointError::io(&root))?;
    }
    Ok(removed)
}

/// Removes staging directories (`.tmp-*`) of interrupted writes. Call before training starts, on
/// rank 0 only.
pub fn clean_staging(run_dir: &Path) {
    let root = run_dir.join(CHECKPOINTS_DIR);
    for e in fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") || name.contains(".old.") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ema_file, fixture_manifest, Checkpoint, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE};
    use candle_core::Device;

    fn find_latest(run: &Path, warn: impl FnMut(&CheckpointError)) -> Option<Checkpoint> {
        Checkpoint::find_latest(run, warn)
    }

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
        w.finish(fixture_manifest(step)).unwrap()
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
        let removed = prune(dir.path(), 2).unwrap();
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
