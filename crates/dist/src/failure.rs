//! Making one rank's failure end the whole job promptly.
//!
//! Without this a rank that panics or returns an error simply exits, and its peers wait forever in
//! their next collective (MPI and NCCL have no timeout by default). The rules:
//! - a panic anywhere (any thread) prints `rank R: panic: ...` and aborts the job (MPI_Abort);
//! - an error reaching `main` goes through [`fail`]: `rank R: error: ...`, then MPI_Abort;
//! - a rank killed by a signal is noticed by the launcher itself (OpenMPI's mpirun, `srun -K`), which
//!   kills the other ranks and exits non-zero. Nothing to do in-process.

use std::error::Error;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::DistError;
use crate::Communicator;

static RANK: AtomicUsize = AtomicUsize::new(0);
static WORLD: AtomicUsize = AtomicUsize::new(1);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Exit status used when a panic takes the job down (Rust's own panic status).
pub const PANIC_EXIT_CODE: i32 = 101;

/// Installs the panic hook that names the rank and, in a world of more than one rank, aborts every
/// rank of the job. Call right after [`crate::init`]. Idempotent.
pub fn install_failure_handlers(comm: &dyn Communicator) {
    RANK.store(comm.rank(), Ordering::SeqCst);
    WORLD.store(comm.world_size(), Ordering::SeqCst);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let rank = RANK.load(Ordering::SeqCst);
        let thread = std::thread::current();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "<non-string panic payload>".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        line(&format!(
            "rank {rank}: panic: {msg} (thread {}{at})",
            thread.name().unwrap_or("<unnamed>")
        ));
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
        if WORLD.load(Ordering::SeqCst) > 1 {
            abort_world(PANIC_EXIT_CODE);
        }
    }));
}

/// Writes one line to stderr in a single write, so lines of different ranks that mpirun merges do not
/// interleave mid-line (`eprintln!` may write a formatted line in pieces).
pub(crate) fn line(s: &str) {
    use std::io::Write;
    let mut buf = String::with_capacity(s.len() + 1);
    buf.push_str(s);
    buf.push('\n');
    let _ = std::io::stderr().lock().write_all(buf.as_bytes());
}

/// Reports `err` (with its chain of causes) as `rank R: error: ...` and ends the job with status 1.
///
/// In a world of one rank this is `exit(1)`. With more ranks it aborts every rank, except that an
/// error every rank detects together ([`DistError::is_collective`], e.g. a config mismatch) first
/// waits for all ranks to print theirs, so each rank says why it stopped.
pub fn fail(comm: &dyn Communicator, err: &(dyn Error + 'static)) -> ! {
    let mut msg = err.to_string();
    let mut collective = false;
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<DistError>() {
            collective |= d.is_collective();
        }
        cur = e.source();
        if let Some(next) = cur {
            // Wrappers such as `#[error(transparent)]` repeat their source's text; print it once.
            let s = next.to_string();
            if !msg.ends_with(&s) {
                msg.push_str(": ");
                msg.push_str(&s);
            }
        }
    }
    line(&format!("rank {}: error: {msg}", comm.rank()));
    if comm.world_size() <= 1 {
        std::process::exit(1);
    }
    if collective {
        let _ = comm.barrier();
    }
    comm.abort(1)
}

/// Ends every rank of the job from anywhere, without a communicator at hand (the panic hook): MPI_Abort
/// on MPI_COMM_WORLD when MPI is running, a plain process abort otherwise.
pub fn abort_world(code: i32) -> ! {
    #[cfg(feature = "mpi")]
    {
        if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
            // SAFETY: MPI is initialised and not finalised; MPI_Abort may be called from any thread
            // and does not return.
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
            }
        }
    }
    let _ = code;
    std::process::abort()
}
