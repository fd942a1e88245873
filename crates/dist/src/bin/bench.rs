//! `ddpm-dist-bench`: time of averaging a realistic gradient set over the ranks, per training step.
//!
//! Run under mpirun (bench/allreduce.sh does). The gradient sets are the parameter shapes of the
//! improved-diffusion / Ho et al. U-Net at two sizes, generated here from the architecture so the
//! bench does not need the model crate:
//! - `9m`:  base 64 channels, mults 1,2,2,2, 2 res blocks, attention at 16x16 (32x32 input);
//! - `36m`: base 128, same otherwise (Ho et al.'s CIFAR-10 model, 35.7M parameters in the paper).
//!
//! For each set it reports, as medians over `--steps` steps (ranks aligned by a barrier before each):
//! - `GradientSync` with the given bucket sizes (pack + all-reduce + unpack, the trainer's real call);
//! - references measured in the same run: one all-reduce of a single flat buffer of the same size (the
//!   floor for bucketed sync), one all-reduce per tensor (no buckets), and a local memcpy of the same bytes.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use ddpm_dist::{fail, install_failure_handlers, Communicator, GradientSync};

type AnyResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct UNet {
    model_channels: usize,
    channel_mult: &'static [usize],
    num_res_blocks: usize,
    /// Downsampling factors at which attention is used (improved-diffusion's convention).
    attention_ds: &'static [usize],
    in_channels: usize,
    out_channels: usize,
}

fn resblock(shapes: &mut Vec<Vec<usize>>, ch: usize, out: usize, emb: usize) {
    shapes.extend([vec![ch], vec![ch], vec![out, ch, 3, 3], vec![out]]); // norm, conv
    shapes.extend([vec![out, emb], vec![out]]); // time-embedding projection
    shapes.extend([vec![out], vec![out], vec![out, out, 3, 3], vec![out]]); // norm, conv
    if out != ch {
        shapes.extend([vec![out, ch, 1, 1], vec![out]]); // 1x1 skip
    }
}

fn attention(shapes: &mut Vec<Vec<usize>>, ch: usize) {
    shapes.extend([vec![ch], vec![ch], vec![3 * ch, ch, 1], vec![3 * ch]]);
    shapes.extend([vec![ch, ch, 1], vec![ch]]);
}

/// Parameter shapes in improved-diffusion's `UNetModel` order.
fn unet_shapes(c: &UNet) -> Vec<Vec<usize>> {
    let mc = c.model_channels;
    let emb = 4 * mc;
    let mut s = vec![vec![emb, mc], vec![emb], vec![emb, emb], vec![emb]];
    s.extend([vec![mc, c.in_channels, 3, 3], vec![mc]]);
    let mut chans = vec![mc];
    let (mut ch, mut ds) = (mc, 1);
    for (level, &mult) in c.channel_mult.iter().enumerate() {
        for _ in 0..c.num_res_blocks {
            resblock(&mut s, ch, mult * mc, emb);
            ch = mult * mc;
            if c.attention_ds.contains(&ds) {
                attention(&mut s, ch);
            }
            chans.push(ch);
        }
        if level + 1 != c.channel_mult.len() {
            s.extend([vec![ch, ch, 3, 3], vec![ch]]);
            chans.push(ch);
            ds *= 2;
        }
    }
    resblock(&mut s, ch, ch, emb);
    attention(&mut s, ch);
    resblock(&mut s, ch, ch, emb);
    for (level, &mult) in c.channel_mult.iter().enumerate().rev() {
        for i in 0..=c.num_res_blocks {
            let skip = chans.pop().expect("one skip per input block");
            resblock(&mut s, ch + skip, mc * mult, emb);
            ch = mc * mult;
            if c.attention_ds.contains(&ds) {
                attention(&mut s, ch);
            }
            if level > 0 && i == c.num_res_blocks {
                s.extend([vec![ch, ch, 3, 3], vec![ch]]);
                ds /= 2;
            }
        }
    }
    s.extend([
        vec![ch],
        vec![ch],
        vec![c.out_channels, mc, 3, 3],
        vec![c.out_channels],
    ]);
    s
}

