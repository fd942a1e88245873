//! A few training steps of a small U-Net on the GPU and on the CPU from identical weights and data.

use crate::kernels_check::{host_data, tables};
use crate::report::Report;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use ddpm_kernels::{fused_noising, NoiseKey, Prediction};
use ddpm_rng::{Stream, StreamKey};
use ddpm_unet::{DropoutKey, ForwardCtx, UNet, UNetConfig};
use std::time::Instant;

const SEED: u64 = 20_240_607;

/// Small but complete: two levels, attention at 16x16, scale-shift norm, class labels, dropout.
pub fn config() -> UNetConfig {
    UNetConfig {
        image_size: 32,
        in_channels: 3,
        model_channels: 32,
        num_res_blocks: 1,
        attention_resolutions: vec![16],
        dropout: 0.1,
        channel_mult: vec![1, 2],
        num_classes: Some(10),
        num_heads: 2,
        use_scale_shift_norm: true,
        num_groups: 8,
        ..UNetConfig::cifar10_small()
    }
}

struct Trainer {
    model: UNet,
    _vars: VarMap,
    opt: AdamW,
    dev: Device,
    sa: Vec<f32>,
    sm: Vec<f32>,
}

impl Trainer {
    fn new(dev: &Device) -> Result<Self> {
        let (model, vars) = UNet::init(&config(), SEED, DType::F32, dev)?;
        let opt = AdamW::new(
            vars.all_vars(),
            ParamsAdamW {
                lr: 2e-4,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let (sa, sm) = tables()?;
        Ok(Self {
            model,
            _vars: vars,
            opt,
            dev: dev.clone(),
            sa,
            sm,
        })
    }

    /// The loss of step `step` on a batch of `b` examples (everything keyed by `step`).
    fn loss(&self, step: u64, b: usize) -> Result<Tensor> {
        let cfg = self.model.config();
        let dims = [b, cfg.in_channels, cfg.image_size, cfg.image_size];
        let n: usize = dims.iter().product();
        let x0 = Tensor::from_vec(host_data(n, 100 + step, 0.5), &dims[..], &self.dev)?
            .clamp(-1f32, 1f32)?;
        let t: Vec<u32> = (0..b as u64)
            .map(|i| StreamKey::new(SEED, Stream::Timestep, step, i).below(0, 1000))
            .collect();
        let y: Vec<u32> = (0..b as u64)
            .map(|i| StreamKey::new(SEED, Stream::LabelDrop, step, i).below(0, 10))
            .collect();
        let key = NoiseKey {
            seed: SEED,
            step,
            first_example: 0,
        };
        let noised = fused_noising(&x0, &t, &self.sa, &self.sm, key, Prediction::Epsilon)?;
        let tf = Tensor::from_iter(t.iter().map(|&v| v as f32), &self.dev)?;
        let y = Tensor::from_vec(y, b, &self.dev)?;
        let ctx = ForwardCtx::train(DropoutKey {
            seed: SEED,
            step,
            first_example: 0,
        });
        let out = self.model.forward(&noised.x_t, &tf, Some(&y), &ctx)?;
        Ok((out - &noised.target)?.sqr()?.mean_all()?)
    }

    fn step(&mut self, step: u64, b: usize) -> Result<f32> {
        let loss = self.loss(step, b)?;
        self.opt.backward_step(&loss)?;
        Ok(loss.to_device(&Device::Cpu)?.to_scalar::<f32>()?)
    }
}

/// Runs the comparison and the throughput measurement; returns the GPU gradients of one more step
/// (parameter order of `UNet::named_parameters`) for the NCCL check.
pub fn run(dev: &Device, quick: bool, rep: &mut Report) -> Result<Vec<Tensor>> {
    let steps = 5u64;
    let b = 8;
    let mut cpu = Trainer::new(&Device::Cpu)?;
    let mut gpu = Trainer::new(dev)?;
    println!("model: {} parameters", gpu.model.num_parameters());
    let t0 = Instant::now();
    let lc: Vec<f32> = (0..steps).map(|s| cpu.step(s, b)).collect::<Result<_>>()?;
    let cpu_secs = t0.elapsed().as_secs_f64();
    let lg: Vec<f32> = (0..steps).map(|s| gpu.step(s, b)).collect::<Result<_>>()?;
    let rel: Vec<f64> = lc
        .iter()
        .zip(&lg)
        .map(|(&c, &g)| ((c - g).abs() / c.abs().max(1e-12)) as f64)
        .collect();
    // Step 0 differs only by summation order inside convolutions and matmuls; later steps also carry
    // that difference through the optimizer.
    let ok = lc.iter().chain(&lg).all(|v| v.is_finite())
        && rel[0] < 1e-4
        && rel.iter().all(|&r| r < 5e-3);
    rep.check(
        format!("training {steps} steps batch {b}: GPU loss vs CPU loss"),
        ok,
        format!(
            "cpu {:?}, gpu {:?}, relative differences {:?}",
            lc,
            lg,
            rel.iter().map(|r| format!("{r:.1e}")).collect::<Vec<_>>()
        ),
    );
    rep.perf(
        "training images/s, CPU (reference)",
        format!("{:.1}", (steps as usize * b) as f64 / cpu_secs),
        format!("batch {b}, {} threads", rayon_threads()),
    );

    // Throughput on the GPU with a realistic batch.
    let bt = if quick { 64 } else { 128 };
    let iters = if quick { 5 } else { 20 };
    let mut thr = Trainer::new(dev)?;
    for s in 0..2 {
        thr.step(1000 + s, bt)?;
    }
    dev.synchronize()?;
    let t0 = Instant::now();
    for s in 0..iters {
        let loss = thr.loss(2000 + s, bt)?;
        thr.opt.backward_step(&loss)?;
    }
    dev.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    rep.perf(
        "training images/s, GPU",
        format!("{:.0}", (iters as usize * bt) as f64 / secs),
        format!(
            "batch {bt}, 32x32x3, {} params, fp32, {iters} steps",
            thr.model.num_parameters()
        ),
    );

    let loss = gpu.loss(steps, b)?;
    let grads = loss.backward()?;
    gpu.model
        .named_parameters()
        .iter()
        .map(|(_, p)| match grads.get(p) {
            Some(g) => Ok(g.clone()),
            None => Ok(p.zeros_like()?),
        })
        .collect()
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
