//! One error type for the sampler library, so the binaries can tell bad settings from a bad
//! checkpoint from a numerical failure.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// A sampler setting that cannot be honoured (bad step spec, option that does not apply, ...).
    #[error("invalid sampler setting: {0}")]
    Config(String),
    /// A checkpoint or run directory that cannot be used; `path` names the file.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// The model or classifier failed or returned something unusable.
    #[error("model: {0}")]
    Model(String),
    /// A sample became NaN or infinite.
    #[error("non-finite values in {what} at sampler step {step}")]
    NonFinite { what: String, step: usize },
    #[error("linear algebra: {0}")]
    Linalg(String),
    #[error(transparent)]
    Diffusion(#[from] ddpm_diffusion::DiffusionError),
    #[error(transparent)]
    Kernel(#[from] ddpm_kernels::KernelError),
    #[error(transparent)]
    UNet(#[from] ddpm_unet::UNetError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = SamplerError> = std::result::Result<T, E>;
