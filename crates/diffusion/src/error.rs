//! One error type for the crate, so callers can tell bad configuration from a tensor failure.

use thiserror::Error;

/// Everything that can go wrong in the diffusion math.
///
/// Bad configuration (schedules, respacing strings) and bad per-call input (timesteps out of range,
/// batch sizes that do not match) are reported as values instead of panics, because they usually come
/// from a user's config file or a checkpoint and must name what was wrong.
#[derive(Debug, Error)]
pub enum DiffusionError {
    /// A beta schedule that cannot define a valid forward process.
    #[error("invalid noise schedule: {0}")]
    InvalidSchedule(String),
    /// A `timestep_respacing` / `section_counts` string that cannot be honoured.
    #[error("invalid timestep respacing {spec:?} for {num_timesteps} timesteps: {reason}")]
    InvalidRespacing {
        spec: String,
        num_timesteps: usize,
        reason: String,
    },
    /// A timestep index outside `0..num_timesteps`.
    #[error("timestep {t} is out of range for a diffusion with {num_timesteps} timesteps")]
    TimestepOutOfRange { t: usize, num_timesteps: usize },
    /// Tensor shapes, batch sizes or per-sample vectors that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A method was used in a way the configuration does not allow (e.g. an ELBO that is incomplete).
    #[error("invalid use: {0}")]
    InvalidUse(String),
    /// An error from candle while doing tensor math.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DiffusionError>;
