//! Finite-difference gradient checks (f64, CPU) of every block type and of whole tiny models:
//! candle's autograd against central differences, for every parameter tensor and every input.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use common::{check, named_vars, randn, randomize, var, weighted_sum};
use ddpm_unet::blocks::{
    norm_silu, AttentionBlock, AttentionPool2d, ClassEmbed, Downsample, ResBlock, ResBlockSpec,
    TimeEmbed, Upsample,
};
use ddpm_unet::layers::GroupNorm;
use ddpm_unet::{
    DropoutKey, EncoderUNet, EncoderUNetConfig, ForwardCtx, ParamBuilder, PoolKind, SeededInit,
    UNet, UNetConfig,
};

const MAX_COORDS: usize = 6;

fn builder(varmap: &VarMap) -> ParamBuilder<'static> {
    ParamBuilder::new(SeededInit::var_builder(varmap, 1, DType::F64, &Device::Cpu))
}

fn with_input(
    varmap: &VarMap,
    inputs: &[(&str, &candle_core::Var)],
) -> Vec<(String, candle_core::Var)> {
    let mut v = named_vars(varmap);
    v.extend(inputs.iter().map(|(n, x)| (n.to_string(), (*x).clone())));
    v
}

fn resblock_case(cin: usize, cout: usize, scale_shift: bool, dropout: f64) {
    let vm = VarMap::new();
    let pb = builder(&vm).pp("block");
    let spec = ResBlockSpec {
        cin,
        cout,
        emb_dim: 6,
        groups: 2,
        scale_shift,
        dropout,
        dropout_layer: 3,
    };
    let block = ResBlock::new(&pb, spec).unwrap();
    assert_eq!(block.skip.is_some(), cin != cout);
    randomize(&vm, 11);
    let x = var(1, &[2, cin, 5, 4]);
    let emb = var(2, &[2, 6]);
    let ctx = ForwardCtx::train(DropoutKey {
        seed: 5,
        step: 3,
        first_example: 7,
    });
    if dropout > 0.0 {
        // The mask is really applied: training and eval outputs differ.
        let a = block.forward(x.as_tensor(), emb.as_tensor(), &ctx).unwrap();
        let b = block
            .forward(x.as_tensor(), emb.as_tensor(), &ForwardCtx::eval())
            .unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d > 1e-3, "dropout had no effect");
    }
    let vars = with_input(&vm, &[("x", &x), ("emb", &emb)]);
    let r = check(&vars, MAX_COORDS, || {
        weighted_sum(
            &block.forward(x.as_tensor(), emb.as_tensor(), &ctx).unwrap(),
            3,
        )
    });
    r.assert_ok(&format!(
        "ResBlock cin={cin} cout={cout} scale_shift={scale_shift} dropout={dropout}"
    ));
}

#[test]
fn resblock_same_width() {
    resblock_case(4, 4, false, 0.0);
}

#[test]
fn resblock_channel_change() {
    resblock_case(4, 6, false, 0.0);
}

#[test]
fn resblock_scale_shift() {
    resblock_case(4, 4, true, 0.0);
}

#[test]
fn resblock_scale_shift_channel_change_dropout() {
    resblock_case(6, 4, true, 0.3);
}

#[test]
fn resblock_dropout_no_scale_shift() {
    resblock_case(4, 6, false, 0.3);
}

fn attention_case(channels: usize, heads: usize) {
    let vm = VarMap::new();
    let block = AttentionBlock::new(&builder(&vm).pp("attn"), channels, heads, 2).unwrap();
    randomize(&vm, 12);
    let x = var(4, &[2, channels, 3, 4]);
    let vars = with_input(&vm, &[("x", &x)]);
    let r = check(&vars, MAX_COORDS, || {
        weighted_sum(&block.forward(x.as_tensor()).unwrap(), 5)
    });
    r.assert_ok(&format!("AttentionBlock channels={channels} heads={heads}"));
}

#[test]
fn attention_one_head() {
    attention_case(4, 1);
}

#[test]
fn attention_multi_head() {
    attention_case(8, 4);
}

#[test]
fn downsample() {
    for size in [6usize, 8, 7] {
        let vm = VarMap::new();
        let block = Downsample::new(&builder(&vm).pp("down"), 3).unwrap();
        randomize(&vm, 13);
        let x = var(6, &[2, 3, size, size]);
        let y = block.forward(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), &[2, 3, size.div_ceil(2), size.div_ceil(2)]);
        let vars = with_input(&vm, &[("x", &x)]);
        let r = check(&vars, MAX_COORDS, || {
            weighted_sum(&block.forward(x.as_tensor()).unwrap(), 7)
        });
        r.assert_ok(&format!("Downsample {size}x{size}"));
    }
}

