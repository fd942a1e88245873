//! The checkpoint format (`ddpm-rs-checkpoint` version 2) and everything that touches it: the
//! manifest, file hashes and listing (this file), what a manifest must satisfy before it is used
//! ([`validate`]), writing ([`writer`]), pruning and crash recovery ([`prune`]), one line of
//! checkpoints per run directory ([`lineage`]), and reading, verifying and loading the trained
//! networks ([`reader`]). The trainer writes and resumes through it, the sampler and evaluator read
//! through it; the stored config is read with `ddpm-config`'s schema, the one that wrote it.
//!
//! ```text
//! RUN_DIR/checkpoints/step_000001000/
//!     manifest.json               written last; lists every file with its size and sha256
//!     model.safetensors           the trained parameters
//!     ema_0.9999.safetensors      one file per EMA rate, same tensor names as the model
//!     optimizer.safetensors       AdamW moments: exp_avg.<param>, exp_avg_sq.<param>
//!     trainer_state.safetensors   f64/i64 state that must round-trip bit-exactly
//! ```
//!
//! The fields are documented in `crates/train/README.md`; any change there is a new format version.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[cfg(test)]
mod fuzz_tests;
pub mod lineage;
pub mod prune;
pub mod reader;
pub mod validate;
pub mod writer;

pub use ddpm_config::config_hash;
pub use lineage::abandon_newer;
pub use prune::{clean_staging, prune};
pub use reader::{Checkpoint, Weights, WeightsParseError};
pub use validate::sealed_json;
pub use writer::{safetensors_bytes, CheckpointWriter};

