//! The start every distributed binary shares (`ddpm-train`, `ddpm-sample`, `ddpm-eval`): logging,
//! the communicator, the failure handlers; and the end of `main` on an error.

use std::error::Error;

use candle_core::Device;

use crate::{Communicator, DistError, Result};

/// This process's rank as the launcher announces it, before any communicator exists (for logging).
pub fn rank_from_env() -> usize {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Whether log lines get ANSI colours: only on a terminal (a SLURM or redirected log file would
/// otherwise fill with escape codes), and never when `NO_COLOR` is set to a non-empty value
/// (<https://no-color.org>).
pub fn log_colours(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Logs to stderr, filtered by `RUST_LOG`, else at `default` on rank 0 and `warn` on the others;
/// coloured only as [`log_colours`] allows. A second call does nothing.
pub fn init_tracing(default: &str) {
    use std::io::IsTerminal;
    let ansi = log_colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let default = if rank_from_env() == 0 {
        default
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// Logging ([`init_tracing`]), the communicator and the failure handlers. `device`: `cpu` (host
/// collectives, [`crate::init`]) or `cuda` (NCCL and this rank's GPU, feature `cuda`).
pub fn start(device: &str, default_log: &str) -> Result<(Box<dyn Communicator>, Device)> {
    start_with(device, default_log, &crate::DistOptions::default())
}

/// [`start`] with the collective watchdog's options (`dist.timeout_s` of a run config).
pub fn start_with(
    device: &str,
    default_log: &str,
    opts: &crate::DistOptions,
) -> Result<(Box<dyn Communicator>, Device)> {
    init_tracing(default_log);
    let (comm, device) = match device {
        "cpu" => (crate::init_with(opts)?, Device::Cpu),
        #[cfg(feature = "cuda")]
        "cuda" => crate::init_cuda_with(opts)?,
        #[cfg(not(feature = "cuda"))]
        "cuda" => {
            return Err(DistError::Device(
                "--device cuda: this binary was built without the `cuda` feature".into(),
            ))
        }
        other => {
            return Err(DistError::Device(format!(
                "--device must be cpu or cuda, got {other:?}"
            )))
        }
    };
    crate::install_failure_handlers(&*comm);
    Ok((comm, device))
}

/// The value of `result`, or the end of the job through [`crate::fail`] (every rank, status 1).
pub fn or_fail<T, E>(comm: &dyn Communicator, result: std::result::Result<T, E>) -> T
where
    E: Into<Box<dyn Error + Send + Sync + 'static>>,
{
    match result {
        Ok(v) => v,
        Err(e) => {
            let e: Box<dyn Error + Send + Sync + 'static> = e.into();
            crate::fail(comm, &*e)
        }
    }
}

/// [`start`] for binaries whose errors end the job through [`crate::fail`]: a failed start ends
/// the process the same way.
pub fn start_or_exit(device: &str, default_log: &str) -> (Box<dyn Communicator>, Device) {
    or_fail(&crate::SingleProcess::new(), start(device, default_log))
}

#[cfg(test)]
mod tests {
    use super::log_colours;
    use std::ffi::OsStr;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(log_colours(true, None));
        assert!(log_colours(true, Some(OsStr::new(""))));
        assert!(!log_colours(true, Some(OsStr::new("1"))));
        assert!(!log_colours(false, None));
        assert!(!log_colours(false, Some(OsStr::new("1"))));
    }
}