#[test]
fn upsample_with_input_reused() {
    let vm = VarMap::new();
    let block = Upsample::new(&builder(&vm).pp("up"), 3).unwrap();
    randomize(&vm, 14);
    let x = var(8, &[2, 3, 3, 4]);
    let vars = with_input(&vm, &[("x", &x)]);
    // x also feeds a second branch: the case where candle's upsample_nearest2d backward goes wrong.
    let r = check(&vars, MAX_COORDS, || {
        let up = weighted_sum(&block.forward(x.as_tensor()).unwrap(), 9);
        let other = weighted_sum(&x.as_tensor().sqr().unwrap(), 10);
        (up + other).unwrap()
    });
    r.assert_ok("Upsample (input reused)");
}

#[test]
fn upsample_values_are_nearest() {
    let x = Tensor::arange(0f64, 6.0, &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 2, 3))
        .unwrap();
    let y = ddpm_unet::layers::upsample_nearest2x(&x).unwrap();
    let want = x.upsample_nearest2d(4, 6).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    );
}

#[test]
fn timestep_embedding_mlp() {
    let vm = VarMap::new();
    let te = TimeEmbed::new(&builder(&vm).pp("time_embed"), 8, 12).unwrap();
    randomize(&vm, 15);
    let t = Tensor::new(&[0f64, 17.0, 999.0], &Device::Cpu).unwrap();
    let vars = named_vars(&vm);
    let r = check(&vars, MAX_COORDS, || {
        weighted_sum(&te.forward(&t).unwrap(), 11)
    });
    r.assert_ok("timestep embedding MLP");
    // And through the sinusoidal features as an input.
    let f = var(16, &[3, 8]);
    let vars = with_input(&vm, &[("features", &f)]);
    let r = check(&vars, MAX_COORDS, || {
        weighted_sum(&te.forward_features(f.as_tensor()).unwrap(), 12)
    });
    r.assert_ok("timestep MLP on features");
}

#[test]
fn class_embedding() {
    let vm = VarMap::new();
    let ce = ClassEmbed::new(&builder(&vm).pp("label_emb"), 3, 5).unwrap();
    randomize(&vm, 16);
    // Label 3 is the null label; label 1 appears twice (gradients accumulate), label 2 never.
    let y = Tensor::new(&[1u32, 3, 0, 1], &Device::Cpu).unwrap();
    let vars = named_vars(&vm);
    let r = check(&vars, 20, || weighted_sum(&ce.forward(&y).unwrap(), 13));
    r.assert_ok("class embedding");
    assert!(
        ce.forward(&Tensor::new(&[4u32], &Device::Cpu).unwrap())
            .is_err(),
        "label > null accepted"
    );
}

#[test]
fn groupnorm_silu() {
    for (groups, channels) in [(1usize, 3usize), (2, 6), (6, 6)] {
        let vm = VarMap::new();
        let gn = GroupNorm::new(&builder(&vm).pp("norm"), groups, channels).unwrap();
        randomize(&vm, 17);
        let x = var(18, &[2, channels, 3, 3]);
        let vars = with_input(&vm, &[("x", &x)]);
        let r = check(&vars, MAX_COORDS, || {
            weighted_sum(&norm_silu(&gn, x.as_tensor()).unwrap(), 14)
        });
        r.assert_ok(&format!("GroupNorm({groups}, {channels}) + SiLU"));
    }
}

#[test]
fn groupnorm_matches_definition() {
    // Normalised groups have zero mean and unit (biased) variance before the affine.
    let vm = VarMap::new();
    let gn = GroupNorm::new(&builder(&vm).pp("norm"), 2, 4).unwrap();
    let x = (randn(19, &[1, 4, 3, 3]) * 3.0)
        .unwrap()
        .affine(1.0, 1.5)
        .unwrap();
    let y: Vec<f64> = gn
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for g in y.chunks(18) {
        let m = g.iter().sum::<f64>() / 18.0;
        let v = g.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 18.0;
        assert!(m.abs() < 1e-12, "mean {m}");
        assert!((v - 1.0).abs() < 1e-4, "var {v}"); // eps = 1e-5 shrinks it slightly
    }
}

#[test]
fn attention_pool_head() {
    let vm = VarMap::new();
    let pool = AttentionPool2d::new(&builder(&vm).pp("out.2"), 2, 8, 2, 3).unwrap();
    randomize(&vm, 20);
    let x = var(21, &[2, 8, 2, 2]);
    let vars = with_input(&vm, &[("x", &x)]);
    let r = check(&vars, MAX_COORDS, || {
        weighted_sum(&pool.forward(x.as_tensor()).unwrap(), 15)
    });
    r.assert_ok("AttentionPool2d");
}

fn tiny_unet(
    scale_shift: bool,
    classes: Option<usize>,
    learn_sigma: bool,
    mult: Vec<usize>,
    attn: Vec<usize>,
) -> UNetConfig {
    UNetConfig {
        image_size: 8,
        in_channels: 2,
        model_channels: 4,
        num_res_blocks: 1,
        attention_resolutions: attn,
        dropout: 0.2,
        channel_mult: mult,
        num_classes: classes,
        num_heads: 2,
        num_head_channels: None,
        use_scale_shift_norm: scale_shift,
        learn_sigma,
        num_groups: 2,
    }
}