pub const FORMAT: &str = "ddpm-rs-checkpoint";
/// 2: the manifest carries `manifest_sha256`, and `config` must hash to `config_hash`.
pub const FORMAT_VERSION: u32 = 2;
/// A manifest is a few KiB (the config and a file list); a larger file is not one.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
pub const MANIFEST: &str = "manifest.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.safetensors";
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// Every error carries the path of the file at fault, because a user with several runs and
/// checkpoints needs to know which copy to delete or re-copy.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a checkpoint manifest: {source}")]
    NotAManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: format is {found:?}, expected {FORMAT:?}")]
    Format { path: PathBuf, found: String },
    #[error("{path}: format version {found} is not supported (this build reads {FORMAT_VERSION})")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: lists no {name}")]
    NotListed { path: PathBuf, name: String },
    #[error("{path}: size is {actual} bytes, the manifest says {listed}")]
    Size {
        path: PathBuf,
        actual: u64,
        listed: u64,
    },
    #[error("{path}: sha256 does not match the manifest (file damaged)")]
    Hash { path: PathBuf },
    /// A manifest (or journal) field that fails a check; `field` is its JSON path.
    #[error("{path}: {field}: {msg}")]
    Field {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// Checks that belong to a reader (config contents, tensor shapes, missing tables).
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

impl CheckpointError {
    pub fn invalid(path: &Path, msg: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    /// For `map_err`, naming the file the I/O was on.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The file or directory the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::NotAManifest { path, .. }
            | Self::Format { path, .. }
            | Self::Version { path, .. }
            | Self::NotListed { path, .. }
            | Self::Size { path, .. }
            | Self::Hash { path }
            | Self::Field { path, .. }
            | Self::Invalid { path, .. } => path,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    pub kind: String,
    /// AdamW updates applied (bias-correction exponent).
    pub t: u64,
    /// Learning rate of the last step.
    pub lr: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// All randomness is counter-based (ddpm-rng Philox keyed by seed, stream, step, global example
    /// index), so the seed and the next step are the whole generator state.
    pub seed: u64,
    pub next_step: u64,
    pub generator: String,
}

/// Field order is the order on disk (serde writes fields as declared), so keep it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// Steps completed; training continues with step index `step`.
    pub step: u64,
    pub task: String,
    /// The resolved config (all overrides applied), as JSON; each reader parses the parts it needs.
    pub config: serde_json::Value,
    /// sha256 of the canonical config JSON without `hash_excluded_keys`.
    pub config_hash: String,
    pub hash_excluded_keys: Vec<String>,
    pub world_size: usize,
    pub batch_per_rank: usize,
    pub global_batch: usize,
    /// Position of the next batch (ddpm-data `LoaderPosition`).
    pub loader_position: serde_json::Value,
    pub optimizer: OptimizerState,
    pub ema_rates: Vec<f64>,
    /// EMA updates applied (the EMA warm-up counter).
    pub ema_updates: u64,
    pub skipped_steps: u64,
    pub rng: RngState,
    /// `uniform` or `loss_aware`; the loss-aware history is in `trainer_state.safetensors`.
    pub timestep_sampler: String,
    /// Number of model parameters.
    pub num_parameters: usize,
    /// What the run trained on (ddpm-data's content fingerprint: N, shape, classes, sha256 of the
    /// labels and pixels); a resumed run must read the same data. `None`: not recorded.
    #[serde(default)]
    pub dataset: Option<ddpm_data::DatasetFingerprint>,
    pub files: Vec<FileEntry>,
    pub created_unix: u64,
    pub writer: String,
    /// sha256 of the manifest's own text with this value empty; written by [`sealed_json`]
    /// (the value in memory is not used when writing). Keep this field last.
    pub manifest_sha256: String,
}

impl Manifest {
    /// The text to write: see [`sealed_json`].
    pub fn to_sealed_json(&self) -> String {
        sealed_json(self)
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// The rate as it appears in file names: shortest decimal form (`0.9999`), so the name can be
/// typed back on a command line and parses to the same f64.
pub fn rate_label(rate: f64) -> String {
    format!("{rate}")
}

pub fn ema_file(rate: f64) -> String {
    format!("ema_{}.safetensors", rate_label(rate))
}

/// Zero-padded so that directory names sort by step.
pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:09}")
}

/// Checkpoint directories of a run, newest first: `(step, path)`. Anything that is not a
/// `step_<n>` directory (staging directories of interrupted writes, stray files) is ignored.
///
/// While an abandon journal is pending (see [`lineage`]), the steps it abandons are not listed.
pub fn list_checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let cutoff = lineage::pending_cutoff(&root).unwrap_or(u64::MAX);
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step_")?.parse::<u64>().ok()?;
            (step <= cutoff && e.file_type().ok()?.is_dir()).then(|| (step, e.path()))
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams the file, since weight files can be far larger than is reasonable to hold twice. Reads
/// at most `limit` bytes, so a device or an endless file cannot keep it busy.
pub fn sha256_file(path: &Path, limit: u64) -> Result<(u64, String), CheckpointError> {
    let mut f = fs::File::open(path)
        .map_err(CheckpointError::io(path))?
        .take(limit);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(CheckpointError::io(path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex(&h.finalize())))
}

/// Reads `dir/manifest.json`, rejects other formats and versions, then runs every check of
/// [`validate`] (plain file names, the manifest's own hash, `config` against `config_hash`) before
/// anything in it is used. File contents are not checked here: the trainer verifies all of them,
/// the sampler those it may load (see [`verify_file`]).
pub fn open_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let mp = dir.join(MANIFEST);
    let f = fs::File::open(&mp).map_err(CheckpointError::io(&mp))?;
    let mut text = String::new();
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(CheckpointError::io(&mp))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(CheckpointError::invalid(
            &mp,
            format!("is larger than {MAX_MANIFEST_BYTES} bytes; not a manifest"),
        ));
    }
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|source| CheckpointError::NotAManifest {
            path: mp.clone(),
            source,
        })?;
    if manifest.format != FORMAT {
        return Err(CheckpointError::Format {
            path: mp,
            found: manifest.format,
        });
    }
    if manifest.format_version != FORMAT_VERSION {
        return Err(CheckpointError::Version {
            path: mp,
            found: manifest.format_version,
        });
    }
    validate::check_manifest(&mp, &text, &manifest)?;
    Ok(manifest)
}

/// Checks that `name` is listed and that its size and sha256 match; returns its path. A published
/// checkpoint is complete by construction, so a mismatch means a damaged or partial copy.
pub fn verify_file(
    dir: &Path,
    manifest: &Manifest,
    name: &str,
) -> Result<PathBuf, CheckpointError> {
    let entry = manifest
        .file(name)
        .ok_or_else(|| CheckpointError::NotListed {
            path: dir.join(MANIFEST),
            name: name.to_string(),
        })?;
    let p = dir.join(name);
    // The name was checked by `open_manifest`; a caller may pass any string, so check again.
    let index = manifest
        .files
        .iter()
        .position(|f| f.name == name)
        .unwrap_or(0);
    validate::check_file_name(&dir.join(MANIFEST), index, name)?;
    let meta = fs::metadata(&p).map_err(CheckpointError::io(&p))?;
    if !meta.is_file() {
        return Err(CheckpointError::invalid(&p, "is not a regular file"));
    }
    let (n, h) = sha256_file(&p, entry.bytes.saturating_add(1))?;
    if n != entry.bytes {
        return Err(CheckpointError::Size {
            path: p,
            actual: n,
            listed: entry.bytes,
        });
    }
    if h != entry.sha256 {
        return Err(CheckpointError::Hash { path: p });
    }
    Ok(p)
}

