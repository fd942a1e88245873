use thiserror::Error;

/// Errors of the communication layer.
///
/// Some errors are *collective*: every rank detects the same condition in the same collective call (a
/// config mismatch, a shape mismatch of a broadcast), so every rank can report it and leave together.
/// The others are local to one rank, which then has to take the job down (see [`crate::fail`]) because
/// its peers would otherwise wait for it forever in the next collective.
#[derive(Debug, Error)]
pub enum DistError {
    /// The ranks disagree about something they must agree on. Detected identically on every rank.
    #[error("{0}")]
    Mismatch(String),

    /// The process was started by a parallel launcher in a way this build cannot honour.
    #[error("launch: {0}")]
    Launch(String),

    /// A buffer or message too large for the underlying library's counts.
    #[error("{what} has {len} elements, more than the {limit} one MPI call can carry")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },

    /// Gradients handed to [`crate::GradientSync`] do not match the layout it was built for.
    #[error("gradient {index}: {message}")]
    Gradient { index: usize, message: String },

    /// CUDA device selection or NCCL failure.
    #[error("device: {0}")]
    Device(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DistError {
    /// True when every rank sees this same error at the same point, so the ranks may report it and stop
    /// together instead of one rank aborting the others.
    pub fn is_collective(&self) -> bool {
        matches!(self, DistError::Mismatch(_))
    }
}

pub type Result<T, E = DistError> = std::result::Result<T, E>;
