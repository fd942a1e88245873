//! Every sampler mode on a tiny randomly initialised U-Net (and a tiny noise-aware classifier):
//! finite samples, guidance with scale 0 equal to the unguided sampler, images independent of how
//! they are batched, the fused update equal to the reference one, and classifier guidance doing
//! what it is for.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::randomize;
use ddpm_diffusion::{
    BetaSchedule, GaussianDiffusion, LossType, ModelMeanType, ModelVarType, NoiseSchedule,
};
use ddpm_sampler::guidance::log_softmax;
use ddpm_sampler::{
    classifier_grad, BatchSpec, ClassifierGuidance, Denoiser, EncoderClassifier, Guidance,
    NoisyClassifier, Sampler, SamplerKind, SamplerSettings, UNetDenoiser,
};
use ddpm_unet::{EncoderUNet, EncoderUNetConfig, PoolKind, UNet, UNetConfig};

const T: usize = 40;
const CLASSES: usize = 3;

fn unet_config(learn_sigma: bool) -> UNetConfig {
    UNetConfig {
        image_size: 8,
        in_channels: 2,
        model_channels: 8,
        num_res_blocks: 1,
        attention_resolutions: vec![4],
        dropout: 0.1,
        channel_mult: vec![1, 2],
        num_classes: Some(CLASSES),
        num_heads: 2,
        num_head_channels: None,
        use_scale_shift_norm: true,
        learn_sigma,
        num_groups: 4,
    }
}

fn model(learn_sigma: bool, seed: u64) -> UNetDenoiser {
    let (unet, vm) = UNet::init(&unet_config(learn_sigma), seed, DType::F32, &Device::Cpu).unwrap();
    randomize(&vm, seed + 100);
    UNetDenoiser::new(unet)
}

fn classifier(seed: u64) -> EncoderClassifier {
    let cfg = EncoderUNetConfig {
        image_size: 8,
        in_channels: 2,
        model_channels: 8,
        num_res_blocks: 1,
        attention_resolutions: vec![],
        dropout: 0.0,
        channel_mult: vec![1, 2],
        num_classes: CLASSES,
        num_heads: 1,
        num_head_channels: None,
        use_scale_shift_norm: true,
        num_groups: 4,
        pool: PoolKind::Adaptive,
    };
    let (net, vm) = EncoderUNet::init(&cfg, seed, DType::F32, &Device::Cpu).unwrap();
    randomize(&vm, seed + 200);
    EncoderClassifier::new(net)
}

fn diffusion(mean: ModelMeanType, var: ModelVarType) -> GaussianDiffusion {
    GaussianDiffusion::new(
        NoiseSchedule::new(&BetaSchedule::Cosine, T).unwrap(),
        mean,
        var,
        LossType::Mse,
    )
}

const LABELS: [u32; 4] = [0, 1, 2, 1];

