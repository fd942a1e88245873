//! The ddpm-rs training job: the training loop ([`TrainLoop`]), EMA, AdamW, metrics and pictures.
//!
//! The binary (`src/main.rs`) is a thin CLI over [`trainer::train`]; the library is public so tests
//! and tools can drive training in-process. The config schema is `ddpm-config`'s, the checkpoint
//! format `ddpm-checkpoint`'s, the preview sampler `ddpm-sampler`'s.

mod continuous;
pub mod distill;
pub mod ema;
pub mod metrics;
pub mod optim;
mod outputs;
mod persist;
pub mod plot;
mod run;
pub mod schedule_plot;
pub mod signals;
pub mod timesteps;
pub mod trainer;

pub use ddpm_checkpoint::{Checkpoint, Manifest};
pub use ddpm_config::{Overrides, Task, TrainConfig};
pub use trainer::{inspect_model, train, ResumeFrom, TrainLoop, TrainOptions, TrainOutcome};
