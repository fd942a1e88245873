//! The ddpm-train binary: training job, checkpoints, metrics