fn batch(first_index: u64, n: usize) -> BatchSpec<'static> {
    let start = first_index as usize;
    BatchSpec {
        shape: [n, 2, 8, 8],
        first_index,
        seed: 1234,
        labels: Some(&LABELS[start..start + n]),
        device: Device::Cpu,
        dtype: DType::F32,
        x_init: None,
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn settings(kind: SamplerKind, steps: &str) -> SamplerSettings {
    SamplerSettings::new(kind).steps(steps)
}

#[test]
fn every_sampler_mode_gives_finite_samples() {
    let eps_model = model(false, 1);
    let sigma_model = model(true, 2);
    let clf = classifier(3);
    let mut runs = 0;
    for mean in [
        ModelMeanType::Epsilon,
        ModelMeanType::V,
        ModelMeanType::StartX,
    ] {
        for var in [
            ModelVarType::FixedSmall,
            ModelVarType::FixedLarge,
            ModelVarType::LearnedRange,
        ] {
            let net: &dyn Denoiser = if var == ModelVarType::LearnedRange {
                &sigma_model
            } else {
                &eps_model
            };
            let mut modes = vec![
                settings(SamplerKind::Ddpm, ""),
                settings(SamplerKind::Ddpm, "10"),
                settings(SamplerKind::Ddim, "8"),
                settings(SamplerKind::DpmSolver, "6"),
                settings(SamplerKind::Heun, "5"),
                settings(SamplerKind::Sde, "6"),
                settings(SamplerKind::Pc, "4"),
                settings(SamplerKind::Edm, "5"),
            ];
            let mut clipped = settings(SamplerKind::Ddpm, "10");
            clipped.clip_denoised = true;
            modes.push(clipped);
            let mut ddim_eta = settings(SamplerKind::Ddim, "ddim10");
            ddim_eta.eta = 1.0;
            ddim_eta.clip_denoised = true;
            modes.push(ddim_eta);
            for s in modes {
                let sampler = Sampler::new(diffusion(mean, var), s.clone()).unwrap();
                let guidances = [
                    Guidance::none(),
                    Guidance {
                        cfg_scale: Some(2.0),
                        null_label: Some(CLASSES as u32),
                        classifier: None,
                    },
                    Guidance {
                        cfg_scale: None,
                        null_label: None,
                        classifier: Some(ClassifierGuidance {
                            classifier: &clf,
                            scale: 3.0,
                        }),
                    },
                ];
                for g in &guidances {
                    let x = sampler
                        .sample(net, g, &batch(0, 4))
                        .unwrap_or_else(|e| panic!("{mean:?} {var:?} {s:?}: {e}"));
                    assert_eq!(x.dims(), &[4, 2, 8, 8]);
                    assert!(
                        values(&x).iter().all(|v| v.is_finite()),
                        "{mean:?} {var:?} {s:?}"
                    );
                    runs += 1;
                }
            }
        }
    }
    assert_eq!(runs, 3 * 3 * 10 * 3);
}

#[test]
fn guidance_with_scale_zero_is_the_unguided_sampler() {
    let net = model(false, 4);
    let clf = classifier(5);
    for kind in SamplerKind::all() {
        let steps = if kind == SamplerKind::Ddpm { "" } else { "6" };
        let mut s = settings(kind, steps);
        // with the reference update on both sides, so that only the guidance differs
        s.fused_update = false;
        let sampler = Sampler::new(
            diffusion(ModelMeanType::Epsilon, ModelVarType::FixedLarge),
            s,
        )
        .unwrap();
        let plain = sampler
            .sample(&net, &Guidance::none(), &batch(0, 4))
            .unwrap();
        let cfg0 = Guidance {
            cfg_scale: Some(0.0),
            null_label: Some(CLASSES as u32),
            classifier: None,
        };
        let with_cfg = sampler.sample(&net, &cfg0, &batch(0, 4)).unwrap();
        assert_eq!(
            values(&plain),
            values(&with_cfg),
            "{kind}: classifier-free guidance w = 0"
        );
        // s = 0 is documented to be the unguided sampler (the classifier is not evaluated)
        let clf0 = Guidance {
            classifier: Some(ClassifierGuidance {
                classifier: &clf,
                scale: 0.0,
            }),
            ..Guidance::none()
        };
        let with_clf = sampler.sample(&net, &clf0, &batch(0, 4)).unwrap();
        assert_eq!(
            values(&plain),
            values(&with_clf),
            "{kind}: classifier guidance s = 0"
        );
        // ... and a non-zero scale does change the samples (the comparison above can fail).
        let cfg1 = Guidance {
            cfg_scale: Some(1.0),
            ..cfg0
        };
        assert!(
            max_abs_diff(&plain, &sampler.sample(&net, &cfg1, &batch(0, 4)).unwrap()) > 1e-3,
            "{kind}"
        );
        let clf1 = Guidance {
            classifier: Some(ClassifierGuidance {
                classifier: &clf,
                scale: 1.0,
            }),
            ..Guidance::none()
        };
        assert!(
            max_abs_diff(&plain, &sampler.sample(&net, &clf1, &batch(0, 4)).unwrap()) > 1e-4,
            "{kind}"
        );
    }
}

/// An image depends on the seed, its global index and its label only: one batch of 4 and two batches
/// of 2 (as two ranks would make them) give the same images.
#[test]
fn images_do_not_depend_on_batching() {
    let net = model(false, 6);
    for kind in SamplerKind::all() {
        let mut s = settings(kind, "5");
        s.eta = if kind == SamplerKind::Ddim { 0.5 } else { 0.0 };
        let sampler = Sampler::new(
            diffusion(ModelMeanType::Epsilon, ModelVarType::FixedSmall),
            s,
        )
        .unwrap();
        let g = Guidance {
            cfg_scale: Some(1.5),
            null_label: Some(CLASSES as u32),
            classifier: None,
        };
        let all = sampler.sample(&net, &g, &batch(0, 4)).unwrap();
        let a = sampler.sample(&net, &g, &batch(0, 2)).unwrap();
        let b = sampler.sample(&net, &g, &batch(2, 2)).unwrap();
        let split = Tensor::cat(&[&a, &b], 0).unwrap();
        let d = max_abs_diff(&all, &split);
        assert!(d < 1e-5, "{kind}: batch of 4 vs 2 + 2 differ by {d}");
        // a different seed gives different images
        let mut other = batch(0, 4);
        other.seed = 99;
        assert!(
            max_abs_diff(&all, &sampler.sample(&net, &g, &other).unwrap()) > 1e-2,
            "{kind}"
        );
    }
}

/// The fused update (ddpm-kernels) and the reference update (ddpm-diffusion) draw the same noise and
/// compute the same step, so whole trajectories agree to float rounding.
#[test]
fn fused_and_reference_updates_agree() {
    let net = model(false, 7);
    for mean in [
        ModelMeanType::Epsilon,
        ModelMeanType::V,
        ModelMeanType::StartX,
    ] {
        for (kind, steps, eta, clip) in [
            (SamplerKind::Ddpm, "", 0.0, false),
            (SamplerKind::Ddpm, "10", 0.0, true),
            (SamplerKind::Ddim, "10", 0.0, false),
            (SamplerKind::Ddim, "10", 0.7, true),
        ] {
            for var in [ModelVarType::FixedSmall, ModelVarType::FixedLarge] {
                let mut s = settings(kind, steps);
                s.eta = eta;
                s.clip_denoised = clip;
                let fused = Sampler::new(diffusion(mean, var), s.clone()).unwrap();
                s.fused_update = false;
                let reference = Sampler::new(diffusion(mean, var), s).unwrap();
                let a = fused.sample(&net, &Guidance::none(), &batch(0, 4)).unwrap();
                let b = reference
                    .sample(&net, &Guidance::none(), &batch(0, 4))
                    .unwrap();
                let scale = values(&b).iter().fold(1f32, |m, v| m.max(v.abs()));
                let d = max_abs_diff(&a, &b);
                assert!(
                    d <= 1e-4 * scale,
                    "{kind} {steps} {mean:?} {var:?}: fused vs reference differ by {d}"
                );
            }
        }
    }
}

/// The classifier gradient (candle autograd through the EncoderUNet and our log-softmax) against
/// central differences of `sum_b log p(y_b | x_b)` in f64.
#[test]
fn classifier_gradient_matches_finite_differences() {
    let cfg = EncoderUNetConfig {
        image_size: 8,
        in_channels: 2,
        model_channels: 4,
        num_res_blocks: 1,
        attention_resolutions: vec![4],
        dropout: 0.0,
        channel_mult: vec![1, 2],
        num_classes: CLASSES,
        num_heads: 1,
        num_head_channels: None,
        use_scale_shift_norm: true,
        num_groups: 2,
        pool: PoolKind::Attention,
    };
    let (net, vm) = EncoderUNet::init(&cfg, 11, DType::F64, &Device::Cpu).unwrap();
    randomize(&vm, 12);
    let clf = EncoderClassifier::new(net);
    let mut z = vec![0f32; 2 * 2 * 8 * 8];
    ddpm_rng::StreamKey::new(3, ddpm_rng::Stream::Sampler, 0, 0).fill_normal(&mut z);
    let x = Tensor::from_vec(
        z.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        (2, 2, 8, 8),
        &Device::Cpu,
    )
    .unwrap();
    let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let t = [5usize, 30];
    let grad = classifier_grad(&clf, &x, &t, &y).unwrap();
    let objective = |x: &Tensor| -> f64 {
        let lp = log_softmax(&clf.logits(x, &t).unwrap()).unwrap();
        let v: Vec<Vec<f64>> = lp.to_vec2().unwrap();
        v[0][2] + v[1][0]
    };
    let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-5;
    let mut worst = 0.0f64;
    for i in (0..flat.len()).step_by(7) {
        let mut p = flat.clone();
        p[i] += h;
        let mut m = flat.clone();
        m[i] -= h;
        let fp = objective(&Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap());
        let fm = objective(&Tensor::from_vec(m, x.shape(), &Device::Cpu).unwrap());
        let fd = (fp - fm) / (2.0 * h);
        let err = (fd - g[i]).abs() / (1e-6 + fd.abs().max(g[i].abs()));
        worst = worst.max(err.min((fd - g[i]).abs() * 1e4));
        assert!(
            (fd - g[i]).abs() <= 1e-6 + 1e-5 * fd.abs(),
            "coordinate {i}: autograd {} vs finite difference {fd}",
            g[i]
        );
    }
    assert!(
        g.iter().any(|v| v.abs() > 1e-6),
        "the gradient is not identically zero"
    );
    // log_softmax itself
    let logits =
        Var::from_tensor(&Tensor::new(&[[1.0f64, 2.0, -3.0]], &Device::Cpu).unwrap()).unwrap();
    let lp = log_softmax(logits.as_tensor()).unwrap();
    let expected: Vec<f64> = {
        let l = [1.0f64, 2.0, -3.0];
        let lse = l.iter().map(|v| v.exp()).sum::<f64>().ln();
        l.iter().map(|v| v - lse).collect()
    };
    let got: Vec<f64> = lp.flatten_all().unwrap().to_vec1().unwrap();
    for (a, b) in got.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-14);
    }
    eprintln!("worst classifier-gradient check error {worst:e}");
}

