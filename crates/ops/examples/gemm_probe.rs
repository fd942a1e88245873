//! GEMM throughput of the `gemm` crate on the conv shapes, single-threaded, by thread CPU time
//! (meaningful on a loaded machine). Development probe for issue 9.

fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}

fn main() {
    if let Some(t) = std::env::args().nth(1) {
        gemm::set_lhs_packing_threshold_single_thread(t.parse().unwrap());
    }
    println!(
        "lhs packing threshold (single thread): {}",
        gemm::get_lhs_packing_threshold_single_thread()
    );
    // (m, n, k, name): C[m,n] = A[m,k] B[k,n], row-major, as the conv kernels call it.
    let shapes = [
        (64, 1024, 576, "fwd 64x1024x576"),
        (64, 576, 1024, "dW 64x576x1024 (B^T)"),
        (576, 1024, 64, "dX 576x1024x64 (A^T)"),
        (128, 256, 1152, "fwd 128x256x1152"),
    ];
    for (m, n, k, name) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        let bt = name.contains("B^T");
        let at = name.contains("A^T");
        let run = |c: &mut [f32]| unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                if at { m as isize } else { 1 },
                if at { 1 } else { k as isize },
                b.as_ptr(),
                if bt { k as isize } else { 1 },
                if bt { 1 } else { n as isize },
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        run(&mut c);
        let reps = 40;
        let t0 = cpu_ms();
        for _ in 0..reps {
            run(&mut c);
        }
        let ms = (cpu_ms() - t0) / reps as f64;
        println!(
            "{name:>24}: {ms:7.3} ms cpu, {:6.1} GFLOP/s",
            2.0 * (m * n * k) as f64 / ms / 1e6
        );
    }
}
