//! The ddpm-rs training job: configuration, training loop, EMA, AdamW, checkpoints, metrics.
//!
//! The binary (`src/main.rs`) is a thin CLI over [`trainer::train`]; the library is public so the
//! sampler can read checkpoints and configs ([`checkpoint`], [`config`]) and tests can drive
//! training in-process.

pub mod atomic;
pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod metrics;
pub mod optim;
mod outputs;
mod persist;
pub mod plot;
pub mod preview;
mod run;
pub mod signals;
mod step;
pub mod timesteps;
pub mod trainer;

pub use checkpoint::{find_latest, Checkpoint, Manifest};
pub use config::{Overrides, Task, TrainConfig};
pub use trainer::{inspect_model, train, ResumeFrom, TrainOptions, TrainOutcome};
