//! Process-wide settings: thread count, the fast-path switch, allocator tuning.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Threads the kernels split work over: candle's own count (`RAYON_NUM_THREADS`, else the
/// physical cores), read once; inside a smaller rayon pool (a trainer running one shard of the
/// batch per thread, each in a one-thread pool), that pool's size. candle's `get_num_threads`
/// re-reads `/proc/cpuinfo` on every call when `RAYON_NUM_THREADS` is unset; see [`init_cpu`].
pub fn num_threads() -> usize {
    let n = match THREADS.load(Ordering::Relaxed) {
        0 => {
            let n = candle_core::utils::get_num_threads().max(1);
            THREADS.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    };
    match rayon::current_thread_index() {
        Some(_) => n.min(rayon::current_num_threads()),
        None => n,
    }
}

/// Overrides the thread count the kernels plan for (tests of the threaded paths, benches).
/// Work still runs on rayon's global pool; this only changes how it is split.
pub fn set_num_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

static TILE_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_TILE_BYTES);

/// Default im2col tile: half of a 1 MiB L2, leaving room for the packed operands.
pub const DEFAULT_TILE_BYTES: usize = 512 * 1024;

/// Size of one im2col column tile the conv kernels aim for (0: a whole example at once).
pub fn tile_bytes() -> usize {
    TILE_BYTES.load(Ordering::Relaxed)
}

/// Sets [`tile_bytes`] (benchmarks; the default suits a 1-2 MiB L2).
pub fn set_tile_bytes(bytes: usize) {
    TILE_BYTES.store(bytes, Ordering::Relaxed);
}

static WINOGRAD: AtomicU8 = AtomicU8::new(UNSET);

/// Whether 3x3 stride-1 padding-1 convs use Winograd F(2x2, 3x3) (default) rather than the
/// im2col GEMM. `DDPM_OPS_WINOGRAD=0` in the environment (read on first use) or
/// [`set_winograd`]`(false)` turns it off.
pub fn winograd_enabled() -> bool {
    switch(&WINOGRAD, "DDPM_OPS_WINOGRAD", "0")
}

/// Overrides `DDPM_OPS_WINOGRAD` for the rest of the process (benchmarks, tests).
pub fn set_winograd(on: bool) {
    set_switch(&WINOGRAD, on);
}

static WINOGRAD_BLOCK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of transformed data per Winograd block, overriding each variant's default (0: the
/// defaults). Any size gives correct results; tests use tiny blocks to split tile rows.
pub fn set_winograd_block_bytes(bytes: usize) {
    WINOGRAD_BLOCK_BYTES.store(bytes, Ordering::Relaxed);
}

/// The override set by [`set_winograd_block_bytes`], or `default`.
pub(crate) fn winograd_block_bytes(default: usize) -> usize {
    match WINOGRAD_BLOCK_BYTES.load(Ordering::Relaxed) {
        0 => default,
        n => n,
    }
}

static SGEMM512: AtomicU8 = AtomicU8::new(UNSET);

/// Whether f32 GEMMs of the convolutions use this crate's AVX-512 kernel on CPUs that have
/// AVX-512F (default) rather than the `gemm` crate's. `DDPM_OPS_AVX512=0` (read on first use)
/// or [`set_sgemm512`]`(false)` turns it off, for A/B comparisons.
pub fn sgemm512_enabled() -> bool {
    switch(&SGEMM512, "DDPM_OPS_AVX512", "0")
}

/// Overrides `DDPM_OPS_AVX512` for the rest of the process (benchmarks, tests).
pub fn set_sgemm512(on: bool) {
    set_switch(&SGEMM512, on);
}

static GATHER: AtomicU8 = AtomicU8::new(UNSET);

