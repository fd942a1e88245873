//! One error type for the crate, so callers can tell a bad config from a bad checkpoint from a
//! numerical failure without parsing strings.

use std::path::PathBuf;

/// Every failure of this crate.
#[derive(Debug, thiserror::Error)]
pub enum UNetError {
    /// A configuration value is out of range or inconsistent with another one. `field` is the
    /// TOML key (in the `[model]` table) to fix.
    #[error("invalid model config: `{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },

    /// The TOML text could not be parsed into a config.
    #[error("cannot parse model config{}: {message}", source_name(.path))]
    ConfigParse {
        path: Option<PathBuf>,
        message: String,
    },

    /// A forward call got tensors the model cannot accept (wrong shape, missing labels, ...).
    #[error("bad model input: {0}")]
    Input(String),

    /// A checkpoint does not match the model it is loaded into. All problems are listed at once so
    /// one run tells the user everything that is wrong with the file.
    #[error("checkpoint {path} does not match the model: {}", describe_mismatch(.missing, .mismatched, .unexpected))]
    Checkpoint {
        path: PathBuf,
        /// Parameters of the model that the file lacks.
        missing: Vec<String>,
        /// `(name, shape in the model, shape in the file)`.
        mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
        /// Tensors in the file that the model does not have.
        unexpected: Vec<String>,
    },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {message}")]
    SafeTensors { path: PathBuf, message: String },

    /// An error from candle (device, dtype, op failure).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = UNetError> = std::result::Result<T, E>;

fn source_name(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

fn describe_mismatch(
    missing: &[String],
    mismatched: &[(String, Vec<usize>, Vec<usize>)],
    unexpected: &[String],
) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing tensors: {}", missing.join(", ")));
    }
    if !mismatched.is_empty() {
        let m: Vec<String> = mismatched
            .iter()
            .map(|(n, want, got)| format!("{n} (model {want:?}, file {got:?})"))
            .collect();
        parts.push(format!("shape mismatches: {}", m.join(", ")));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected tensors: {}", unexpected.join(", ")));
    }
    parts.join("; ")
}

pub(crate) fn config_err(field: &'static str, message: impl Into<String>) -> UNetError {
    UNetError::Config {
        field,
        message: message.into(),
    }
}
