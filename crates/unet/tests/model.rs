//! Architecture, configuration, parameter naming, checkpoint and dropout-reproducibility tests.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use ddpm_unet::{
    load_varmap, save_varmap, DropoutKey, EncoderUNet, EncoderUNetConfig, ForwardCtx, UNet,
    UNetConfig, UNetError,
};

/// Parameter count of improved-diffusion's UNetModel, derived independently of the crate's plan
/// from the layer formulas (conv: out*in*k*k + out, linear: in*out + out, GroupNorm: 2c).
fn expected_params(c: &UNetConfig) -> usize {
    let conv = |i: usize, o: usize, k: usize| o * i * k * k + o;
    let lin = |i: usize, o: usize| i * o + o;
    let gn = |ch: usize| 2 * ch;
    let e = 4 * c.model_channels;
    let ss = if c.use_scale_shift_norm { 2 } else { 1 };
    let res = |i: usize, o: usize| {
        gn(i)
            + conv(i, o, 3)
            + lin(e, ss * o)
            + gn(o)
            + conv(o, o, 3)
            + if i != o { conv(i, o, 1) } else { 0 }
    };
    let attn = |ch: usize| gn(ch) + lin(ch, 3 * ch) + lin(ch, ch);
    let mut n = lin(c.model_channels, e) + lin(e, e);
    if let Some(k) = c.num_classes {
        n += (k + 1) * e;
    }
    let mut ch = c.model_channels * c.channel_mult[0];
    n += conv(c.in_channels, ch, 3);
    let mut stack = vec![ch];
    let mut res_px = c.image_size;
    for (lvl, m) in c.channel_mult.iter().enumerate() {
        for _ in 0..c.num_res_blocks {
            n += res(ch, c.model_channels * m);
            ch = c.model_channels * m;
            if c.attention_resolutions.contains(&res_px) {
                n += attn(ch);
            }
            stack.push(ch);
        }
        if lvl + 1 < c.channel_mult.len() {
            n += conv(ch, ch, 3);
            stack.push(ch);
            res_px /= 2;
        }
    }
    n += res(ch, ch) + attn(ch) + res(ch, ch);
    for (lvl, m) in c.channel_mult.iter().enumerate().rev() {
        for i in 0..=c.num_res_blocks {
            let skip = stack.pop().unwrap();
            n += res(ch + skip, c.model_channels * m);
            ch = c.model_channels * m;
            if c.attention_resolutions.contains(&res_px) {
                n += attn(ch);
            }
            if lvl > 0 && i == c.num_res_blocks {
                n += conv(ch, ch, 3);
                res_px *= 2;
            }
        }
    }
    n + gn(ch) + conv(ch, c.out_channels(), 3)
}

