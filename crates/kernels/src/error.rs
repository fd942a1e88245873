/// Errors of the fused ops: bad arguments are reported before any work, naming the op and the argument.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {msg}")]
    BadInput { op: &'static str, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl KernelError {
    pub(crate) fn bad(op: &'static str, msg: impl Into<String>) -> Self {
        Self::BadInput {
            op,
            msg: msg.into(),
        }
    }
}

/// Lets callers that work in `candle_core::Result` use `?` on the ops.
impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        match e {
            KernelError::Candle(c) => c,
            other => candle_core::Error::msg(other),
        }
    }
}