/// Whether the f32 Winograd tile transforms use the gathered vector kernels (AVX-512 or AVX2)
/// rather than the scalar loops; both give bitwise the same results. `DDPM_OPS_GATHER=1` / `=0`
/// (read on first use) or [`set_gather`] decide; otherwise the faster of the two on this CPU,
/// measured once at the first call (a few milliseconds; gathers are slow on some CPUs, see
/// `winograd/calibrate.rs`).
pub fn gather_enabled() -> bool {
    match GATHER.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = match std::env::var("DDPM_OPS_GATHER").as_deref() {
                Ok("0") => false,
                Ok("1") => true,
                _ => crate::winograd::gather_pays(),
            };
            set_switch(&GATHER, on);
            on
        }
    }
}

/// The CPU kernels this process runs, in a few words (for logs and benchmark records). Runs the
/// gather measurement of [`gather_enabled`] if nothing decided it yet.
pub fn kernel_summary() -> String {
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    let gemm = if avx512 && sgemm512_enabled() {
        "AVX-512 kernel"
    } else {
        "gemm crate"
    };
    let transforms = match crate::winograd::cpu_isa() {
        Some(isa) if gather_enabled() => format!("gathered ({isa:?})"),
        _ => "scalar loops".to_string(),
    };
    format!("f32 conv GEMMs: {gemm}; Winograd tile transforms: {transforms}")
}

/// Overrides `DDPM_OPS_GATHER` for the rest of the process (benchmarks, tests).
pub fn set_gather(on: bool) {
    set_switch(&GATHER, on);
}

static WINOGRAD4: AtomicU8 = AtomicU8::new(UNSET);

/// Whether Winograd convs on feature maps of 8+ pixels a side use F(4x4, 3x3) (default) rather
/// than F(2x2, 3x3). `DDPM_OPS_WINOGRAD4=0` (read on first use) or [`set_winograd4`]`(false)`
/// turns it off.
pub fn winograd4_enabled() -> bool {
    switch(&WINOGRAD4, "DDPM_OPS_WINOGRAD4", "0")
}

/// Overrides `DDPM_OPS_WINOGRAD4` for the rest of the process (benchmarks, tests).
pub fn set_winograd4(on: bool) {
    set_switch(&WINOGRAD4, on);
}

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

/// An on/off setting, default on: off when the environment variable `var` is `off` (read on first
/// use), unless [`set_switch`] decided first.
fn switch(state: &AtomicU8, var: &str, off: &str) -> bool {
    match state.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var(var).map_or(true, |v| v != off);
            set_switch(state, on);
            on
        }
    }
}

fn set_switch(state: &AtomicU8, on: bool) {
    state.store(if on { ON } else { OFF }, Ordering::Relaxed);
}
static FAST: AtomicU8 = AtomicU8::new(UNSET);

/// Whether CPU f32/f64 tensors take this crate's kernels. Default on; `DDPM_OPS=candle` in the
/// environment (read on first use) or [`set_fast_path`]`(false)` selects candle's built-in ops,
/// for A/B comparisons of speed and of training curves.
pub fn fast_path_enabled() -> bool {
    switch(&FAST, "DDPM_OPS", "candle")
}

/// Overrides `DDPM_OPS` for the rest of the process.
pub fn set_fast_path(on: bool) {
    set_switch(&FAST, on);
}

