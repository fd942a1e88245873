//! Preemption signals.
//!
//! SLURM sends SIGUSR1 (with `--signal=USR1@T`) or SIGTERM before killing a job. Handlers only set
//! a flag: the training loop checks it after each step, all-reduces it so every rank stops at the
//! same step, writes a checkpoint and exits with [`EXIT_PREEMPTED`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Exit status after a signal-triggered checkpoint. 0, so launchers treat it as a clean stop; a
/// requeued job continues with `--resume auto`.
pub const EXIT_PREEMPTED: i32 = 0;

#[derive(Clone)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag no signal sets (library use, tests).
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }

    /// Registers SIGTERM and SIGUSR1 handlers that set the flag. A second SIGTERM while the first
    /// is pending terminates immediately (the default action), so a stuck job can still be killed.
    pub fn install() -> std::io::Result<Self> {
        let f = Self::new();
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            // Conditional shutdown must be registered first: it fires only when the flag is already set.
            signal_hook::flag::register_conditional_shutdown(sig, 1, f.0.clone())?;
        }
        for sig in [
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGUSR1,
            signal_hook::consts::SIGINT,
        ] {
            signal_hook::flag::register(sig, f.0.clone())?;
        }
        Ok(f)
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Default for StopFlag {
    fn default() -> Self {
        Self::new()
    }
}