/// Classifier guidance steers samples towards the target class of the classifier that guides them:
/// with a noise-aware linear classifier (logits `sqrt(abar_t) W x_t`, i.e. linear in the x0 a
/// denoiser would estimate, so it is unsure at high noise), the classifier's mean log-probability
/// of the target label on the final samples rises with the guidance scale, and a tiny scale changes
/// the samples only a little (the guided path is continuous at 0). The model is the exact denoiser of
/// data distributed as N(0, 0.25 I), so unguided samples are well-behaved.
#[test]
fn classifier_guidance_raises_the_target_class_probability() {
    let d = diffusion(ModelMeanType::Epsilon, ModelVarType::FixedSmall);
    let ac_model = d.schedule.alphas_cumprod.clone();
    let net = move |x: &Tensor, t: &[usize], _y: Option<&Tensor>| -> ddpm_sampler::Result<Tensor> {
        // E[eps | x_t] for x0 ~ N(0, s^2): sqrt(1 - a) x_t / (a s^2 + 1 - a)
        let a = ac_model[t[0]];
        Ok(x.affine((1.0 - a).sqrt() / (a * 0.25 + 1.0 - a), 0.0)?)
    };
    let mut w = vec![0f32; CLASSES * 128];
    ddpm_rng::StreamKey::new(5, ddpm_rng::Stream::Sampler, 0, 0).fill_normal(&mut w);
    let w = Tensor::from_vec(w, (CLASSES, 128), &Device::Cpu)
        .unwrap()
        .affine(0.1, 0.0)
        .unwrap();
    let ac = d.schedule.alphas_cumprod.clone();
    let clf = |x: &Tensor, t: &[usize]| -> ddpm_sampler::Result<Tensor> {
        Ok(x.flatten_from(1)?
            .matmul(&w.t()?)?
            .affine(ac[t[0]].sqrt(), 0.0)?)
    };
    let labels: Vec<u32> = (0..12).map(|i| (i % CLASSES) as u32).collect();
    let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    for kind in SamplerKind::all() {
        let sampler = Sampler::new(d.clone(), settings(kind, "10")).unwrap();
        let run = |scale: f64| -> (Tensor, f64) {
            let g = Guidance {
                classifier: Some(ClassifierGuidance {
                    classifier: &clf,
                    scale,
                }),
                ..Guidance::none()
            };
            let b = BatchSpec {
                shape: [12, 2, 8, 8],
                labels: Some(&labels),
                ..batch(0, 4)
            };
            let x = sampler.sample(&net, &g, &b).unwrap();
            let lp = log_softmax(&clf.logits(&x, &[0; 12]).unwrap()).unwrap();
            let sel = lp.gather(&y.reshape((12, 1)).unwrap(), 1).unwrap();
            (
                x,
                sel.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64,
            )
        };
        let ((x0, s0), (x_small, _), (_, s1)) = (run(0.0), run(1e-4), run(2.0));
        let small = max_abs_diff(&x0, &x_small);
        eprintln!("{kind}: mean log p(y | x_0) unguided {s0:.4}, scale 2 {s1:.4}; scale 1e-4 moves samples by {small:e}");
        assert!(
            s1 > s0 + 0.3,
            "{kind}: guidance did not raise log p(y|x): {s0} -> {s1}"
        );
        assert!(
            small > 0.0 && small < 1e-2,
            "{kind}: scale 1e-4 moved samples by {small}"
        );
    }
}