fn unet_case(cfg: UNetConfig, max_coords: usize) {
    let (model, vm) = UNet::init(&cfg, 3, DType::F64, &Device::Cpu).unwrap();
    randomize(&vm, 22);
    let x = var(23, &[2, cfg.in_channels, 8, 8]);
    let t = Tensor::new(&[3f32, 950.0], &Device::Cpu).unwrap();
    let y = cfg
        .num_classes
        .map(|n| Tensor::new(&[1u32, n as u32], &Device::Cpu).unwrap());
    let ctx = ForwardCtx::train(DropoutKey {
        seed: 9,
        step: 1,
        first_example: 4,
    });
    let vars = with_input(&vm, &[("x", &x)]);
    assert_eq!(
        vars.len() - 1,
        model.named_parameters().len(),
        "varmap and model disagree"
    );
    let r = check(&vars, max_coords, || {
        weighted_sum(
            &model.forward(x.as_tensor(), &t, y.as_ref(), &ctx).unwrap(),
            16,
        )
    });
    r.assert_ok(&format!("tiny U-Net {cfg:?}"));
}

#[test]
fn whole_tiny_unet_conditional_scale_shift_learn_sigma() {
    unet_case(tiny_unet(true, Some(3), true, vec![1, 2], vec![4]), 3);
}

#[test]
fn whole_tiny_unet_three_levels() {
    unet_case(tiny_unet(false, None, false, vec![1, 2, 2], vec![8, 2]), 2);
}

fn encoder_case(pool: PoolKind) {
    let cfg = EncoderUNetConfig {
        image_size: 8,
        in_channels: 2,
        model_channels: 4,
        num_res_blocks: 1,
        attention_resolutions: vec![4],
        dropout: 0.2,
        channel_mult: vec![1, 2],
        num_classes: 3,
        num_heads: 1,
        num_head_channels: Some(4),
        use_scale_shift_norm: true,
        num_groups: 2,
        pool,
    };
    let (model, vm) = EncoderUNet::init(&cfg, 4, DType::F64, &Device::Cpu).unwrap();
    randomize(&vm, 24);
    let x = var(25, &[2, 2, 8, 8]);
    let t = Tensor::new(&[10f32, 500.0], &Device::Cpu).unwrap();
    let ctx = ForwardCtx::train(DropoutKey {
        seed: 9,
        step: 1,
        first_example: 0,
    });
    let logits = model.forward(x.as_tensor(), &t, &ctx).unwrap();
    assert_eq!(logits.dims(), &[2, 3]);
    let vars = with_input(&vm, &[("x", &x)]);
    let r = check(&vars, 3, || {
        weighted_sum(&model.forward(x.as_tensor(), &t, &ctx).unwrap(), 17)
    });
    r.assert_ok(&format!("EncoderUNet {pool:?}"));
}

#[test]
fn encoder_unet_attention_pool() {
    encoder_case(PoolKind::Attention);
}

#[test]
fn encoder_unet_adaptive_pool() {
    encoder_case(PoolKind::Adaptive);
}

/// The checker must be able to fail: a deliberately wrong gradient (a branch cut with `detach`)
/// has to be reported.
#[test]
fn checker_detects_a_wrong_gradient() {
    let x = var(26, &[3, 4]);
    let vars = vec![("x".to_string(), x.clone())];
    let r = check(&vars, 12, || {
        let a = x.as_tensor().sqr().unwrap();
        let b = x.as_tensor().detach().exp().unwrap(); // gradient of this branch is dropped
        weighted_sum(&(a + b).unwrap(), 18)
    });
    assert!(!r.failures.is_empty(), "a dropped branch went unnoticed");
}

/// The checker catches the candle 0.11 pitfall this crate works around: `upsample_nearest2d`'s
/// backward is wrong when its input also feeds another branch. If a candle upgrade fixes it, this
/// test fails and the workaround can be reconsidered.
#[test]
fn checker_detects_candle_upsample_nearest2d_pitfall() {
    let x = var(27, &[1, 2, 3, 3]);
    let vars = vec![("x".to_string(), x.clone())];
    let r = check(&vars, 18, || {
        let up = weighted_sum(&x.as_tensor().upsample_nearest2d(6, 6).unwrap(), 19);
        let other = weighted_sum(&x.as_tensor().sqr().unwrap(), 20);
        (up + other).unwrap()
    });
    eprintln!(
        "upsample_nearest2d with reused input: {} mismatches",
        r.failures.len()
    );
    assert!(
        !r.failures.is_empty(),
        "candle's upsample_nearest2d gradient is now right"
    );
}
