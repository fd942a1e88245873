//! The model composes with ddpm-diffusion: noise a batch, compute the training loss, backprop, and
//! a few SGD steps lower the loss on a fixed batch.

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use ddpm_diffusion::{
    BetaSchedule, GaussianDiffusion, LossType, ModelMeanType, ModelVarType, NoiseSchedule,
};
use ddpm_rng::{Stream, StreamKey};
use ddpm_unet::{DropoutKey, ForwardCtx, UNet, UNetConfig};

fn normal(stream: Stream, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let mut v = vec![0f32; n];
    StreamKey::new(3, stream, 0, 0).fill_normal(&mut v);
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn cfg(learn_sigma: bool) -> UNetConfig {
    UNetConfig {
        image_size: 8,
        in_channels: 3,
        model_channels: 16,
        num_res_blocks: 1,
        attention_resolutions: vec![4],
        dropout: 0.1,
        channel_mult: vec![1, 2],
        num_classes: Some(2),
        num_heads: 2,
        num_head_channels: None,
        use_scale_shift_norm: true,
        learn_sigma,
        num_groups: 4,
    }
}

#[test]
fn sgd_on_the_eps_loss_lowers_it() {
    let cfg = cfg(false);
    let (model, vm) = UNet::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let sched = NoiseSchedule::new(&BetaSchedule::Linear, 100).unwrap();
    let diff = GaussianDiffusion::new(
        sched,
        ModelMeanType::Epsilon,
        ModelVarType::FixedLarge,
        LossType::Mse,
    );
    // A fixed batch of smooth images in [-1, 1].
    let x0 = normal(Stream::Flip, &[4, 3, 8, 8]).tanh().unwrap();
    let noise = normal(Stream::Noise, &[4, 3, 8, 8]);
    let t = [5usize, 30, 60, 95];
    let x_t = diff.q_sample(&x0, &t, &noise).unwrap();
    // q_sample is the closed form sqrt(ac) x0 + sqrt(1 - ac) eps.
    let ac = diff.schedule.alphas_cumprod[60];
    let manual = ((x0.narrow(0, 2, 1).unwrap() * ac.sqrt()).unwrap()
        + (noise.narrow(0, 2, 1).unwrap() * (1.0 - ac).sqrt()).unwrap())
    .unwrap();
    let d = (manual - x_t.narrow(0, 2, 1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-6, "q_sample {d}");
    let tt = diff
        .model_timestep_tensor(&t, DType::F32, &Device::Cpu)
        .unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap(); // 2 = null label
    let mut opt = candle_nn::SGD::new(vm.all_vars(), 0.05).unwrap();
    let mut losses = Vec::new();
    for step in 0..8u64 {
        let ctx = ForwardCtx::train(DropoutKey {
            seed: 1,
            step,
            first_example: 0,
        });
        let out = model.forward(&x_t, &tt, Some(&y), &ctx).unwrap();
        let loss = diff
            .training_losses(&out, &x0, &x_t, &noise, &t)
            .unwrap()
            .loss
            .mean_all()
            .unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    eprintln!("eps-MSE over SGD steps: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    // The zero-initialised head predicts eps = 0 at first: the loss starts at E[eps^2] ~ 1.
    assert!((losses[0] - 1.0).abs() < 0.2, "{}", losses[0]);
    assert!(
        losses[7] < 0.9 * losses[0],
        "loss did not go down: {losses:?}"
    );
}

#[test]
fn learned_variance_output_feeds_the_hybrid_loss() {
    let cfg = cfg(true);
    let (model, vm) = UNet::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let sched = NoiseSchedule::new(&BetaSchedule::Cosine, 50).unwrap();
    let diff = GaussianDiffusion::new(
        sched,
        ModelMeanType::Epsilon,
        ModelVarType::LearnedRange,
        LossType::RescaledMse,
    );
    assert_eq!(
        cfg.out_channels(),
        diff.var_type.output_channels(cfg.in_channels)
    );
    let x0 = normal(Stream::Flip, &[2, 3, 8, 8]).tanh().unwrap();
    let noise = normal(Stream::Noise, &[2, 3, 8, 8]);
    let t = [0usize, 49];
    let x_t = diff.q_sample(&x0, &t, &noise).unwrap();
    let tt = diff
        .model_timestep_tensor(&t, DType::F32, &Device::Cpu)
        .unwrap();
    let y = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    let out = model
        .forward(&x_t, &tt, Some(&y), &ForwardCtx::eval())
        .unwrap();
    assert_eq!(out.dims(), &[2, 6, 8, 8]);
    let l = diff.training_losses(&out, &x0, &x_t, &noise, &t).unwrap();
    assert!(l.vb.is_some());
    let loss = l.loss.mean_all().unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let grads = loss.backward().unwrap();
    let head = vm.data().lock().unwrap()["out.2.weight"]
        .as_tensor()
        .clone();
    let g = grads.get(&head).expect("the head gets a gradient");
    assert!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}