/// The newest checkpoint of `run_dir` that `open` accepts; rejected ones go to `warn`, so a damaged
/// newest checkpoint costs some steps instead of the run. Generic over the reader's checkpoint
/// type, because each reader decides what "usable" means.
pub fn find_newest<T, E>(
    run_dir: &Path,
    mut open: impl FnMut(&Path) -> Result<T, E>,
    mut warn: impl FnMut(&E),
) -> Option<T> {
    for (_, dir) in list_checkpoints(run_dir) {
        match open(&dir) {
            Ok(c) => return Some(c),
            Err(e) => warn(&e),
        }
    }
    None
}

/// What the user pointed at: a checkpoint directory (has a manifest) or a run directory (its
/// newest usable checkpoint, see [`find_newest`]).
pub fn resolve<T, E: From<CheckpointError>>(
    path: &Path,
    mut open: impl FnMut(&Path) -> Result<T, E>,
    warn: impl FnMut(&E),
) -> Result<T, E> {
    if path.join(MANIFEST).is_file() {
        open(path)
    } else if path.join(CHECKPOINTS_DIR).is_dir() {
        find_newest(path, open, warn).ok_or_else(|| {
            CheckpointError::invalid(path, "run directory has no valid checkpoint").into()
        })
    } else {
        Err(CheckpointError::invalid(
            path,
            "neither a checkpoint directory (no manifest.json) nor a run directory (no checkpoints/)",
        )
        .into())
    }
}

