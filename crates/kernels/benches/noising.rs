//! Fused vs unfused noising (and sampler step) on the CPU: time per call, effective bandwidth and the
//! ratio, measured in the same run. A short run (about a second per case). `cargo bench -p ddpm-kernels`
//! or bench/kernels.sh. Bytes counted per element: noising reads x0 and writes x_t, noise, target (16 B);
//! the sampler step reads x_t and the model output and writes x_prev and x0_pred (16 B).
//!
//! Two clocks: wall time (median per call) and process CPU time (all threads, mean per call). On a
//! shared, loaded machine the CPU time is the steadier measure of the work done.

use candle_core::{Device, Tensor};
use ddpm_kernels::{
    fused_noising, fused_sampler_step, unfused_noising, unfused_sampler_step, NoiseKey, Prediction,
    StepCoefs, StepNoise,
};
use std::time::{Duration, Instant};

/// CPU time of the whole process (all threads).
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// (median wall time, mean process CPU time) of `f` over enough calls to fill `budget`, after two
/// warm-up calls.
fn time(budget: Duration, mut f: impl FnMut()) -> (Duration, Duration) {
    f();
    f();
    let mut v = Vec::new();
    let start = Instant::now();
    let c0 = cpu_time();
    while start.elapsed() < budget || v.len() < 5 {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    let cpu = (cpu_time() - c0) / v.len() as u32;
    v.sort();
    (v[v.len() / 2], cpu)
}

fn main() {
    let budget = Duration::from_millis(
        std::env::var("BENCH_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(800),
    );
    let (sa, sm): (Vec<f32>, Vec<f32>) = (0..1000)
        .map(|i| {
            let ab = 1.0 - (i as f64 + 1.0) / 1001.0;
            (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32)
        })
        .unzip();
    println!("threads: {} (rayon)", rayon::current_num_threads());
    println!(
        "{:<34} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>10}",
        "case", "fused ms", "unf ms", "speedup", "fused cpu", "unf cpu", "cpu ratio", "fused GB/s"
    );
    for (name, dims) in [
        ("noising fashion-mnist 128x1x28x28", [128usize, 1, 28, 28]),
        ("noising cifar10 128x3x32x32", [128, 3, 32, 32]),
        ("noising 16x3x64x64", [16, 3, 64, 64]),
    ] {
        let b = dims[0];
        let x0 = Tensor::randn(0f32, 1f32, &dims[..], &Device::Cpu).unwrap();
        let t: Vec<u32> = (0..b as u32).map(|i| (i * 7919) % 1000).collect();
        let key = NoiseKey {
            seed: 1,
            step: 2,
            first_example: 0,
        };
        let f = time(budget, || {
            fused_noising(&x0, &t, &sa, &sm, key, Prediction::Epsilon).unwrap();
        });
        let u = time(budget, || {
            unfused_noising(&x0, &t, &sa, &sm, key, Prediction::Epsilon).unwrap();
        });
        report(name, x0.elem_count(), f, u);
        let n = x0.elem_count() / b;
        let mut z = vec![0f32; b * n];
        let r = time(budget, || {
            for (i, ex) in z.chunks_mut(n).enumerate() {
                ddpm_rng::StreamKey::new(1, ddpm_rng::Stream::Noise, 2, i as u64).fill_normal(ex);
            }
        });
        println!(
            "{:<34} {:>9.3} {:>9} {:>8} {:>9.3}   (the noise alone, one thread: StreamKey::fill_normal)",
            "  rng only",
            r.0.as_secs_f64() * 1e3,
            "",
            "",
            r.1.as_secs_f64() * 1e3
        );
    }
    {
        let dims = [128usize, 3, 32, 32];
        let xt = Tensor::randn(0f32, 1f32, &dims[..], &Device::Cpu).unwrap();
        let m = Tensor::randn(0f32, 1f32, &dims[..], &Device::Cpu).unwrap();
        let c = vec![StepCoefs::ddpm(Prediction::Epsilon, 0.5, 0.55, 0.1); dims[0]];
        let key = NoiseKey {
            seed: 1,
            step: 2,
            first_example: 0,
        };
        let f = time(budget, || {
            fused_sampler_step(&xt, &m, &c, Some((-1.0, 1.0)), StepNoise::Philox(key)).unwrap();
        });
        let u = time(budget, || {
            unfused_sampler_step(&xt, &m, &c, Some((-1.0, 1.0)), StepNoise::Philox(key)).unwrap();
        });
        report("ddpm step cifar10 128x3x32x32", xt.elem_count(), f, u);
    }
}

fn report(name: &str, elems: usize, f: (Duration, Duration), u: (Duration, Duration)) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:<34} {:>9.3} {:>9.3} {:>7.2}x {:>9.3} {:>9.3} {:>7.2}x {:>10.2}",
        name,
        ms(f.0),
        ms(u.0),
        u.0.as_secs_f64() / f.0.as_secs_f64(),
        ms(f.1),
        ms(u.1),
        u.1.as_secs_f64() / f.1.as_secs_f64(),
        16.0 * elems as f64 / f.0.as_secs_f64() / 1e9,
    );
}