fn gradient_set(name: &str) -> AnyResult<Vec<Vec<usize>>> {
    let base = match name {
        "9m" => 64,
        "36m" => 128,
        other => return Err(format!("unknown set {other:?} (9m, 36m)").into()),
    };
    Ok(unet_shapes(&UNet {
        model_channels: base,
        channel_mult: &[1, 2, 2, 2],
        num_res_blocks: 2,
        attention_ds: &[2],
        in_channels: 3,
        out_channels: 3,
    }))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median over `steps` of `f`, ranks aligned before each call; `warmup` untimed calls first.
fn time_steps(
    comm: &dyn Communicator,
    warmup: usize,
    steps: usize,
    mut f: impl FnMut() -> AnyResult<()>,
) -> AnyResult<Duration> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(steps);
    for _ in 0..steps {
        comm.barrier()?;
        let s = Instant::now();
        f()?;
        t.push(s.elapsed());
    }
    // Every rank reports rank 0's view would hide a slow rank: take the max over ranks of the median.
    let mut m = [median(t).as_nanos() as u64];
    comm.all_reduce_max_u64(&mut m)?;
    Ok(Duration::from_nanos(m[0]))
}

fn run(comm: &dyn Communicator) -> AnyResult<()> {
    let mut sets = vec!["9m".to_string(), "36m".to_string()];
    let mut bucket_mb = vec![25.0f64, 4.0];
    let mut steps = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().ok_or_else(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--sets" => sets = v.split(',').map(str::to_string).collect(),
            "--bucket-mb" => {
                bucket_mb = v
                    .split(',')
                    .map(|x| x.parse::<f64>())
                    .collect::<Result<_, _>>()?
            }
            "--steps" => steps = v.parse()?,
            _ => return Err(format!("unknown option {a} (--sets, --bucket-mb, --steps)").into()),
        }
    }
    let root = comm.rank() == 0;
    if root {
        println!(
            "# all-reduce of U-Net gradient sets: {} ranks ({}), median of {steps} steps, max over ranks",
            comm.world_size(),
            comm.backend()
        );
        println!(
            "| set | params | tensors | method | ms/step | vs one flat all-reduce | GB/s (payload) |"
        );
        println!("|---|---|---|---|---|---|---|");
    }
    for set in &sets {
        let shapes = gradient_set(set)?;
        let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        let grads: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(0f32, 1.0, s.as_slice(), &Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        let bytes = (n * 4) as f64;
        let row = |method: &str, d: Duration, flat: Duration| {
            if root {
                println!(
                    "| {set} | {n} | {} | {method} | {:.2} | {:.2}x | {:.2} |",
                    shapes.len(),
                    ms(d),
                    d.as_secs_f64() / flat.as_secs_f64(),
                    bytes / d.as_secs_f64() / 1e9
                );
            }
        };

        // Reference 1: the same payload as one flat buffer, one collective.
        let send: Vec<f32> = vec![1.0; n];
        let mut recv = vec![0f32; n];
        let flat = time_steps(comm, 2, steps, || {
            comm.all_reduce_sum_f32_into(&send, &mut recv)?;
            Ok(())
        })?;
        row("one flat all-reduce (reference)", flat, flat);

        // Reference 2: a local copy of the same bytes (what packing alone would cost).
        let mut dst = vec![0f32; n];
        let copy = time_steps(comm, 2, steps, || {
            dst.copy_from_slice(&send);
            Ok(())
        })?;
        row("local memcpy (reference)", copy, flat);

        // Reference 3: one collective per tensor.
        let host: Vec<Vec<f32>> = grads
            .iter()
            .map(|g| g.flatten_all().and_then(|t| t.to_vec1::<f32>()))
            .collect::<candle_core::Result<_>>()?;
        let mut outs: Vec<Vec<f32>> = host.iter().map(|h| vec![0.0; h.len()]).collect();
        let per_tensor = time_steps(comm, 2, steps, || {
            for (h, o) in host.iter().zip(outs.iter_mut()) {
                comm.all_reduce_sum_f32_into(h, o)?;
            }
            Ok(())
        })?;
        row("one all-reduce per tensor", per_tensor, flat);

        for &mb in &bucket_mb {
            let mut sync = GradientSync::from_tensors(&grads, (mb * 1024.0 * 1024.0) as usize)?;
            let mut reduce: Vec<Duration> = Vec::new();
            let t = time_steps(comm, 2, steps, || {
                sync.all_reduce_mean(comm, &grads)?;
                reduce.push(sync.last_stats().reduce);
                Ok(())
            })?;
            let buckets = sync.plan().num_buckets();
            // Timed steps only (the first two calls were warm-up).
            let reduce = reduce.split_off(2);
            row(
                &format!("GradientSync, {mb} MiB buckets ({buckets} buckets)"),
                t,
                flat,
            );
            if root {
                println!(
                    "|  |  |  | of which inside all-reduce (rank 0 median) | {:.2} |  |  |",
                    ms(median(reduce))
                );
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let comm = match ddpm_dist::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    install_failure_handlers(&*comm);
    if let Err(e) = run(&*comm) {
        fail(&*comm, &*e);
    }
    drop(comm);
    std::process::ExitCode::SUCCESS
}
