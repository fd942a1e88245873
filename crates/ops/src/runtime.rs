//! Process-wide settings: thread count, the fast-path switch, allocator tuning.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Threads the kernels split work over: candle's own count (`RAYON_NUM_THREADS`, else the
/// physical cores), read once. candle's `get_num_threads` re-reads `/proc/cpuinfo` on every call
/// when `RAYON_NUM_THREADS` is unset; see [`init_cpu_threads`].
pub fn num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let n = candle_core::utils::get_num_threads().max(1);
            THREADS.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    }
}

/// Overrides the thread count the kernels plan for (tests of the threaded paths, benches).
/// Work still runs on rayon's global pool; this only changes how it is split.
pub fn set_num_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static FAST: AtomicU8 = AtomicU8::new(UNSET);

/// Whether CPU f32/f64 tensors take this crate's kernels. Default on; `DDPM_OPS=candle` in the
/// environment (read on first use) or [`set_fast_path`]`(false)` selects candle's built-in ops,
/// for A/B comparisons of speed and of training curves.
pub fn fast_path_enabled() -> bool {
    match FAST.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var("DDPM_OPS").map_or(true, |v| v != "candle");
            FAST.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Overrides `DDPM_OPS` for the rest of the process.
pub fn set_fast_path(on: bool) {
    FAST.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

/// Pins candle's thread count by setting `RAYON_NUM_THREADS` to it when unset, so that candle's
/// matmul stops re-reading `/proc/cpuinfo` on every call (about 2% of a CPU training step).
/// Call at the start of `main`, before any thread is spawned (it sets an environment variable).
pub fn init_cpu_threads() -> usize {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads().max(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    num_threads()
}

/// Keeps freed memory in glibc's heap instead of returning it to the kernel, so the next
/// tensor of the same size reuses warm pages instead of taking fresh page faults (every candle
/// op allocates its output). Raises the mmap threshold to `bytes` (tensors below it come from
/// the heap) and the trim threshold to twice that. Returns false where glibc's `mallopt` is not
/// available or refuses. Call early in `main`; it is process-wide.
pub fn tune_malloc(bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let b = bytes.min(i32::MAX as usize / 2) as libc::c_int;
        // SAFETY: mallopt only adjusts allocator parameters.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, b) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * b) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}
