//! CPU timing of the U-Net: forward and forward+backward (one training step without the optimiser)
//! at a given batch, plus a per-op breakdown of where a training step's time goes.
//!
//! Run through `bench/unet.sh` (which also runs the PyTorch twin and prints ratios), or alone:
//! `cargo run --release -p ddpm-unet --example bench_unet -- --models small,cifar10 --batch 16`.
//! On a GPU (bench/gpu.sh; build with `--features cuda`): `--device cuda [--dtype bf16] --no-ops`; each
//! timed run ends with a device synchronisation, so the times are wall times of the GPU work.
//! Lines starting with `RESULT` are for the script: `RESULT <model> <metric> <milliseconds>`.

use candle_core::{DType, Device, Tensor, Var};
use ddpm_unet::{DropoutKey, ForwardCtx, UNet, UNetConfig};
use std::time::Instant;

struct Args {
    models: Vec<String>,
    batch: usize,
    reps: usize,
    ops: bool,
    crosscheck: Option<String>,
    device: Device,
    dtype: DType,
}

fn parse_args() -> Args {
    let mut a = Args {
        models: vec!["small".into(), "cifar10".into()],
        batch: 16,
        reps: 2,
        ops: true,
        crosscheck: None,
        device: Device::Cpu,
        dtype: DType::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--models" => {
                a.models = it
                    .next()
                    .expect("--models LIST")
                    .split(',')
                    .map(String::from)
                    .collect()
            }
            "--batch" => a.batch = it.next().expect("--batch N").parse().expect("batch"),
            "--reps" => a.reps = it.next().expect("--reps N").parse().expect("reps"),
            "--no-ops" => a.ops = false,
            "--crosscheck" => a.crosscheck = Some(it.next().expect("--crosscheck FILE")),
            "--device" => {
                a.device = match it.next().expect("--device cpu|cuda").as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => {
                        Device::new_cuda(0).expect("CUDA device 0 (a build with --features cuda)")
                    }
                    other => panic!("unknown device {other} (cpu, cuda)"),
                }
            }
            "--dtype" => {
                a.dtype = match it.next().expect("--dtype f32|bf16").as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    other => panic!("unknown dtype {other} (f32, bf16)"),
                }
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// `quickstart` is the `[model]` table of `configs/quickstart.toml` (read from the working
/// directory, the repository root under bench/unet.sh), so the bench times exactly the model the
/// quickstart trains; a name ending in `.toml` reads that config file's `[model]` table.
fn config(name: &str) -> UNetConfig {
    let from_file = |p: &str| {
        UNetConfig::from_toml_file(std::path::Path::new(p))
            .unwrap_or_else(|e| panic!("model {name}: {e}"))
    };
    match name {
        "small" => UNetConfig::cifar10_small(),
        "cifar10" => UNetConfig::ho_cifar10(),
        "quickstart" => from_file("configs/quickstart.toml"),
        p if p.ends_with(".toml") => from_file(p),
        other => panic!("unknown model {other} (quickstart, small, cifar10, or a config .toml)"),
    }
}

/// Labels for a class-conditional model as training draws them: every tenth example gets the
/// null label (`num_classes`, label dropout 0.1), the others cycle through the classes. The
/// PyTorch twin uses the same rule.
fn bench_labels(cfg: &UNetConfig, batch: usize, dev: &Device) -> Option<Tensor> {
    let k = cfg.num_classes?;
    let y: Vec<u32> = (0..batch)
        .map(|i| if i % 10 == 9 { k } else { i % k } as u32)
        .collect();
    Some(Tensor::from_vec(y, batch, dev).unwrap())
}

/// Median wall time in ms of `reps` runs after one warm-up run (on the CPU device).
fn time_ms(reps: usize, f: impl FnMut()) -> f64 {
    time_ms_on(&Device::Cpu, reps, f)
}

