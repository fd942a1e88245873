//! Every HDF5 file is read by a child process before this process opens it.
//!
//! libhdf5 is not memory-safe on damaged metadata. The fuzzer found, in Debian 12's 1.10.8,
//! out-of-bounds reads in `H5HG_read` (and its `memcpy`) when a variable-length string points into a
//! corrupt global heap, endless loops in `H5HG__protect`, and a use-after-free in `H5A__close` after
//! a corrupt attribute message fails to decode. A crash inside the C library cannot be caught by the process that called it, and that
//! process may be one rank of an MPI job. So [`Hdf5Dataset::open`](crate::Hdf5Dataset::open) first
//! has a child do all the reading this process may do ([`check_in_this_process`]: open and validate,
//! every chunk, the fingerprint), and only then opens the file itself. A child that finished with an
//! ordinary error lets the parent reproduce that error in-process, with its full detail; a child
//! killed by a signal, or still running after the timeout, becomes an error naming the file.
//!
//! # Where the child comes from
//! The child is [`std::env::current_exe`] in a hidden mode: a hook in `.init_array`, run by the
//! dynamic loader before `main` in every executable linking this crate (`ddpm-train`,
//! `ddpm-sample`, `ddpm-eval`, `ddpm-data`, examples, benches and `cargo test` binaries alike), sees
//! [`PROBE_ENV`], does the check and exits before `main`, MPI or CUDA start. It is started by
//! `std::process::Command` (posix_spawn, no fork), which is safe in a parent with threads.
//!
//! # Cost
//! One check per file version (device, inode, size, mtime, ctime) per process: the result is
//! remembered, so the loader's open after the trainer's costs nothing, and the fingerprint the child
//! computed is cached ([`crate::fingerprint`]), so the parent never reads the file twice.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{DataError, Result};
use crate::fingerprint::{DatasetFingerprint, FileVersion};

/// Set (to the file's path) in the child's environment: the child checks that file and exits.
pub const PROBE_ENV: &str = "DDPM_HDF5_PROBE";
/// Seconds the child may take, overriding the default of 60 s + 1 s per 8 MiB of file.
pub const TIMEOUT_ENV: &str = "DDPM_HDF5_PROBE_TIMEOUT_S";
/// The child's first stdout line on success, followed by the fingerprint as JSON.
const OK_LINE: &str = "ddpm-hdf5-probe ok ";
/// Exit status of a child whose check returned an ordinary error.
const EXIT_REJECTED: i32 = 3;
/// Exit status of a child whose check panicked (a bug in this crate, not the file's fault).
const EXIT_PANIC: i32 = 4;

#[used]
#[cfg_attr(target_os = "linux", link_section = ".init_array")]
#[cfg_attr(target_os = "macos", link_section = "__DATA,__mod_init_func")]
static PROBE_HOOK: extern "C" fn() = probe_hook;

/// The child's `main`: runs before the executable's own `main` when [`PROBE_ENV`] is set.
extern "C" fn probe_hook() {
    let Some(path) = std::env::var_os(PROBE_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    let code = match std::panic::catch_unwind(|| check_in_this_process(&path)) {
        Ok(Ok(fp)) => {
            let json = serde_json::to_string(&fp).unwrap_or_default();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{OK_LINE}{json}").and_then(|_| out.flush());
            0
        }
        Ok(Err(e)) => {
            eprintln!("{e}");
            EXIT_REJECTED
        }
        Err(_) => EXIT_PANIC, // the panic hook has printed the message to stderr
    };
    std::process::exit(code);
}

/// What the child does: everything a process may later read from the file, in-process.
pub fn check_in_this_process(path: &Path) -> Result<DatasetFingerprint> {
    let ds = crate::Hdf5Dataset::open_in_this_process(path)?;
    let fp = crate::fingerprint::compute(&ds)?;
    drop(ds); // closing runs libhdf5's clean-up of what was opened: part of the check
    Ok(fp)
}

/// Has a child read `path` through: `Ok(Some(fingerprint))` when it passed, `Ok(None)` when it
/// finished with an ordinary error (the caller's own open reproduces it, with its detail), an error
/// naming the file when the child crashed, panicked or ran past the timeout.
pub fn check_in_child(path: &Path, version: &FileVersion) -> Result<Option<DatasetFingerprint>> {
    std::hint::black_box(&PROBE_HOOK); // keeps the hook's object in every executable using this
    let exe = std::env::current_exe().map_err(|e| {
        DataError::io(
            path,
            "cannot start the HDF5 check: no current executable",
            e,
        )
    })?;
    let mut child = Command::new(&exe)
        .arg("--ddpm-hdf5-probe") // an executable without the hook refuses this and exits
        .env(PROBE_ENV, path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            DataError::io(
                path,
                format!("cannot start the HDF5 check ({})", exe.display()),
                e,
            )
        })?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let limit = timeout(version.size);
    let status = wait_for(&mut child, limit)
        .map_err(|e| DataError::io(path, "waiting for the HDF5 check failed", e))?;
    let (out, err) = (join(out), join(err));
    let fail = |what: String| Err(DataError::file(path, what));
    let Some(status) = status else {
        return fail(format!(
            "reading it did not finish within {} s (a damaged or crafted file can make libhdf5 \
             loop); the checking process was killed ({} overrides the limit)",
            limit.as_secs(),
            TIMEOUT_ENV
        ));
    };
    if status.success() {
        let fp = out
            .strip_prefix(OK_LINE)
            .and_then(|s| serde_json::from_str(s.trim_end()).ok());
        let Some(fp) = fp else {
            return fail(format!(
                "the HDF5 check ({}) did not answer as expected (is it a ddpm executable?): {out:?}",
                exe.display()
            ));
        };
        return Ok(Some(fp));
    }
    match status.code() {
        Some(EXIT_REJECTED) => Ok(None),
        Some(EXIT_PANIC) => fail(format!(
            "ddpm-data panicked while checking it (a bug): {err}"
        )),
        _ => fail(format!(
            "libhdf5 crashed reading it in a checking process ({}): the file is damaged or crafted \
             and was not opened{}",
            describe(&status),
            if err.is_empty() { String::new() } else { format!("; its stderr: {err}") }
        )),
    }
}

fn timeout(file_bytes: u64) -> Duration {
    let secs = std::env::var(TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60 + file_bytes / (8 << 20));
    Duration::from_secs(secs)
}

/// Waits for `child` at most `limit`; `None` (and the child killed) when it ran past it.
fn wait_for(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

type Drain = Option<std::thread::JoinHandle<String>>;

/// Reads a child's pipe on a thread (so a chatty child cannot block on a full pipe): the first
/// 16 KiB are kept, the rest discarded.
fn drain(pipe: Option<impl Read + Send + 'static>) -> Drain {
    let mut pipe = pipe?;
    std::thread::Builder::new()
        .name("hdf5-check-pipe".into())
        .spawn(move || {
            let mut kept = Vec::new();
            let _ = pipe.by_ref().take(16 << 10).read_to_end(&mut kept);
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            String::from_utf8_lossy(&kept).trim().to_string()
        })
        .ok()
}

fn join(d: Drain) -> String {
    d.and_then(|h| h.join().ok()).unwrap_or_default()
}

fn describe(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.signal(), status.code()) {
        (Some(11), _) => "SIGSEGV".into(),
        (Some(6), _) => "SIGABRT".into(),
        (Some(7), _) => "SIGBUS".into(),
        (Some(s), _) => format!("signal {s}"),
        (None, Some(c)) => format!("exit status {c}"),
        (None, None) => "unknown status".into(),
    }
}
