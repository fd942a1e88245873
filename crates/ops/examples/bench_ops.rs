//! Per-op CPU timings of ddpm-ops against candle's built-in ops, measured in the same run:
//! conv forward / input gradient / weight gradient (candle computes the latter two as in its
//! autograd: `conv_transpose2d`, and a conv with batch and channels swapped), GroupNorm+SiLU
//! and softmax forward+backward.
//!
//! `cargo run --release -p ddpm-ops --example bench_ops -- [--batch 16] [--reps 5] [--threads N]`
//! Lines `RESULT ops <name> <ours ms...> | <candle ms...>` are for scripts.

use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};

/// Process CPU time (all threads), ms.
fn cpu_ms() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 * 1e-3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Median wall ms of `reps` runs after a warm-up; with `CPU_TIME=1`, median process CPU ms
/// instead (steadier on a loaded machine, but counts spinning threads).
fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let cpu = std::env::var("CPU_TIME").is_ok_and(|v| v == "1");
    f();
    let mut v: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let (s, c) = (Instant::now(), cpu_ms());
            f();
            if cpu {
                cpu_ms() - c
            } else {
                s.elapsed().as_secs_f64() * 1e3
            }
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn randn(dims: &[usize], seed: u64) -> Tensor {
    let dev = Device::Cpu;
    let n: usize = dims.iter().product();
    // A cheap deterministic fill; the values do not matter for timing.
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((h >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(v, dims, &dev).unwrap()
}

fn conv(batch: usize, reps: usize, (ci, co, k, s, r): (usize, usize, usize, usize, usize)) {
    let p = k / 2;
    let x = randn(&[batch, ci, r, r], 1);
    let w = randn(&[co, ci, k, k], 2);
    let b = randn(&[co], 3);
    let y = ddpm_ops::conv2d(&x, &w, Some(&b), s, p).unwrap();
    let g = randn(y.dims(), 4);
    let of = time_ms(reps, || {
        ddpm_ops::conv2d(&x, &w, Some(&b), s, p).unwrap();
    });
    let odx = time_ms(reps, || {
        ddpm_ops::conv2d_grads(&x, &w, &g, s, p, [true, false, false]).unwrap();
    });
    let odw = time_ms(reps, || {
        ddpm_ops::conv2d_grads(&x, &w, &g, s, p, [false, true, true]).unwrap();
    });
    let cf = time_ms(reps, || {
        x.conv2d(&w, p, s, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
            .unwrap();
    });
    let out_size = (g.dim(2).unwrap() - 1) * s + k - 2 * p;
    let cdx = time_ms(reps, || {
        g.conv_transpose2d(&w, p, r - out_size, s, 1).unwrap();
    });
    let cdw = time_ms(reps, || {
        x.transpose(0, 1)
            .unwrap()
            .conv2d(&g.transpose(0, 1).unwrap(), p, 1, s, 1)
            .unwrap()
            .transpose(0, 1)
            .unwrap();
    });
    let name = format!("conv_{ci}_{co}_k{k}_s{s}_{r}");
    println!(
        "{name:>24}: ours {of:6.1} / {odx:6.1} / {odw:6.1} ms   candle {cf:6.1} / {cdx:6.1} / {cdw:6.1} ms (fwd / dX / dW)"
    );
    println!("RESULT ops {name} {of:.3} {odx:.3} {odw:.3} | {cf:.3} {cdx:.3} {cdw:.3}");
}

fn group_norm(batch: usize, reps: usize, c: usize, r: usize) {
    let x = Var::from_tensor(&randn(&[batch, c, r, r], 5)).unwrap();
    let gm = Var::from_tensor(&randn(&[c], 6).affine(0.1, 1.0).unwrap()).unwrap();
    let bt = Var::from_tensor(&randn(&[c], 7)).unwrap();
    let run = |fast: bool| {
        ddpm_ops::set_fast_path(fast);
        let t = time_ms(reps, || {
            let y = ddpm_ops::group_norm(
                x.as_tensor(),
                gm.as_tensor(),
                bt.as_tensor(),
                32,
                1e-5,
                true,
            )
            .unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        ddpm_ops::set_fast_path(true);
        t
    };
    let (o, c2) = (run(true), run(false));
    let name = format!("groupnorm_silu_{c}_{r}");
    println!("{name:>24}: ours {o:6.1} ms   candle {c2:6.1} ms (fwd+bwd)");
    println!("RESULT ops {name} {o:.3} | {c2:.3}");
}

fn softmax(batch: usize, reps: usize, t: usize) {
    let x = Var::from_tensor(&randn(&[batch, t, t], 8)).unwrap();
    let o = time_ms(reps, || {
        let y = ddpm_ops::softmax_last_dim(x.as_tensor()).unwrap();
        y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    });
    let c = time_ms(reps, || {
        let y = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    });
    let name = format!("softmax_{t}x{t}");
    println!("{name:>24}: ours {o:6.1} ms   candle {c:6.1} ms (fwd+bwd)");
    println!("RESULT ops {name} {o:.3} | {c:.3}");
}

fn main() {
    let mut batch = 16;
    let mut reps = 5;
    let mut only: Option<String> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--batch" => batch = it.next().and_then(|v| v.parse().ok()).expect("--batch N"),
            "--reps" => reps = it.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--threads" => ddpm_ops::set_num_threads(
                it.next().and_then(|v| v.parse().ok()).expect("--threads N"),
            ),
            "--only" => only = it.next(),
            "--tile" => ddpm_ops::set_tile_bytes(
                it.next()
                    .and_then(|v| v.parse().ok())
                    .expect("--tile BYTES"),
            ),
            other => panic!("unknown argument {other}"),
        }
    }
    println!(
        "ddpm-ops threads {}, tile {} B, candle threads {}, batch {batch}",
        ddpm_ops::num_threads(),
        ddpm_ops::tile_bytes(),
        candle_core::utils::get_num_threads()
    );
    let want = |n: &str| only.as_deref().is_none_or(|o| n.contains(o));
    for shape in [
        (64, 64, 3, 1, 32),
        (128, 128, 3, 1, 16),
        (64, 64, 3, 2, 32),
        (192, 128, 1, 1, 16),
    ] {
        if want("conv") {
            conv(batch, reps, shape);
        }
    }
    if want("groupnorm") {
        group_norm(batch, reps, 64, 32);
    }
    if want("softmax") {
        softmax(batch * 2, reps, 256);
    }
}