/// [`time_ms`] for work on `dev`: each run ends when the device has finished it.
fn time_ms_on(dev: &Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    dev.synchronize().unwrap();
    let mut v: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            dev.synchronize().unwrap();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn randn(dims: &[usize], seed: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let mut v = vec![0f32; n];
    ddpm_rng::StreamKey::new(seed, ddpm_rng::Stream::Noise, 0, 0).fill_normal(&mut v);
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn bench_model(name: &str, batch: usize, reps: usize, dev: &Device, dtype: DType) -> f64 {
    let cfg = config(name);
    let (model, varmap) = UNet::init(&cfg, 0, dtype, dev).unwrap();
    // Plain (non-variable) copies for the inference path, as a sampler loading a checkpoint has.
    let frozen: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    let infer = UNet::new(
        &cfg,
        candle_nn::VarBuilder::from_tensors(frozen, dtype, dev),
    )
    .unwrap();
    println!("{name}: parameters {}", model.num_parameters());
    println!("RESULT {name} params {}", model.num_parameters());
    let s = cfg.image_size;
    let on_dev = |t: Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let x = on_dev(randn(&[batch, cfg.in_channels, s, s], 1));
    let noise = on_dev(randn(&[batch, cfg.in_channels, s, s], 2));
    let t = Tensor::from_vec(
        (0..batch)
            .map(|i| (i * 61 % 1000) as f32)
            .collect::<Vec<_>>(),
        batch,
        dev,
    )
    .unwrap();
    let labels = bench_labels(&cfg, batch, dev);
    let fwd = time_ms_on(dev, reps, || {
        let y = infer
            .forward(&x, &t, labels.as_ref(), &ForwardCtx::eval())
            .unwrap();
        assert_eq!(y.dims()[0], batch);
    });
    println!("{name}: forward batch {batch}: {fwd:.1} ms");
    println!("RESULT {name} forward {fwd:.3}");
    let mut step = 0u64;
    let train = time_ms_on(dev, reps, || {
        let ctx = ForwardCtx::train(DropoutKey {
            seed: 0,
            step,
            first_example: 0,
        });
        step += 1;
        let y = model.forward(&x, &t, labels.as_ref(), &ctx).unwrap();
        let loss = (y - &noise).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(varmap.all_vars()[0].as_tensor()).is_some());
    });
    println!("{name}: forward+backward batch {batch}: {train:.1} ms");
    println!("RESULT {name} train {train:.3}");
    let threads = ddpm_ops::num_threads();
    let mut as_ddpm_train = train;
    if dev.is_cpu() && threads >= 2 && batch.is_multiple_of(threads) {
        let sharded = train_shards(&model, &varmap, (&x, &t, &noise), labels.as_ref(), reps);
        println!("{name}: forward+backward as {threads} shards side by side: {sharded:.1} ms");
        println!("RESULT {name} train_shards {sharded:.3}");
        if ddpm_ops::thread_shards(threads, batch, model.num_parameters()) > 0 {
            as_ddpm_train = sharded;
        }
    }
    // The step as ddpm-train runs it on this device (`ddpm_ops::thread_shards` decides).
    println!("RESULT {name} train_ddpm {as_ddpm_train:.3}");
    train
}

/// The training step as `ddpm-train` runs it by default on the CPU (`train.thread_shards`): the
/// batch split into one shard per thread, each shard's forward and backward on its own thread in
/// a one-thread pool, the shards' gradients then summed. Median ms over `reps` after a warm-up.
fn train_shards(
    model: &UNet,
    varmap: &candle_nn::VarMap,
    (x, t, noise): (&Tensor, &Tensor, &Tensor),
    labels: Option<&Tensor>,
    reps: usize,
) -> f64 {
    let n = ddpm_ops::num_threads();
    let len = x.dims()[0] / n;
    let pools: Vec<rayon::ThreadPool> = (0..n)
        .map(|_| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
        })
        .collect();
    let vars = varmap.all_vars();
    let shard = |i: usize, step: u64| -> Vec<Tensor> {
        let part = |v: &Tensor| v.narrow(0, i * len, len).unwrap();
        let ctx = ForwardCtx::train(DropoutKey {
            seed: 0,
            step,
            first_example: (i * len) as u64,
        });
        let y = model
            .forward(&part(x), &part(t), labels.map(part).as_ref(), &ctx)
            .unwrap();
        let loss = (y - part(noise))
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        vars.iter()
            .map(|v| grads.get(v.as_tensor()).unwrap().detach())
            .collect()
    };
    let mut step = 0u64;
    time_ms_on(&Device::Cpu, reps, || {
        step += 1;
        let parts: Vec<Vec<Tensor>> = std::thread::scope(|s| {
            let hs: Vec<_> = pools
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let shard = &shard;
                    s.spawn(move || p.install(|| shard(i, step)))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let sum: Vec<Tensor> = (0..vars.len())
            .map(|j| {
                parts[1..]
                    .iter()
                    .fold(parts[0][j].clone(), |a, p| (a + &p[j]).unwrap())
            })
            .collect();
        assert_eq!(sum.len(), vars.len());
    })
}

/// Every convolution of the model: (cin, cout, kernel, stride, input resolution).
fn conv_shapes(cfg: &UNetConfig) -> Vec<(usize, usize, usize, usize, usize)> {
    let mut v = Vec::new();
    let mc = cfg.model_channels;
    let mut ch = mc * cfg.channel_mult[0];
    let mut r = cfg.image_size;
    v.push((cfg.in_channels, ch, 3, 1, r));
    let mut stack = vec![ch];
    let res = |v: &mut Vec<_>, i: usize, o: usize, r: usize| {
        v.push((i, o, 3, 1, r));
        v.push((o, o, 3, 1, r));
        if i != o {
            v.push((i, o, 1, 1, r));
        }
    };
    for (l, m) in cfg.channel_mult.iter().enumerate() {
        for _ in 0..cfg.num_res_blocks {
            res(&mut v, ch, mc * m, r);
            ch = mc * m;
            stack.push(ch);
        }
        if l + 1 < cfg.channel_mult.len() {
            v.push((ch, ch, 3, 2, r));
            stack.push(ch);
            r /= 2;
        }
    }
    res(&mut v, ch, ch, r);
    res(&mut v, ch, ch, r);
    for (l, m) in cfg.channel_mult.iter().enumerate().rev() {
        for i in 0..=cfg.num_res_blocks {
            let skip = stack.pop().unwrap();
            res(&mut v, ch + skip, mc * m, r);
            ch = mc * m;
            if l > 0 && i == cfg.num_res_blocks {
                r *= 2;
                v.push((ch, ch, 3, 1, r));
            }
        }
    }
    v.push((ch, cfg.out_channels(), 3, 1, r));
    v
}

/// Times conv forward, input gradient and weight gradient exactly as the model computes them
/// (ddpm-ops' kernels; with `DDPM_OPS=candle`, candle's own: conv_transpose2d for dX, a conv
/// with batch and channels swapped for dW), per distinct shape, and sums over the model's
/// convolutions.
fn conv_breakdown(name: &str, batch: usize, reps: usize, train_ms: Option<f64>) {
    let cfg = config(name);
    let shapes = conv_shapes(&cfg);
    let mut distinct: Vec<(usize, usize, usize, usize, usize)> = shapes.clone();
    distinct.sort();
    distinct.dedup();
    let (mut tf, mut tdx, mut tdw) = (0.0, 0.0, 0.0);
    println!(
        "{name}: conv breakdown at batch {batch} (ms per call: fwd / dX / dW, x count in model)"
    );
    for &(ci, co, k, st, r) in &distinct {
        let n = shapes.iter().filter(|&&s| s == (ci, co, k, st, r)).count() as f64;
        let x = randn(&[batch, ci, r, r], 3);
        let w = randn(&[co, ci, k, k], 4);
        let pad = k / 2;
        let y = x.conv2d(&w, pad, st, 1, 1).unwrap();
        let g = randn(y.dims(), 5);
        // What the model runs: ddpm-ops' kernels, or candle's own with DDPM_OPS=candle.
        let fast = ddpm_ops::fast_path_enabled();
        let f = time_ms(reps, || {
            if fast {
                ddpm_ops::conv2d(&x, &w, None, st, pad).unwrap();
            } else {
                x.conv2d(&w, pad, st, 1, 1).unwrap();
            }
        });
        let out_size = (g.dim(2).unwrap() - 1) * st + (k - 1) + 1 - 2 * pad;
        let out_pad = r - out_size;
        let dx = time_ms(reps, || {
            let d = if fast {
                let [d, _, _] =
                    ddpm_ops::conv2d_grads(&x, &w, &g, st, pad, [true, false, false]).unwrap();
                d.unwrap()
            } else {
                g.conv_transpose2d(&w, pad, out_pad, st, 1).unwrap()
            };
            assert_eq!(d.dims(), x.dims());
        });
        let dw = time_ms(reps, || {
            let d = if fast {
                let [_, d, _] =
                    ddpm_ops::conv2d_grads(&x, &w, &g, st, pad, [false, true, false]).unwrap();
                d.unwrap()
            } else {
                x.transpose(0, 1)
                    .unwrap()
                    .conv2d(&g.transpose(0, 1).unwrap(), pad, 1, st, 1)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
            };
            assert_eq!(d.dim(0).unwrap(), co);
        });
        println!(
            "  {ci:>3}->{co:<3} k{k} s{st} {r:>2}x{r:<2}: {f:7.1} / {dx:7.1} / {dw:7.1}  x{n}"
        );
        println!("RESULT {name} conv_{ci}_{co}_k{k}_s{st}_{r} {f:.3} {dx:.3} {dw:.3}");
        tf += f * n;
        tdx += dx * n;
        tdw += dw * n;
    }
    println!("{name}: all convs of one step: fwd {tf:.0} ms, dX {tdx:.0} ms, dW {tdw:.0} ms, total {:.0} ms", tf + tdx + tdw);
    println!(
        "RESULT {name} conv_total {:.3} {tf:.3} {tdx:.3} {tdw:.3}",
        tf + tdx + tdw
    );
    if let Some(step) = train_ms {
        println!(
            "{name}: convolutions are ~{:.0}% of the forward+backward time",
            100.0 * (tf + tdx + tdw) / step
        );
    }
    // The other ops at the level-0 width.
    let c = cfg.model_channels;
    let s = cfg.image_size;
    let vm = candle_nn::VarMap::new();
    let pb = ddpm_unet::ParamBuilder::new(ddpm_unet::SeededInit::var_builder(
        &vm,
        0,
        DType::F32,
        &Device::Cpu,
    ));
    let gn = ddpm_unet::layers::GroupNorm::new(&pb.pp("gn"), 32, c).unwrap();
    let xv = Var::from_tensor(&randn(&[batch, c, s, s], 6)).unwrap();
    let gn_ms = time_ms(reps, || {
        let y = ddpm_unet::blocks::norm_silu(&gn, xv.as_tensor()).unwrap();
        y.sum_all().unwrap().backward().unwrap();
    });
    println!("  GroupNorm+SiLU {c}ch {s}x{s}: fwd+bwd {gn_ms:.1} ms");
    println!("RESULT {name} groupnorm_silu_{c}_{s} {gn_ms:.3}");
    let ac = c * 2;
    let attn = ddpm_unet::blocks::AttentionBlock::new(&pb.pp("attn"), ac, 1, 32).unwrap();
    let xa = Var::from_tensor(&randn(&[batch, ac, s / 2, s / 2], 7)).unwrap();
    let at_ms = time_ms(reps, || {
        attn.forward(xa.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    println!(
        "  AttentionBlock {ac}ch {}x{}: fwd+bwd {at_ms:.1} ms",
        s / 2,
        s / 2
    );
    println!("RESULT {name} attention_{ac}_{} {at_ms:.3}", s / 2);
    let key = DropoutKey {
        seed: 0,
        step: 0,
        first_example: 0,
    };
    let dm = time_ms(reps, || {
        ddpm_unet::ctx::dropout_mask(key, 0, 0.1, &[batch, c, s, s], DType::F32, &Device::Cpu)
            .unwrap();
    });
    println!("  dropout mask {c}ch {s}x{s}: {dm:.1} ms");
    println!("RESULT {name} dropout_mask_{c}_{s} {dm:.3}");
}

/// Loads weights, input and output written by `bench/pytorch/unet_bench.py --export` and checks
/// that candle's forward gives the same output: the two are the same architecture with the same
/// parameter names. The file's metadata holds the config.
fn crosscheck(path: &str) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cfg_json = &meta.metadata().as_ref().expect("no metadata")["config"];
    let cfg: UNetConfig = serde_json::from_str(cfg_json).unwrap();
    let data = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let (model, varmap) = UNet::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let names: Vec<&String> = model.named_parameters().iter().map(|(n, _)| n).collect();
    for n in &names {
        let src = data
            .get(*n)
            .unwrap_or_else(|| panic!("torch file lacks {n}"));
        varmap.data().lock().unwrap()[*n].set(src).unwrap();
    }
    let extra: Vec<&String> = data
        .keys()
        .filter(|k| !k.starts_with("io.") && !names.contains(k))
        .collect();
    assert!(
        extra.is_empty(),
        "torch has parameters candle lacks: {extra:?}"
    );
    let y = data.get("io.y").map(|y| y.to_dtype(DType::U32).unwrap());
    let want = &data["io.out"];
    let got = model
        .forward(
            &data["io.x"],
            &data["io.t"],
            y.as_ref(),
            &ForwardCtx::eval(),
        )
        .unwrap();
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let err = max((got - want).unwrap());
    let scale = max(want.clone());
    println!(
        "crosscheck {path}: {} tensors, max |candle - torch| = {err:.3e} (output max {scale:.3})",
        names.len()
    );
    println!("RESULT crosscheck max_abs_err {err:.3e}");
    assert!(err <= 1e-4 * scale.max(1.0), "candle and PyTorch disagree");
}

fn main() {
    // Thread count, candle's spin limit and malloc tuning, as ddpm-train and ddpm-sample set them.
    ddpm_ops::init_cpu();
    let args = parse_args();
    if let Some(p) = &args.crosscheck {
        crosscheck(p);
        return;
    }
    if args.device.is_cpu() {
        println!("ddpm-ops: {}", ddpm_ops::kernel_summary());
    }
    println!(
        "candle CPU threads: {}, device {:?}, dtype {:?}",
        candle_core::utils::get_num_threads(),
        args.device.location(),
        args.dtype
    );
    let train: Vec<f64> = args
        .models
        .iter()
        .map(|m| bench_model(m, args.batch, args.reps, &args.device, args.dtype))
        .collect();
    if args.ops && args.device.is_cpu() && args.dtype == DType::F32 {
        // The breakdown is for the first model only: it is the one issue 9 targets.
        conv_breakdown(
            &args.models[0],
            args.batch,
            args.reps,
            train.first().copied(),
        );
    }
}
