//! Crash-safe file writes and PNG output, for every crate that leaves files behind (datasets,
//! checkpoints, metrics, pictures, samples); and [`mutate`], the fuzz tests' mutation engine.
//!
//! A reader (a resumed job, the sampler, a person copying a run) must never see a half-written file
//! under its final name: a preempted job can be killed at any instruction. Data is written to a
//! temporary sibling, flushed to disk, renamed over the final name (atomic on POSIX within one file
//! system), and the directory entry itself is flushed so the rename survives a power loss.
//!
//! Must not depend on any other ddpm crate: it sits below all of them.

mod atomic;
pub mod mutate;
mod png_out;

pub use atomic::{
    commit, fsync_dir, publish_dir, temp_sibling, write_atomic, write_atomic_with, write_synced,
};
pub use png_out::{encode_png, write_png};