/// A complete, valid manifest (no files, one EMA rate 0.5) for the tests of this crate and of the
/// writer, so that a new manifest field is added in one fixture instead of in every test suite.
#[cfg(any(test, feature = "fixtures"))]
pub fn fixture_manifest(step: u64) -> Manifest {
    let config = serde_json::json!({"diffusion": {"prediction": "eps"}});
    Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        step,
        task: "diffusion".into(),
        config_hash: config_hash(&config, &[] as &[&str]),
        config,
        hash_excluded_keys: vec![],
        world_size: 1,
        batch_per_rank: 1,
        global_batch: 1,
        loader_position: serde_json::json!({"epoch": 0, "batch_index": 0}),
        optimizer: OptimizerState {
            kind: "adamw".into(),
            t: 0,
            lr: 0.0,
        },
        ema_rates: vec![0.5],
        ema_updates: 0,
        skipped_steps: 0,
        rng: RngState {
            seed: 0,
            next_step: step,
            generator: "philox".into(),
        },
        timestep_sampler: "uniform".into(),
        num_parameters: 2,
        dataset: None,
        files: vec![],
        created_unix: 0,
        writer: "test".into(),
        manifest_sha256: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint directory with one file `model.safetensors` and the given manifest edits.
    fn write(run: &Path, step: u64, edit: impl FnOnce(&mut Manifest)) -> PathBuf {
        let dir = run.join(CHECKPOINTS_DIR).join(step_dir_name(step));
        fs::create_dir_all(&dir).unwrap();
        let bytes = b"weights";
        fs::write(dir.join(MODEL_FILE), bytes).unwrap();
        let mut m = fixture_manifest(step);
        m.files = vec![FileEntry {
            name: MODEL_FILE.into(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }];
        edit(&mut m);
        fs::write(dir.join(MANIFEST), m.to_sealed_json()).unwrap();
        dir
    }

    #[test]
    fn opens_and_verifies_a_good_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        let dir = write(run.path(), 7, |_| {});
        let m = open_manifest(&dir).unwrap();
        assert_eq!(m.step, 7);
        assert_eq!(m.files.len(), 1);
        assert_eq!(
            verify_file(&dir, &m, MODEL_FILE).unwrap(),
            dir.join(MODEL_FILE)
        );
        let e = verify_file(&dir, &m, OPTIMIZER_FILE).unwrap_err();
        assert_eq!(e.path(), dir.join(MANIFEST));
        assert!(
            e.to_string().ends_with("lists no optimizer.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn bad_format_string_is_rejected_naming_the_manifest() {
        let run = tempfile::tempdir().unwrap();
        let dir = write(run.path(), 1, |m| m.format = "something-else".into());
        let e = open_manifest(&dir).unwrap_err();
        assert!(matches!(e, CheckpointError::Format { .. }), "{e:?}");
        let s = e.to_string();
        assert!(s.contains(MANIFEST), "{s}");
        assert!(
            s.contains(r#"format is "something-else", expected "ddpm-rs-checkpoint""#),
            "{s}"
        );
    }

    #[test]
    fn unsupported_version_is_rejected() {
        let run = tempfile::tempdir().unwrap();
        let dir = write(run.path(), 1, |m| m.format_version = 1);
        let e = open_manifest(&dir).unwrap_err();
        assert!(
            matches!(e, CheckpointError::Version { found: 1, .. }),
            "{e:?}"
        );
        let s = e.to_string();
        assert!(s.contains(MANIFEST), "{s}");
        assert!(
            s.contains("format version 1 is not supported (this build reads 2)"),
            "{s}"
        );
    }

    #[test]
    fn corrupted_file_fails_verification_naming_the_file() {
        let run = tempfile::tempdir().unwrap();
        let dir = write(run.path(), 1, |_| {});
        let m = open_manifest(&dir).unwrap();
        // same size, different content: only the hash can tell
        fs::write(dir.join(MODEL_FILE), b"weightz").unwrap();
        let e = verify_file(&dir, &m, MODEL_FILE).unwrap_err();
        assert_eq!(e.path(), dir.join(MODEL_FILE));
        let s = e.to_string();
        assert!(s.contains(MODEL_FILE), "{s}");
        assert!(
            s.contains("sha256 does not match the manifest (file damaged)"),
            "{s}"
        );
        // truncated: the size check names both sizes
        fs::write(dir.join(MODEL_FILE), b"weigh").unwrap();
        let s = verify_file(&dir, &m, MODEL_FILE).unwrap_err().to_string();
        assert!(
            s.contains(MODEL_FILE) && s.contains("size is 5 bytes, the manifest says 7"),
            "{s}"
        );
    }

    #[test]
    fn listing_is_newest_first_and_resolve_skips_rejected_checkpoints() {
        let run = tempfile::tempdir().unwrap();
        for s in [2, 10, 1] {
            write(run.path(), s, |_| {});
        }
        fs::create_dir(
            run.path()
                .join(CHECKPOINTS_DIR)
                .join(".tmp-step_000000011.1"),
        )
        .unwrap();
        let steps: Vec<u64> = list_checkpoints(run.path()).iter().map(|c| c.0).collect();
        assert_eq!(steps, vec![10, 2, 1]);
        let newest = run.path().join(CHECKPOINTS_DIR).join(step_dir_name(10));
        fs::write(newest.join(MODEL_FILE), b"damaged").unwrap();
        let open = |d: &Path| {
            let m = open_manifest(d)?;
            verify_file(d, &m, MODEL_FILE).map(|_| m)
        };
        let mut warnings = Vec::new();
        let m = resolve(run.path(), open, |e: &CheckpointError| {
            warnings.push(e.to_string())
        })
        .unwrap();
        assert_eq!(m.step, 2);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("step_000000010"), "{warnings:?}");
        let e = resolve(&run.path().join("nope"), open, |_| {}).unwrap_err();
        assert!(
            e.to_string().contains("neither a checkpoint directory"),
            "{e}"
        );
    }

    #[test]
    fn a_name_outside_the_directory_is_refused_before_any_file_is_opened() {
        let run = tempfile::tempdir().unwrap();
        for name in ["../../outside", "/dev/zero"] {
            let dir = write(run.path(), 1, |m| m.files[0].name = name.into());
            let e = open_manifest(&dir).unwrap_err();
            assert_eq!(e.path(), dir.join(MANIFEST));
            assert!(e.to_string().contains("files[0].name"), "{e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_listed_file_that_is_a_device_is_not_read() {
        let run = tempfile::tempdir().unwrap();
        let dir = write(run.path(), 1, |_| {});
        fs::remove_file(dir.join(MODEL_FILE)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join(MODEL_FILE)).unwrap();
        let m = open_manifest(&dir).unwrap();
        let e = verify_file(&dir, &m, MODEL_FILE).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn an_edited_manifest_is_refused_naming_the_field() {
        let run = tempfile::tempdir().unwrap();
        let dir = write(run.path(), 1, |_| {});
        let p = dir.join(MANIFEST);
        let text = fs::read_to_string(&p).unwrap();
        fs::write(&p, text.replace("\"eps\"", "\"v\"")).unwrap();
        let e = open_manifest(&dir).unwrap_err().to_string();
        assert!(e.contains("manifest.json: manifest_sha256"), "{e}");
    }

    #[test]
    fn names_match_the_documented_layout() {
        assert_eq!(step_dir_name(1000), "step_000001000");
        assert_eq!(ema_file(0.9999), "ema_0.9999.safetensors");
        assert_eq!(ema_file(0.995), "ema_0.995.safetensors");
    }
}
