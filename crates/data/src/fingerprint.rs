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
//! # Cost
//! One sequential pass over `images`, chunk by chunk through [`Hdf5Dataset::read_chunk`]: every chunk is
//! read and decompressed once, as one `ddpm-data inspect` does, with one chunk in memory at a time
//! (at most [`crate::limits::MAX_CHUNK_BYTES`]). The format's files carry no per-chunk checksums
//! (the converters write deflate without Fletcher-32), so there is nothing cheaper that still covers
//! every pixel. Callers that need it more than once should compute it once and pass it around.

use std::fmt;

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

/// Computes the fingerprint of an opened dataset (see the module documentation for the definition and
/// the cost). Errors name the file and `images` when a chunk cannot be read.
pub fn fingerprint(ds: &Hdf5Dataset) -> Result<DatasetFingerprint> {
    let mut h = FingerprintHasher::new(ds);
    for k in 0..ds.num_chunks() {
        h.update(&ds.read_chunk(k)?);
    }
    Ok(h.finish())
}

impl Hdf5Dataset {
    /// The dataset's content fingerprint; one pass over the images (see [`crate::fingerprint`]).
    pub fn fingerprint(&self) -> Result<DatasetFingerprint> {
        fingerprint(self)
    }
}
