//! Dataset identity: a deterministic fingerprint of what a dataset file *contains*.
//!
//! Two ranks, or a run and its resumption, train on the same data exactly when their fingerprints are
//! equal. The path is deliberately not part of it (node-local copies live at different paths), and
//! neither is anything about the storage (compression, chunking, HDF5 metadata, the `source` text, the
//! time the file was written): re-converting the same input gives the same fingerprint, while changing
//! one pixel, one label or one class name gives a different one.
//!
//! # Digest, version 1
//! SHA-256 over, in this order (integers little-endian `u64`):
//!
//! ```text
//! "ddpm-data dataset fingerprint v1\0"
//! N, H, W, C
//! num_classes (0 when unlabelled), then per class name: byte length, UTF-8 bytes
//! 1 and the N labels as i64 when labelled, else 0
//! the N*H*W*C pixel bytes of `images` in dataset order (NHWC)
//! ```
//!
//! # Cost, and the cache
//! Computing it is one sequential pass over `images`, chunk by chunk through
//! [`Hdf5Dataset::read_chunk`], one chunk in memory at a time (at most
//! [`crate::limits::MAX_CHUNK_BYTES`]). The format's files carry no per-chunk checksums (the
//! converters write deflate without Fletcher-32), so there is nothing cheaper that still covers every
//! pixel. The pass is done once per *file version*: the child that checks a file before it is opened
//! ([`crate::probe`]) computes it, and the result is remembered, in the process and in a sidecar
//! `FILE.ddpm-check.json` next to the file (written atomically when the directory is writable,
//! never required), keyed by [`FileVersion`]: device, inode, size, mtime and ctime in nanoseconds.
//! A re-converted file (a new inode), a node-local copy (another device or inode, its own entry) or
//! any write to the file (a new ctime, which no user can set back) misses the cache and is read
//! again, so the cache detects everything the full pass detects. A file changed less than
//! [`RACY_SECS`] before it was read is not cached: timestamps are coarser than writes.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::format::Hdf5Dataset;

/// Version tag of the digest definition above; part of the hashed bytes and of the serialised form.
pub const FINGERPRINT_VERSION: u32 = 1;

/// What identifies a dataset: its shape, its classes and a SHA-256 digest of its content.
///
/// Equality means "same data"; [`Display`](fmt::Display) gives a one-line form for error messages, e.g.
/// `N=60000 shape=28x28x1 classes=10 sha256=3f2a...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DatasetFingerprint {
    /// Definition of [`Self::sha256`] (see the module documentation).
    pub version: u32,
    pub n: u64,
    pub height: u64,
    pub width: u64,
    pub channels: u64,
    /// `None` for an unlabelled dataset.
    pub num_classes: Option<u64>,
    /// Lower-case hex SHA-256 (64 characters).
    pub sha256: String,
}

impl DatasetFingerprint {
    /// A canonical byte form (the [`Display`](fmt::Display) text), e.g. for an all-ranks equality check.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for DatasetFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "N={} shape={}x{}x{} classes={} sha256={}",
            self.n,
            self.height,
            self.width,
            self.channels,
            self.num_classes
                .map_or_else(|| "none".to_string(), |k| k.to_string()),
            self.sha256
        )?;
        if self.version != FINGERPRINT_VERSION {
            write!(f, " (fingerprint v{})", self.version)?;
        }
        Ok(())
    }
}

fn put(h: &mut Sha256, v: u64) {
    h.update(v.to_le_bytes());
}

/// The digest of the module documentation, fed the image chunks in order by whoever is reading them
/// anyway (`inspect` computes its statistics and the fingerprint in the same pass).
pub struct FingerprintHasher {
    h: Sha256,
    dims: [u64; 4],
    num_classes: Option<u64>,
    pixels: u64,
}

impl FingerprintHasher {
    /// Hashes the shape, classes and labels of `ds`; the pixels follow through [`Self::update`].
    pub fn new(ds: &Hdf5Dataset) -> Self {
        let mut h = Sha256::new();
        h.update(b"ddpm-data dataset fingerprint v1\0");
        let dims = [ds.len(), ds.height(), ds.width(), ds.channels()].map(|d| d as u64);
        for d in dims {
            put(&mut h, d);
        }
        let num_classes = ds.num_classes().map(|k| k as u64);
        put(&mut h, num_classes.unwrap_or(0));
        if num_classes.is_some() {
            for name in ds.class_names() {
                put(&mut h, name.len() as u64);
                h.update(name.as_bytes());
            }
        }
        match ds.labels_slice() {
            Some(labels) => {
                put(&mut h, 1);
                for &y in labels {
                    h.update(y.to_le_bytes());
                }
            }
            None => put(&mut h, 0),
        }
        Self {
            h,
            dims,
            num_classes,
            pixels: 0,
        }
    }