/// `EncoderUNet::forward_features` (the FD embedding) returns the same logits as `forward` and, for the
/// adaptive head, features whose projection gives them.
#[test]
fn classifier_features_are_consistent_with_the_logits() {
    for pool in [PoolKind::Adaptive, PoolKind::Attention] {
        let cfg = EncoderUNetConfig {
            pool,
            attention_resolutions: vec![4],
            ..classifier(0).net.config().clone()
        };
        let (net, vm) = EncoderUNet::init(&cfg, 21, DType::F32, &Device::Cpu).unwrap();
        randomize(&vm, 22);
        let x = Sampler::noise(&batch(0, 4), 0).unwrap();
        let t = Tensor::new(&[0f32, 3.0, 10.0, 39.0], &Device::Cpu).unwrap();
        let ctx = ddpm_unet::ForwardCtx::eval();
        let logits = net.forward(&x, &t, &ctx).unwrap();
        let (f, l2) = net.forward_features(&x, &t, &ctx).unwrap();
        assert_eq!(f.dims(), &[4, 16], "{pool:?}");
        assert_eq!(values(&logits), values(&l2), "{pool:?}");
        if pool == PoolKind::Adaptive {
            let w = vm.data().lock().unwrap()["out.3.weight"]
                .as_tensor()
                .flatten_from(1)
                .unwrap();
            let b = vm.data().lock().unwrap()["out.3.bias"].as_tensor().clone();
            let via = f
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            assert!(max_abs_diff(&via, &logits) < 1e-5);
        }
    }
}
