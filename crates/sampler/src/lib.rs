//! Samplers (DDPM, DDIM, DPM-Solver++, Heun) and evaluation binaries

pub mod linalg;

#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("linear algebra: {0}")]
    Linalg(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
