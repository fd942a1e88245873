//! The ddpm-rs training job: configuration, training loop, EMA, AdamW, checkpoints, metrics.
//!
//! The binary (`src/main.rs`) is a thin CLI over [`trainer::train`]; the library is public so the
//! sampler can read checkpoints ([`checkpoint`]) and tests can drive training in-process.

pub mod atomic;
pub mod ema;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod signals;
pub mod timesteps;