/// Process setup for CPU training and sampling; call first thing in `main`, before any thread
/// is spawned (it sets environment variables, which is only sound while single-threaded).
/// Each setting is left alone when the environment already has it:
/// - `RAYON_NUM_THREADS` = candle's thread count, so candle's matmul stops re-reading
///   `/proc/cpuinfo` on every call (about 2% of a CPU training step);
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT` = 1000 (candle's default 25000): candle's elementwise
///   worker threads otherwise spin after every op on cores the conv threads need; at 2 threads
///   this took the U-Net step from ~2.8 s to ~2.0 s on the development machine
///   (bench/RESULTS.md);
/// - `CANDLE_NUM_THREADS` = 1 when there are at most 2 threads: candle's elementwise ops (the
///   adds of autograd's gradient accumulation, mostly) then run on the calling thread instead of
///   candle's own worker pool, which competed for the same two cores with rayon's pool; the
///   U-Net training step at 2 threads went from 870-985 to 839-886 ms (bench/RESULTS.md);
/// - glibc malloc tuning, [`tune_malloc`];
/// - with 2+ threads, the calling thread becomes one of rayon's workers (worker 0): parallel
///   ops fork from it instead of being handed to a pool thread while it sleeps; the
///   quickstart U-Net's training step at 2 threads went from 338 to 311 ms (bench/RESULTS.md).
///
/// Returns the thread count the kernels use.
pub fn init_cpu() -> usize {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads().max(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    if threads <= 2 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        tune_malloc();
    }
    join_pool(threads);
    num_threads()
}

/// Makes the calling thread worker 0 of rayon's global pool of `threads` threads (when the pool
/// does not exist yet and there are at least 2). Every parallel op then forks from the thread
/// that runs the model, which works on its share itself, instead of handing the whole op to a
/// pool thread and sleeping until it is done: two context switches less per op, and no third
/// thread competing for two cores. Only for threads that live as long as the process (`main`),
/// and only for at least 2 threads: a pool whose one thread is `main` would never run jobs that
/// another thread hands it.
fn join_pool(threads: usize) {
    if threads >= 2 {
        // An existing global pool (rayon used before this call) is kept as it is.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .use_current_thread()
            .build_global();
    }
}

/// Models above this many parameters train faster in one threaded pass than in batch shards:
/// each shard repeats the per-parameter work (kernel transforms, weight-gradient reductions, the
/// gradient sum). Measured at 2 threads (bench/RESULTS.md, session 9): shards -13% step time at
/// 1.1M parameters, -6% at 9M, +15% at 35.7M.
pub const SHARD_MAX_PARAMS: usize = 20_000_000;

/// How a CPU training step of a model with `params` parameters and a micro-batch of `batch`
/// runs on `threads` compute threads: split into that many equal batch shards, each on its own
/// thread in a one-thread pool, their gradients summed (returns `threads`); or as one threaded
/// pass (returns 0). Shards where they pay: 2+ threads, a batch that splits evenly, at most
/// [`SHARD_MAX_PARAMS`] parameters. The one owner of this choice for `ddpm-train` and the
/// benchmarks that time the step as it runs it.
pub fn thread_shards(threads: usize, batch: usize, params: usize) -> usize {
    if threads >= 2 && batch.is_multiple_of(threads) && params <= SHARD_MAX_PARAMS {
        threads
    } else {
        0
    }
}

/// Keeps freed memory in glibc's heap instead of returning it to the kernel, so the next tensor
/// of the same size reuses warm pages instead of taking fresh page faults (every candle op
/// allocates its output). Sets glibc's mmap threshold to its maximum, 32 MiB on 64-bit (every
/// tensor below it comes from the heap), and the trim threshold to 1 GiB; the same as
/// `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824` in the environment.
/// Measured on the U-Net training step: minor page faults -57%, system time -55%, a few percent
/// of the step; mimalloc did no better and jemalloc worse (bench/RESULTS.md). Returns whether
/// glibc accepted both settings (false off glibc). Process-wide; call early in `main`.
pub fn tune_malloc() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_MAX: libc::c_int =
            4 * 1024 * 1024 * std::mem::size_of::<libc::c_long>() as libc::c_int;
        // SAFETY: mallopt only adjusts allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_MAX) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_only_where_they_pay() {
        assert_eq!(thread_shards(2, 32, 1_142_337), 2);
        assert_eq!(thread_shards(4, 32, 8_952_067), 4);
        // the 35.7M U-Net trains faster in one pass
        assert_eq!(thread_shards(2, 16, 35_746_307), 0);
        assert_eq!(thread_shards(1, 32, 1_000), 0);
        assert_eq!(thread_shards(3, 32, 1_000), 0);
    }
}
