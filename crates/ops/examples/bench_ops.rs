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

/// Interleaved A/B of tile sizes: each rep runs every variant once; returns the minimum per
/// variant (contention from other processes only ever adds time).
fn time_tiles(reps: usize, tiles: &[usize], mut f: impl FnMut()) -> Vec<f64> {
    let cpu = std::env::var("CPU_TIME").is_ok_and(|v| v == "1");
    let mut best = vec![f64::INFINITY; tiles.len()];
    f();
    for _ in 0..reps.max(1) {
        for (i, &t) in tiles.iter().enumerate() {
            ddpm_ops::set_tile_bytes(t);
            let (s, c) = (Instant::now(), cpu_ms());
            f();
            let ms = if cpu {
                cpu_ms() - c
            } else {
                s.elapsed().as_secs_f64() * 1e3
            };
            best[i] = best[i].min(ms);
        }
    }
    best
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

/// Every convolution of the 9M-parameter U-Net (base 64, mults 1,2,2,2, 2 res blocks, 32x32):
/// (cin, cout, kernel, stride, input resolution), one entry per conv in the model.
fn small_unet_convs() -> Vec<(usize, usize, usize, usize, usize)> {
    let (mc, mult, nrb) = (64, [1, 2, 2, 2], 2);
    let mut v = Vec::new();
    let (mut ch, mut r) = (mc, 32);
    v.push((3, ch, 3, 1, r));
    let mut stack = vec![ch];
    let res = |v: &mut Vec<_>, i: usize, o: usize, r: usize| {
        v.push((i, o, 3, 1, r));
        v.push((o, o, 3, 1, r));
        if i != o {
            v.push((i, o, 1, 1, r));
        }
    };
    for (l, m) in mult.iter().enumerate() {
        for _ in 0..nrb {
            res(&mut v, ch, mc * m, r);
            ch = mc * m;
            stack.push(ch);
        }
        if l + 1 < mult.len() {
            v.push((ch, ch, 3, 2, r));
            stack.push(ch);
            r /= 2;
        }
    }
    res(&mut v, ch, ch, r);
    res(&mut v, ch, ch, r);
    for (l, m) in mult.iter().enumerate().rev() {
        for i in 0..=nrb {
            let skip = stack.pop().unwrap();
            res(&mut v, ch + skip, mc * m, r);
            ch = mc * m;
            if l > 0 && i == nrb {
                r *= 2;
                v.push((ch, ch, 3, 1, r));
            }
        }
    }
    v.push((ch, 3, 3, 1, r));
    v
}

/// Sum over all the model's convs of ours fwd / dX / dW (dX skipped for the input conv, as in
/// training), per distinct shape timed once and multiplied by its count; one column per tile
/// size in `tiles`, measured interleaved.
fn model_convs(batch: usize, reps: usize, tiles: &[usize]) {
    let all = small_unet_convs();
    let mut distinct = all.clone();
    distinct.sort();
    distinct.dedup();
    let nv = tiles.len();
    let mut tot = vec![[0.0f64; 3]; nv];
    println!("  per shape, ms (min of {reps}), fwd / dX / dW for tile sizes {tiles:?}");
    for &(ci, co, k, s, r) in &distinct {
        let n = all.iter().filter(|&&c| c == (ci, co, k, s, r)).count() as f64;
        let p = k / 2;
        let x = randn(&[batch, ci, r, r], 1);
        let w = randn(&[co, ci, k, k], 2);
        let b = randn(&[co], 3);
        let y = ddpm_ops::conv2d(&x, &w, Some(&b), s, p).unwrap();
        let g = randn(y.dims(), 4);
        let sf = time_tiles(reps, tiles, || {
            ddpm_ops::conv2d(&x, &w, Some(&b), s, p).unwrap();
        });
        let sdx = if ci != 3 {
            time_tiles(reps, tiles, || {
                ddpm_ops::conv2d_grads(&x, &w, &g, s, p, [true, false, false]).unwrap();
            })
        } else {
            vec![0.0; nv]
        };
        let sdw = time_tiles(reps, tiles, || {
            ddpm_ops::conv2d_grads(&x, &w, &g, s, p, [false, true, true]).unwrap();
        });
        let cells: Vec<String> = (0..nv)
            .map(|i| format!("{:6.2} / {:6.2} / {:6.2}", sf[i], sdx[i], sdw[i]))
            .collect();
        println!(
            "    {ci:>3}->{co:<3} k{k} s{s} {r:>2} x{n:<2}: {}",
            cells.join("  |  ")
        );
        for i in 0..nv {
            tot[i][0] += n * sf[i];
            tot[i][1] += n * sdx[i];
            tot[i][2] += n * sdw[i];
        }
    }
    for (i, t) in tot.iter().enumerate() {
        println!(
            "  all {} convs of the U-Net, tile {:>7}: ours {:6.1} / {:6.1} / {:6.1} ms, total {:.1} ms",
            all.len(),
            tiles[i],
            t[0],
            t[1],
            t[2],
            t[0] + t[1] + t[2]
        );
        println!(
            "RESULT ops model_convs_tile{} {:.3} {:.3} {:.3}",
            tiles[i], t[0], t[1], t[2]
        );
    }
    ddpm_ops::set_tile_bytes(ddpm_ops::DEFAULT_TILE_BYTES);
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

/// The U-Net's attention block (1 head, GroupNorm 32) two ways, forward + backward:
/// token-major as ddpm-unet had it (`[B, T, C]` with transposes to `[B, H, T, d]`), and
/// channel-major as improved-diffusion (`[B, C, T]`, no copies).
fn attention(batch: usize, reps: usize, c: usize, r: usize, fused_only: bool) {
    let t = r * r;
    let x = Var::from_tensor(&randn(&[batch, c, r, r], 9)).unwrap();
    let gm = Var::from_tensor(&randn(&[c], 10).affine(0.1, 1.0).unwrap()).unwrap();
    let bt = Var::from_tensor(&randn(&[c], 11)).unwrap();
    let wq = Var::from_tensor(&randn(&[3 * c, c], 12).affine(0.1, 0.0).unwrap()).unwrap();
    let bq = Var::from_tensor(&randn(&[3 * c], 13)).unwrap();
    let wo = Var::from_tensor(&randn(&[c, c], 14).affine(0.1, 0.0).unwrap()).unwrap();
    let bo = Var::from_tensor(&randn(&[c], 15)).unwrap();
    let scale = 1.0 / (c as f64).sqrt();
    let token_major = || {
        let h = ddpm_ops::group_norm(
            x.as_tensor(),
            gm.as_tensor(),
            bt.as_tensor(),
            32,
            1e-5,
            false,
        )?;
        let tokens = h.reshape((batch, c, t))?.transpose(1, 2)?.contiguous()?;
        let qkv = tokens
            .reshape((batch * t, c))?
            .matmul(&wq.as_tensor().t()?)?
            .broadcast_add(bq.as_tensor())?
            .reshape((batch, t, 1, 3, c))?;
        let part = |i: usize| {
            qkv.narrow(3, i, 1)?
                .squeeze(3)?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (part(0)? * scale)?;
        let (k, v) = (part(1)?, part(2)?);
        let w = ddpm_ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let a = w.matmul(&v)?.transpose(1, 2)?.reshape((batch * t, c))?;
        let out = a
            .matmul(&wo.as_tensor().t()?)?
            .broadcast_add(bo.as_tensor())?
            .reshape((batch, t, c))?
            .transpose(1, 2)?
            .reshape((batch, c, r, r))?;
        x.as_tensor() + out
    };
    let channel_major = || {
        let h = ddpm_ops::group_norm(
            x.as_tensor(),
            gm.as_tensor(),
            bt.as_tensor(),
            32,
            1e-5,
            false,
        )?
        .reshape((batch, c, t))?;
        let qkv = wq
            .as_tensor()
            .broadcast_left(batch)?
            .matmul(&h)?
            .broadcast_add(&bq.as_tensor().reshape((1, 3 * c, 1))?)?;
        let q = qkv.narrow(1, 0, c)?;
        let k = qkv.narrow(1, c, c)?;
        let v = qkv.narrow(1, 2 * c, c)?;
        let w = ddpm_ops::softmax_last_dim(&(q.t()?.matmul(&k)? * scale)?)?;
        let a = v.matmul(&w.t()?)?;
        let out = wo
            .as_tensor()
            .broadcast_left(batch)?
            .matmul(&a)?
            .broadcast_add(&bo.as_tensor().reshape((1, c, 1))?)?
            .reshape((batch, c, r, r))?;
        x.as_tensor() + out
    };
    // Channel-major with ddpm-ops: q, k, v as three 1x1 convs (weights split, not activations),
    // the attention one op, the output projection a 1x1 conv with its bias.
    let fused = || {
        let h = ddpm_ops::group_norm(
            x.as_tensor(),
            gm.as_tensor(),
            bt.as_tensor(),
            32,
            1e-5,
            false,
        )?;
        let w4 = wq.as_tensor().reshape((3 * c, c, 1, 1))?;
        let proj = |i: usize| -> candle_core::Result<Tensor> {
            let w = w4.narrow(0, i * c, c)?;
            let b = bq.as_tensor().narrow(0, i * c, c)?;
            ddpm_ops::conv2d(&h, &w, Some(&b), 1, 0)?.reshape((batch, c, t))
        };
        let (q, k, v) = (proj(0)?, proj(1)?, proj(2)?);
        let a = ddpm_ops::attention(&q, &k, &v, scale)?.reshape((batch, c, r, r))?;
        let wo4 = wo.as_tensor().reshape((c, c, 1, 1))?;
        x.as_tensor() + ddpm_ops::conv2d(&a, &wo4, Some(bo.as_tensor()), 1, 0)?
    };
    if fused_only {
        let fm = time_ms(reps, || {
            fused().unwrap().sum_all().unwrap().backward().unwrap();
        });
        println!(
            "{:>24}: ddpm-ops convs {fm:6.1} ms (fwd+bwd)",
            format!("attention_{c}_{r}x{r}")
        );
        return;
    }
    let e2 = (token_major().unwrap() - fused().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(e2 < 1e-3, "fused attention disagrees by {e2}");
    let e = (token_major().unwrap() - channel_major().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(e < 1e-3, "the two attention layouts disagree by {e}");
    let tm = time_ms(reps, || {
        token_major()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    let cm = time_ms(reps, || {
        channel_major()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    let fm = time_ms(reps, || {
        fused().unwrap().sum_all().unwrap().backward().unwrap();
    });
    let name = format!("attention_{c}_{r}x{r}");
    println!(
        "{name:>24}: token-major {tm:6.1} ms   channel-major {cm:6.1} ms   ddpm-ops convs {fm:6.1} ms (fwd+bwd)"
    );
    println!("RESULT ops {name} {tm:.3} {cm:.3} {fm:.3}");
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
    let mut tiles = vec![ddpm_ops::DEFAULT_TILE_BYTES];
    let mut shapes = vec![
        (64, 64, 3, 1, 32),
        (128, 128, 3, 1, 16),
        (64, 64, 3, 2, 32),
        (192, 128, 1, 1, 16),
    ];
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--batch" => batch = it.next().and_then(|v| v.parse().ok()).expect("--batch N"),
            "--reps" => reps = it.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--threads" => ddpm_ops::set_num_threads(
                it.next().and_then(|v| v.parse().ok()).expect("--threads N"),
            ),
            "--only" => only = it.next(),
            "--shape" => {
                let v: Vec<usize> = it
                    .next()
                    .expect("--shape cin,cout,k,stride,res")
                    .split(',')
                    .map(|x| x.parse().expect("number"))
                    .collect();
                shapes = vec![(v[0], v[1], v[2], v[3], v[4])];
            }
            "--tiles" => {
                tiles = it
                    .next()
                    .expect("--tiles A,B,..")
                    .split(',')
                    .map(|v| v.parse().expect("tile bytes"))
                    .collect()
            }
            "--tile" => ddpm_ops::set_tile_bytes(
                it.next()
                    .and_then(|v| v.parse().ok())
                    .expect("--tile BYTES"),
            ),
            "--wblock" => ddpm_ops::set_winograd_block_bytes(
                it.next()
                    .and_then(|v| v.parse().ok())
                    .expect("--wblock BYTES"),
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
    let want = |n: &str| {
        only.as_deref()
            .is_none_or(|o| n.contains(o) || o.starts_with(n))
    };
    for &shape in &shapes {
        if want("conv") {
            conv(batch, reps, shape);
        }
    }
    if want("model") {
        model_convs(batch, reps, &tiles);
    }
    if want("groupnorm") {
        group_norm(batch, reps, 64, 32);
    }
    if want("attention") {
        attention(
            batch,
            reps,
            128,
            16,
            only.as_deref() == Some("attention-fused"),
        );
    }
    if want("softmax") {
        softmax(batch * 2, reps, 256);
    }
}
