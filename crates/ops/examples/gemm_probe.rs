//! GEMM throughput of the `gemm` crate on the conv shapes, single-threaded, by thread CPU time
//! (meaningful on a loaded machine). Development probe for issue 9: compares operand layouts.

fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}

/// C = A B with explicit strides (rs, cs) for each operand; returns min ms over reps.
#[allow(clippy::too_many_arguments)]
fn run(
    m: usize,
    n: usize,
    k: usize,
    a: (isize, isize),
    b: (isize, isize),
    c: (isize, isize),
    reps: usize,
) -> f64 {
    let av = vec![0.5f32; m * k];
    let bv = vec![0.25f32; k * n];
    let mut cv = vec![0f32; m * n];
    let mut best = f64::INFINITY;
    for _ in 0..reps + 1 {
        let t0 = cpu_ms();
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                cv.as_mut_ptr(),
                c.1,
                c.0,
                false,
                av.as_ptr(),
                a.1,
                a.0,
                bv.as_ptr(),
                b.1,
                b.0,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        best = best.min(cpu_ms() - t0);
    }
    best
}

fn main() {
    let reps = 30;
    // (cout, npix, k) conv shapes: forward y[cout, n] = W[cout, k] col[k, n].
    for (co, n, k) in [
        (64, 1024, 576),
        (128, 256, 1152),
        (64, 256, 64),
        (64, 512, 64),
        (128, 256, 128),
        (64, 256, 192),
        (128, 256, 256),
        (64, 64, 4096),
    ] {
        let fl = 2.0 * (co * n * k) as f64 / 1e6;
        // NCHW output (row-major [co, n]): what conv.rs does today.
        let t1 = run(
            co,
            n,
            k,
            (k as isize, 1),
            (n as isize, 1),
            (n as isize, 1),
            reps,
        );
        // Pixel-major output (column-major [co, n]): col read directly as the unpacked rhs.
        let t2 = run(
            co,
            n,
            k,
            (k as isize, 1),
            (n as isize, 1),
            (1, co as isize),
            reps,
        );
        println!(
            "fwd co {co:>3} n {n:>4} k {k:>4}: row-major dst {:6.1} GFLOP/s, col-major dst {:6.1} GFLOP/s",
            fl / t1,
            fl / t2
        );
    }
}
