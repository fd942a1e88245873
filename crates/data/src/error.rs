//! One error type for the whole crate.
//!
//! Every variant that concerns a file carries its path, and the ones about a part of an HDF5 file carry
//! the dataset or attribute name, because "bad input" errors are only actionable when they say *where*
//! the problem is. Underlying library messages (HDF5, I/O, image decoding) are folded into the
//! message text rather than chained, so that a plain `to_string()` (what a training log prints) is
//! already complete.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A problem with a file as a whole (missing, not HDF5, truncated, wrong input format).
    #[error("{}: {what}", path.display())]
    File { path: PathBuf, what: String },

    /// A problem with one HDF5 dataset (or, for converters, one named field of an input file).
    #[error("{}: dataset `{name}`: {what}", path.display())]
    Dataset {
        path: PathBuf,
        name: String,
        what: String,
    },

    /// A problem with one root attribute of an HDF5 file.
    #[error("{}: attribute `{name}`: {what}", path.display())]
    Attribute {
        path: PathBuf,
        name: String,
        what: String,
    },

    /// An I/O failure while reading or writing a file.
    #[error("{}: {what}: {err}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        err: std::io::Error,
    },

    /// Invalid arguments (world size, rank, batch size, resume position, converter options).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The background loader thread stopped (after an earlier error, or by panicking).
    #[error("data loader: {0}")]
    Loader(String),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub fn file(path: &Path, what: impl Into<String>) -> Self {
        Self::File {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub fn dataset(path: &Path, name: &str, what: impl Into<String>) -> Self {
        Self::Dataset {
            path: path.to_path_buf(),
            name: name.to_string(),
            what: what.into(),
        }
    }

    pub fn attribute(path: &Path, name: &str, what: impl Into<String>) -> Self {
        Self::Attribute {
            path: path.to_path_buf(),
            name: name.to_string(),
            what: what.into(),
        }
    }

    pub fn io(path: &Path, what: impl Into<String>, err: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            what: what.into(),
            err,
        }
    }
}
