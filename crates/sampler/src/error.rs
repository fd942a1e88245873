//! One error type for the sampler library, so the binaries can tell bad settings from a bad
//! checkpoint from a numerical failure.

#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// A sampler setting that cannot be honoured (bad step spec, option that does not apply, ...).
    #[error("invalid sampler setting: {0}")]
    Config(String),
    /// A checkpoint or run directory that cannot be used; the error names the file.
    #[error(transparent)]
    Checkpoint(#[from] ddpm_checkpoint::CheckpointError),
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
    /// A command-line request that does not fit the model or data (`ddpm-eval`).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Weights(#[from] ddpm_checkpoint::WeightsParseError),
    #[error(transparent)]
    Data(#[from] ddpm_data::DataError),
    #[error(transparent)]
    Dist(#[from] ddpm_dist::DistError),
    /// File output; the message names the file.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = SamplerError> = std::result::Result<T, E>;