fn shapes_only(cfg: &UNetConfig) -> UNet {
    UNet::new(cfg, candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap()
}

#[test]
fn ho_cifar10_has_35_7m_parameters() {
    let cfg = UNetConfig::ho_cifar10();
    let model = shapes_only(&cfg);
    // Ho et al. (2020) report 35.7M parameters for their CIFAR-10 model.
    assert_eq!(model.num_parameters(), 35_746_307);
    assert_eq!(expected_params(&cfg), 35_746_307);
    let s = model.summary();
    assert_eq!(s.total_params, 35_746_307);
    assert_eq!(
        s.rows.iter().map(|r| r.params).sum::<usize>(),
        35_746_307,
        "levels must cover every parameter"
    );
    let text = s.to_string();
    assert!(text.starts_with("parameters: 35746307\n"), "{text}");
    assert!(text.contains("16x16") && text.contains("1 head"), "{text}");
}

#[test]
fn other_presets_match_the_independent_count() {
    let small = UNetConfig::cifar10_small();
    assert_eq!(shapes_only(&small).num_parameters(), 8_952_067);
    assert_eq!(expected_params(&small), 8_952_067);
    for cfg in [
        UNetConfig::fashion_mnist(),
        UNetConfig {
            learn_sigma: true,
            use_scale_shift_norm: true,
            ..UNetConfig::ho_cifar10()
        },
    ] {
        cfg.validate().unwrap();
        assert_eq!(
            shapes_only(&cfg).num_parameters(),
            expected_params(&cfg),
            "{cfg:?}"
        );
    }
}

#[test]
fn parameter_names_follow_improved_diffusion() {
    let model = shapes_only(&UNetConfig::ho_cifar10());
    let names: std::collections::HashMap<&str, Vec<usize>> = model
        .named_parameters()
        .iter()
        .map(|(n, t)| (n.as_str(), t.dims().to_vec()))
        .collect();
    let expect: &[(&str, &[usize])] = &[
        ("time_embed.0.weight", &[512, 128]),
        ("time_embed.2.bias", &[512]),
        ("input_blocks.0.0.weight", &[128, 3, 3, 3]),
        ("input_blocks.1.0.in_layers.0.weight", &[128]),
        ("input_blocks.1.0.in_layers.2.weight", &[128, 128, 3, 3]),
        ("input_blocks.1.0.emb_layers.1.weight", &[128, 512]),
        ("input_blocks.1.0.out_layers.3.weight", &[128, 128, 3, 3]),
        ("input_blocks.3.0.op.weight", &[128, 128, 3, 3]),
        ("input_blocks.4.0.skip_connection.weight", &[256, 128, 1, 1]),
        ("input_blocks.4.1.qkv.weight", &[768, 256, 1]),
        ("input_blocks.4.1.proj_out.weight", &[256, 256, 1]),
        ("middle_block.1.norm.bias", &[256]),
        ("middle_block.2.out_layers.0.weight", &[256]),
        ("output_blocks.0.0.in_layers.0.weight", &[512]),
        ("output_blocks.2.1.conv.weight", &[256, 256, 3, 3]),
        ("output_blocks.8.2.conv.weight", &[256, 256, 3, 3]),
        (
            "output_blocks.11.0.skip_connection.weight",
            &[128, 256, 1, 1],
        ),
        ("out.0.weight", &[128]),
        ("out.2.weight", &[3, 128, 3, 3]),
    ];
    for (n, s) in expect {
        assert_eq!(names.get(n).map(|v| v.as_slice()), Some(*s), "{n}");
    }
    assert_eq!(
        names.len(),
        model.named_parameters().len(),
        "duplicate names"
    );
    assert!(!names.contains_key("label_emb.weight"));
    let cond = shapes_only(&UNetConfig {
        num_classes: Some(10),
        ..UNetConfig::ho_cifar10()
    });
    let le = cond
        .named_parameters()
        .iter()
        .find(|(n, _)| n == "label_emb.weight")
        .unwrap();
    assert_eq!(le.1.dims(), &[11, 512], "one extra row for the null label");
}

fn field_of(e: UNetError) -> &'static str {
    match e {
        UNetError::Config { field, .. } => field,
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn validate_names_the_field() {
    let base = UNetConfig::ho_cifar10();
    let cases: Vec<(UNetConfig, &str)> = vec![
        (
            UNetConfig {
                image_size: 0,
                ..base.clone()
            },
            "image_size",
        ),
        (
            UNetConfig {
                in_channels: 0,
                ..base.clone()
            },
            "in_channels",
        ),
        (
            UNetConfig {
                model_channels: 0,
                ..base.clone()
            },
            "model_channels",
        ),
        (
            UNetConfig {
                num_res_blocks: 0,
                ..base.clone()
            },
            "num_res_blocks",
        ),
        (
            UNetConfig {
                channel_mult: vec![],
                ..base.clone()
            },
            "channel_mult",
        ),
        (
            UNetConfig {
                channel_mult: vec![1, 0],
                ..base.clone()
            },
            "channel_mult",
        ),
        (
            UNetConfig {
                dropout: 1.0,
                ..base.clone()
            },
            "dropout",
        ),
        (
            UNetConfig {
                dropout: -0.1,
                ..base.clone()
            },
            "dropout",
        ),
        (
            UNetConfig {
                attention_resolutions: vec![12],
                ..base.clone()
            },
            "attention_resolutions",
        ),
        (
            UNetConfig {
                num_heads: 0,
                ..base.clone()
            },
            "num_heads",
        ),
        (
            UNetConfig {
                num_heads: 3,
                ..base.clone()
            },
            "num_heads",
        ),
        (
            UNetConfig {
                num_head_channels: Some(48),
                ..base.clone()
            },
            "num_head_channels",
        ),
        (
            UNetConfig {
                num_classes: Some(0),
                ..base.clone()
            },
            "num_classes",
        ),
        (
            UNetConfig {
                num_groups: 0,
                ..base.clone()
            },
            "num_groups",
        ),
        (
            UNetConfig {
                model_channels: 48,
                ..base.clone()
            },
            "num_groups",
        ),
        // 28 -> 14 -> 7 -> (4): the fourth level would need an odd downsample.
        (
            UNetConfig {
                image_size: 28,
                ..base.clone()
            },
            "channel_mult",
        ),
    ];
    for (cfg, field) in cases {
        let e = cfg.validate().unwrap_err();
        let msg = e.to_string();
        assert_eq!(field_of(e), field, "{msg}");
        assert!(msg.contains(field), "{msg}");
    }
    let msg = UNetConfig {
        image_size: 28,
        ..base
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(msg.contains("28 -> 14 -> 7 -> 3.5"), "{msg}");
}

#[test]
fn both_28_and_32_work() {
    for (size, mult, attn) in [
        (28usize, vec![1, 2, 2], vec![14]),
        (32, vec![1, 2, 2, 2], vec![16]),
    ] {
        let cfg = UNetConfig {
            image_size: size,
            in_channels: 1,
            model_channels: 8,
            num_res_blocks: 1,
            attention_resolutions: attn,
            dropout: 0.0,
            channel_mult: mult,
            num_classes: Some(10),
            num_heads: 2,
            num_head_channels: None,
            use_scale_shift_norm: true,
            learn_sigma: true,
            num_groups: 4,
        };
        let (model, _vm) = UNet::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::zeros((2, 1, size, size), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let y = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
        let out = model
            .forward(&x, &t, Some(&y), &ForwardCtx::eval())
            .unwrap();
        assert_eq!(out.dims(), &[2, 2, size, size]);
    }
}

#[test]
fn toml_model_table() {
    let text = r#"
        [train]
        lr = 2e-4
        [model]
        image_size = 28
        in_channels = 1
        model_channels = 32
        num_res_blocks = 2
        channel_mult = [1, 2, 2]
        attention_resolutions = [14]
        num_classes = 10
        use_scale_shift_norm = true
    "#;
    let cfg = UNetConfig::from_toml_str(text).unwrap();
    assert_eq!(cfg.num_classes, Some(10));
    assert_eq!(cfg.num_groups, 32);
    assert_eq!(cfg.num_heads, 1);
    assert_eq!(cfg.dropout, 0.0);
    assert!(!cfg.learn_sigma);
    cfg.validate().unwrap();
    let typo = text.replace("num_res_blocks", "num_resblocks");
    let e = UNetConfig::from_toml_str(&typo).unwrap_err().to_string();
    assert!(e.contains("num_resblocks"), "{e}");
    assert!(UNetConfig::from_toml_str("[train]\nx = 1\n")
        .unwrap_err()
        .to_string()
        .contains("[model]"));
    let back: UNetConfig =
        toml::from_str(&toml::to_string(&UNetConfig::ho_cifar10()).unwrap()).unwrap();
    assert_eq!(back, UNetConfig::ho_cifar10());
}

fn tiny(classes: Option<usize>, dropout: f64) -> UNetConfig {
    UNetConfig {
        image_size: 8,
        in_channels: 3,
        model_channels: 8,
        num_res_blocks: 1,
        attention_resolutions: vec![4],
        dropout,
        channel_mult: vec![1, 2],
        num_classes: classes,
        num_heads: 2,
        num_head_channels: None,
        use_scale_shift_norm: false,
        learn_sigma: false,
        num_groups: 4,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn fresh_model_outputs_zero_and_init_is_seeded() {
    let cfg = tiny(Some(3), 0.0);
    let (a, vma) = UNet::init(&cfg, 42, DType::F32, &Device::Cpu).unwrap();
    let (_b, vmb) = UNet::init(&cfg, 42, DType::F32, &Device::Cpu).unwrap();
    let (_c, vmc) = UNet::init(&cfg, 43, DType::F32, &Device::Cpu).unwrap();
    let get = |vm: &VarMap, n: &str| vm.data().lock().unwrap()[n].as_tensor().clone();
    let n = "input_blocks.1.0.in_layers.2.weight";
    assert_eq!(
        max_diff(&get(&vma, n), &get(&vmb, n)),
        0.0,
        "same seed, same weights"
    );
    assert!(
        max_diff(&get(&vma, n), &get(&vmc, n)) > 1e-3,
        "different seed, different weights"
    );
    // The zero-initialised output conv makes the untrained model predict exactly zero.
    let x = common::randn(1, &[2, 3, 8, 8])
        .to_dtype(DType::F32)
        .unwrap();
    let t = Tensor::new(&[0f32, 500.0], &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
    let out = a.forward(&x, &t, Some(&y), &ForwardCtx::eval()).unwrap();
    assert_eq!(
        out.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn forward_rejects_bad_inputs() {
    let (m, _vm) = UNet::init(&tiny(Some(3), 0.0), 0, DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
    let e = |r: ddpm_unet::Result<Tensor>| r.unwrap_err().to_string();
    assert!(e(m.forward(&x, &t, None, &ForwardCtx::eval())).contains("class-conditional"));
    assert!(e(m.forward(
        &x,
        &t,
        Some(&Tensor::new(&[0u32, 4], &Device::Cpu).unwrap()),
        &ForwardCtx::eval()
    ))
    .contains("label 4"));
    let x7 = Tensor::zeros((2, 3, 7, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(e(m.forward(&x7, &t, Some(&y), &ForwardCtx::eval())).contains("[B, 3, 8, 8]"));
    let t3 = Tensor::new(&[0f32, 1.0, 2.0], &Device::Cpu).unwrap();
    assert!(e(m.forward(&x, &t3, Some(&y), &ForwardCtx::eval())).contains("t has shape"));
    let (u, _vm) = UNet::init(&tiny(None, 0.1), 0, DType::F32, &Device::Cpu).unwrap();
    assert!(e(u.forward(&x, &t, Some(&y), &ForwardCtx::eval())).contains("unconditional"));
    let train_no_key = ForwardCtx {
        train: true,
        dropout: None,
    };
    assert!(e(u.forward(&x, &t, None, &train_no_key)).contains("DropoutKey"));
}

#[test]
fn save_load_roundtrip_and_mismatch_report() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let cfg = tiny(Some(3), 0.0);
    let (a, vma) = UNet::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    common::randomize(&vma, 5); // make the output non-zero
    save_varmap(&path, &vma, None).unwrap();
    let (b, vmb) = UNet::init(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    let x = common::randn(2, &[2, 3, 8, 8])
        .to_dtype(DType::F32)
        .unwrap();
    let t = Tensor::new(&[5f32, 700.0], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32, 3], &Device::Cpu).unwrap();
    let ya = a.forward(&x, &t, Some(&y), &ForwardCtx::eval()).unwrap();
    assert!(
        max_diff(
            &ya,
            &b.forward(&x, &t, Some(&y), &ForwardCtx::eval()).unwrap()
        ) > 1e-4
    );
    load_varmap(&path, &vmb).unwrap();
    assert_eq!(
        max_diff(
            &ya,
            &b.forward(&x, &t, Some(&y), &ForwardCtx::eval()).unwrap()
        ),
        0.0
    );
    // f32 file into an f64 model.
    let (c, vmc) = UNet::init(&cfg, 3, DType::F64, &Device::Cpu).unwrap();
    load_varmap(&path, &vmc).unwrap();
    let yc = c.forward(&x, &t, Some(&y), &ForwardCtx::eval()).unwrap();
    assert!(max_diff(&ya.to_dtype(DType::F64).unwrap(), &yc) < 1e-4);
    // A different architecture: every problem is named.
    let other = UNetConfig {
        num_classes: None,
        model_channels: 12,
        ..cfg.clone()
    };
    let (_d, vmd) = UNet::init(&other, 0, DType::F32, &Device::Cpu).unwrap();
    let before = vmd.data().lock().unwrap()["out.0.weight"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    match load_varmap(&path, &vmd).unwrap_err() {
        UNetError::Checkpoint {
            missing,
            mismatched,
            unexpected,
            ..
        } => {
            assert!(missing.is_empty(), "{missing:?}");
            assert_eq!(unexpected, vec!["label_emb.weight".to_string()]);
            let m = mismatched
                .iter()
                .find(|(n, _, _)| n == "time_embed.0.weight")
                .unwrap();
            assert_eq!(
                (m.1.as_slice(), m.2.as_slice()),
                (&[48usize, 12][..], &[32usize, 8][..])
            );
        }
        other => panic!("expected a checkpoint error, got {other}"),
    }
    let after = vmd.data().lock().unwrap()["out.0.weight"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(before, after, "a failed load must not change the model");
    let (_e, vme) = UNet::init(
        &UNetConfig {
            num_classes: Some(3),
            attention_resolutions: vec![],
            ..cfg
        },
        0,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let msg = load_varmap(&path, &vme).unwrap_err().to_string();
    // Without attention the upsample moves from position 2 to 1 of output_blocks.1.
    assert!(
        msg.contains(
            "missing tensors: output_blocks.1.1.conv.bias, output_blocks.1.1.conv.weight;"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("unexpected tensors: input_blocks.3.1.norm.bias,"),
        "{msg}"
    );
    std::fs::write(&path, b"not a safetensors file").unwrap();
    assert!(matches!(
        load_varmap(&path, &vmb).unwrap_err(),
        UNetError::SafeTensors { .. }
    ));
    assert!(matches!(
        load_varmap(&dir.path().join("none"), &vmb).unwrap_err(),
        UNetError::Io { .. }
    ));
}

/// Dropout masks depend on the example's global index, not on how the batch is split.
#[test]
fn dropout_is_split_independent() {
    let cfg = UNetConfig {
        dropout: 0.5,
        ..tiny(None, 0.5)
    };
    let (m, vm) = UNet::init(&cfg, 0, DType::F64, &Device::Cpu).unwrap();
    common::randomize(&vm, 3);
    let x = common::randn(4, &[4, 3, 8, 8]);
    let t = Tensor::new(&[1f32, 10.0, 100.0, 900.0], &Device::Cpu).unwrap();
    let key = DropoutKey {
        seed: 11,
        step: 7,
        first_example: 20,
    };
    let whole = m.forward(&x, &t, None, &ForwardCtx::train(key)).unwrap();
    let first = m
        .forward(
            &x.narrow(0, 0, 2).unwrap(),
            &t.narrow(0, 0, 2).unwrap(),
            None,
            &ForwardCtx::train(key),
        )
        .unwrap();
    let key2 = DropoutKey {
        first_example: 22,
        ..key
    };
    let second = m
        .forward(
            &x.narrow(0, 2, 2).unwrap(),
            &t.narrow(0, 2, 2).unwrap(),
            None,
            &ForwardCtx::train(key2),
        )
        .unwrap();
    let split = Tensor::cat(&[first, second], 0).unwrap();
    assert!(
        max_diff(&whole, &split) < 1e-12,
        "split changed the result: {}",
        max_diff(&whole, &split)
    );
    let eval = m.forward(&x, &t, None, &ForwardCtx::eval()).unwrap();
    assert!(max_diff(&whole, &eval) > 1e-3, "dropout had no effect");
    let next_step = m
        .forward(
            &x,
            &t,
            None,
            &ForwardCtx::train(DropoutKey { step: 8, ..key }),
        )
        .unwrap();
    assert!(
        max_diff(&whole, &next_step) > 1e-3,
        "the mask did not change with the step"
    );
    let again = m.forward(&x, &t, None, &ForwardCtx::train(key)).unwrap();
    assert_eq!(max_diff(&whole, &again), 0.0, "same key, same mask");
}

#[test]
fn dropout_mask_rate_and_scale() {
    let key = DropoutKey {
        seed: 1,
        step: 2,
        first_example: 3,
    };
    let m = ddpm_unet::ctx::dropout_mask(key, 0, 0.1, &[8, 16, 16, 16], DType::F32, &Device::Cpu)
        .unwrap();
    let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
    let kept = v.iter().filter(|&&x| x > 0.0).count() as f64 / v.len() as f64;
    // n = 32768, sd of the kept fraction = sqrt(0.09 / n) ~ 1.7e-3: 5 sigma.
    assert!((kept - 0.9).abs() < 0.0083, "kept {kept}");
    assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-6));
}

#[test]
fn encoder_shapes_and_validation() {
    let cfg = EncoderUNetConfig::cifar10_classifier();
    cfg.validate().unwrap();
    let model =
        EncoderUNet::new(&cfg, candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap();
    let names: Vec<&str> = model
        .named_parameters()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(names.contains(&"out.2.positional_embedding"));
    assert!(names.contains(&"out.2.c_proj.weight"));
    assert!(!names.iter().any(|n| n.starts_with("output_blocks")));
    let s = model.summary();
    assert_eq!(
        s.rows.iter().map(|r| r.params).sum::<usize>(),
        model.num_parameters()
    );
    let bad = EncoderUNetConfig {
        num_classes: 0,
        ..cfg.clone()
    };
    assert_eq!(field_of(bad.validate().unwrap_err()), "num_classes");
    let (m, _vm) = EncoderUNet::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::zeros((3, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[0f32, 1.0, 2.0], &Device::Cpu).unwrap();
    assert_eq!(
        m.forward(&x, &t, &ForwardCtx::eval()).unwrap().dims(),
        &[3, 10]
    );
}

#[test]
fn inspect_binary_prints_parameter_count() {
    let exe = env!("CARGO_BIN_EXE_ddpm-unet-inspect");
    let out = std::process::Command::new(exe)
        .args(["--preset", "cifar10"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines().next() == Some("parameters: 35746307"),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("down ") || l.starts_with("up "))
            .count(),
        8,
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "[model]\nimage_size = 32\nin_channels = 3\nmodel_channels = 64\nnum_res_blocks = 2\nchannel_mult = [1, 2, 2, 2]\nattention_resolutions = [16]\n").unwrap();
    let out = std::process::Command::new(exe)
        .arg("--config")
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .starts_with("parameters: 8952067\n"));
    std::fs::write(&p, "[model]\nimage_size = 32\n").unwrap();
    let out = std::process::Command::new(exe)
        .arg("--config")
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("c.toml") && err.contains("missing field"),
        "{err}"
    );
}

#[test]
fn models_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<UNet>();
    check::<EncoderUNet>();
    check::<UNetConfig>();
}