    /// The next pixel bytes of `images`, in dataset order.
    pub fn update(&mut self, pixels: &[u8]) {
        self.pixels += pixels.len() as u64;
        self.h.update(pixels);
    }

    /// The fingerprint. Panics when the bytes fed are not exactly N*H*W*C: that is a bug in the
    /// caller, and a fingerprint of part of the data must never pass for the whole.
    pub fn finish(self) -> DatasetFingerprint {
        let [n, height, width, channels] = self.dims;
        assert_eq!(
            self.pixels,
            n * height * width * channels,
            "fingerprint fed {} pixel bytes for a dataset of {n}x{height}x{width}x{channels}",
            self.pixels
        );
        let sha256 = self
            .h
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        DatasetFingerprint {
            version: FINGERPRINT_VERSION,
            n,
            height,
            width,
            channels,
            num_classes: self.num_classes,
            sha256,
        }
    }
}

/// Computes the fingerprint of an opened dataset by reading every chunk, in this process (see the
/// module documentation). Errors name the file and `images` when a chunk cannot be read.
pub fn compute(ds: &Hdf5Dataset) -> Result<DatasetFingerprint> {
    let mut h = FingerprintHasher::new(ds);
    for k in 0..ds.num_chunks() {
        h.update(&ds.read_chunk(k)?);
    }
    Ok(h.finish())
}

impl Hdf5Dataset {
    /// The dataset's content fingerprint: the one the checking child computed when the file was
    /// opened, or from the cache, or one pass over the images (see [`crate::fingerprint`]).
    pub fn fingerprint(&self) -> Result<DatasetFingerprint> {
        if let Some(fp) = self
            .checked_fingerprint()
            .or_else(|| known(self.path(), self.version()))
        {
            return Ok(fp);
        }
        let fp = compute(self)?;
        remember(self.path(), self.version(), &fp);
        Ok(fp)
    }
}

/// Which version of a file was read: equal only if no byte can have changed in between (short of
/// a privileged user setting the clock back). `ctime` is part of it because `mtime` can be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileVersion {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

/// Files changed this recently are not cached (git's "racily clean" rule).
pub const RACY_SECS: i128 = 2;

impl FileVersion {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }

    fn settled(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now - self.mtime_ns.max(self.ctime_ns) > RACY_SECS * 1_000_000_000
    }
}

/// The sidecar: the last [`SIDECAR_ENTRIES`] versions (one per node that sees a shared file under
/// its own device number) with their fingerprints.
#[derive(Serialize, Deserialize)]
struct Sidecar {
    format: String,
    entries: Vec<(FileVersion, DatasetFingerprint)>,
}

const SIDECAR_FORMAT: &str = "ddpm-data check cache v1";
const SIDECAR_ENTRIES: usize = 8;

fn sidecar_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".ddpm-check.json");
    path.with_file_name(name)
}

fn read_sidecar(path: &Path) -> Option<Sidecar> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(sidecar_path(path))
        .ok()?
        .take(1 << 20)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str::<Sidecar>(&text)
        .ok()
        .filter(|s| s.format == SIDECAR_FORMAT)
}

static MEMO: Mutex<Option<HashMap<FileVersion, DatasetFingerprint>>> = Mutex::new(None);

/// The fingerprint of this exact version of `path`, when a child checked it before (in this
/// process or, through the sidecar, in an earlier one). A hit also means "read through without a
/// crash": [`Hdf5Dataset::open`] skips the check.
pub fn known(path: &Path, version: &FileVersion) -> Option<DatasetFingerprint> {
    let memo = MEMO.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(fp) = memo.as_ref().and_then(|m| m.get(version)) {
        return Some(fp.clone());
    }
    drop(memo);
    let (_, fp) = read_sidecar(path)?
        .entries
        .into_iter()
        .find(|(v, _)| v == version)?;
    Some(fp)
}

/// Records that `version` of `path` was read through and has fingerprint `fp` (see [`known`]);
/// best effort, and nothing for a file that changed within [`RACY_SECS`].
pub fn remember(path: &Path, version: &FileVersion, fp: &DatasetFingerprint) {
    if !version.settled() {
        return;
    }
    let mut memo = MEMO.lock().unwrap_or_else(|p| p.into_inner());
    memo.get_or_insert_with(HashMap::new)
        .insert(*version, fp.clone());
    drop(memo);
    let mut sc = read_sidecar(path).unwrap_or(Sidecar {
        format: SIDECAR_FORMAT.into(),
        entries: Vec::new(),
    });
    sc.entries.retain(|(v, _)| v != version);
    sc.entries.insert(0, (*version, fp.clone()));
    sc.entries.truncate(SIDECAR_ENTRIES);
    let text = serde_json::to_string_pretty(&sc).unwrap_or_default();
    if let Err(e) = ddpm_io::write_atomic(&sidecar_path(path), text.as_bytes()) {
        tracing::debug!("not caching the fingerprint of {}: {e}", path.display());
    }
}
