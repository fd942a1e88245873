//! f32 equality with candle's own ops, forward and gradients, to float rounding.

mod common;

use candle_core::{DType, Module, Tensor, Var};
use common::{max_abs, randn, rel_err};

/// Rounding of f32 sums of a few hundred products, relative to the output's scale.
const TOL: f64 = 2e-5;

/// Backpropagates the same random cotangent (drawn with `seed`) through both results and requires
/// every listed input's gradient to agree to `TOL`.
fn assert_same_grads(
    what: &str,
    ours: Tensor,
    theirs: Tensor,
    seed: u64,
    inputs: &[(&str, &Tensor)],
) {
    let r = randn(seed, ours.dims(), DType::F32);
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (theirs * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in inputs {
        let e = rel_err(g1.get(v).unwrap(), g2.get(v).unwrap());
        assert!(e < TOL, "{what}: {name} differs by {e:.2e}");
    }
}

fn conv_vs_candle(b: usize, cin: usize, cout: usize, hw: usize, k: usize, s: usize, p: usize) {
    let x = Var::from_tensor(&randn(1, &[b, cin, hw, hw], DType::F32)).unwrap();
    let w = Var::from_tensor(
        &randn(2, &[cout, cin, k, k], DType::F32)
            .affine(0.2, 0.0)
            .unwrap(),
    )
    .unwrap();
    let bias = Var::from_tensor(&randn(3, &[cout], DType::F32)).unwrap();
    let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), bias.as_tensor());
    let ours = ddpm_ops::conv2d(xt, wt, Some(bt), s, p).unwrap();
    let theirs = xt
        .conv2d(wt, p, s, 1, 1)
        .unwrap()
        .broadcast_add(&bt.reshape((1, cout, 1, 1)).unwrap())
        .unwrap();
    let what = format!("conv b{b} {cin}->{cout} {hw}x{hw} k{k} s{s} p{p}");
    let e = rel_err(&ours, &theirs);
    assert!(e < TOL, "{what}: forward differs by {e:.2e}");
    assert_same_grads(
        &what,
        ours,
        theirs,
        4,
        &[("dx", xt), ("dW", wt), ("db", bt)],
    );
    println!("{what}: ok");
}

#[test]
fn conv_matches_candle() {
    conv_vs_candle(4, 8, 6, 9, 3, 1, 1);
    conv_vs_candle(3, 8, 8, 10, 3, 2, 1);
    conv_vs_candle(3, 8, 8, 9, 3, 2, 1);
    conv_vs_candle(4, 12, 6, 8, 1, 1, 0);
    conv_vs_candle(1, 5, 7, 6, 3, 1, 1);
    conv_vs_candle(16, 64, 64, 16, 3, 1, 1);
    conv_vs_candle(2, 3, 64, 32, 3, 1, 1);
    // Wide reductions through F(4x4, 3x3)'s larger transform constants.
    conv_vs_candle(2, 256, 16, 8, 3, 1, 1);
    conv_vs_candle(2, 192, 32, 12, 3, 1, 1);
}

#[test]
fn conv_winograd_blocks_split_tile_rows() {
    // Tiny blocks (16 F(4x4) / 32 F(2x2) tiles, then evened out over the threads) that start and
    // end mid tile-row: 5 and 8 F(4x4) tiles per row, 3 F(2x2) tiles per row. Only this test
    // binary's speed depends on the (process-wide) block size, not any result.
    ddpm_ops::set_winograd_block_bytes(1);
    conv_vs_candle(3, 64, 64, 20, 3, 1, 1);
    conv_vs_candle(2, 32, 48, 30, 3, 1, 1);
    conv_vs_candle(5, 8, 8, 6, 3, 1, 1);
}

#[test]
fn conv_per_example_bias_matches_candle() {
    for (k, s, p) in [(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
        let x = Var::from_tensor(&randn(1, &[4, 8, 10, 10], DType::F32)).unwrap();
        let w = Var::from_tensor(
            &randn(2, &[6, 8, k, k], DType::F32)
                .affine(0.2, 0.0)
                .unwrap(),
        )
        .unwrap();
        let b = Var::from_tensor(&randn(3, &[4, 6], DType::F32)).unwrap();
        let ours =
            ddpm_ops::conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), s, p).unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(w.as_tensor(), p, s, 1, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((4, 6, 1, 1)).unwrap())
            .unwrap();
        assert!(rel_err(&ours, &theirs) < TOL);
        let inputs = [
            ("dx", x.as_tensor()),
            ("dW", w.as_tensor()),
            ("db", b.as_tensor()),
        ];
        assert_same_grads(&format!("k{k} s{s}"), ours, theirs, 4, &inputs);
    }
    let x = randn(1, &[4, 8, 10, 10], DType::F32);
    let w = randn(2, &[6, 8, 3, 3], DType::F32);
    assert!(ddpm_ops::conv2d(&x, &w, Some(&randn(3, &[3, 6], DType::F32)), 1, 1).is_err());
}

#[test]
fn conv_f64_matches_candle() {
    let x = randn(1, &[3, 4, 7, 7], DType::F64);
    let w = randn(2, &[5, 4, 3, 3], DType::F64);
    let a = ddpm_ops::conv2d(&x, &w, None, 2, 1).unwrap();
    let b = x.conv2d(&w, 1, 2, 1, 1).unwrap();
    assert!(rel_err(&a, &b) < 1e-12);
}

#[test]
fn conv_noncontiguous_input() {
    let x = randn(1, &[4, 2, 6, 6], DType::F32).transpose(0, 1).unwrap(); // [2, 4, 6, 6] strided
    let w = randn(2, &[3, 4, 3, 3], DType::F32);
    let a = ddpm_ops::conv2d(&x, &w, None, 1, 1).unwrap();
    let b = x.contiguous().unwrap().conv2d(&w, 1, 1, 1, 1).unwrap();
    assert!(rel_err(&a, &b) < TOL);
}

#[test]
fn conv_rejects_bad_shapes() {
    let x = randn(1, &[2, 4, 6, 6], DType::F32);
    let w = randn(2, &[3, 5, 3, 3], DType::F32);
    assert!(ddpm_ops::conv2d(&x, &w, None, 1, 1).is_err());
    let w = randn(2, &[3, 4, 3, 3], DType::F32);
    let b = randn(3, &[4], DType::F32);
    assert!(ddpm_ops::conv2d(&x, &w, Some(&b), 1, 1).is_err());
    assert!(ddpm_ops::conv2d(&x, &w, None, 0, 1).is_err());
}

fn gn_vs_candle(dims: &[usize], groups: usize, silu: bool) {
    let c = dims[1];
    let x = Var::from_tensor(&randn(4, dims, DType::F32).affine(3.0, 1.0).unwrap()).unwrap();
    let g = Var::from_tensor(&randn(5, &[c], DType::F32).affine(0.5, 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&randn(6, &[c], DType::F32).affine(0.5, 0.0).unwrap()).unwrap();
    let (g, b) = (g.as_tensor().clone(), b.as_tensor().clone());
    let gn = candle_nn::GroupNorm::new(g.clone(), b.clone(), c, groups, 1e-5).unwrap();
    let ours = ddpm_ops::group_norm(x.as_tensor(), &g, &b, groups, 1e-5, silu).unwrap();
    let theirs = gn.forward(x.as_tensor()).unwrap();
    let theirs = if silu { theirs.silu().unwrap() } else { theirs };
    let what = format!("group_norm {dims:?} groups {groups} silu {silu}");
    let e = rel_err(&ours, &theirs);
    assert!(e < TOL, "{what}: forward differs by {e:.2e}");
    let inputs = [("dx", x.as_tensor()), ("dgamma", &g), ("dbeta", &b)];
    assert_same_grads(&what, ours, theirs, 7, &inputs);
    println!("{what}: ok");
}

#[test]
fn group_norm_matches_candle_nn() {
    gn_vs_candle(&[4, 64, 16, 16], 32, true);
    gn_vs_candle(&[4, 64, 16, 16], 32, false);
    gn_vs_candle(&[3, 6, 5, 7], 3, true);
    gn_vs_candle(&[2, 8, 9], 2, false);
}

#[test]
fn group_norm_scale_shift_matches_composite() {
    // silu(GroupNorm(x) * (1 + scale) + shift) with per-example scale, shift [B, C] (scale-shift
    // conditioning) as one op with the per-example affine gamma (1 + scale), beta (1 + scale) + shift,
    // against candle_nn's GroupNorm followed by the broadcast ops: forward and all gradients,
    // including those reaching scale and shift through the small [B, C] ops.
    let dims = [4usize, 64, 8, 8];
    let var = |seed, d: &[usize], a, b| {
        Var::from_tensor(&randn(seed, d, DType::F32).affine(a, b).unwrap()).unwrap()
    };
    let x = var(4, &dims, 3.0, 1.0);
    let (g, b) = (var(5, &[64], 0.5, 1.0), var(6, &[64], 0.5, 0.0));
    let (scale, shift) = (var(7, &[4, 64], 0.3, 0.0), var(8, &[4, 64], 0.3, 0.0));
    let (gt, bt, st, sh) = (
        g.as_tensor(),
        b.as_tensor(),
        scale.as_tensor(),
        shift.as_tensor(),
    );
    let s1 = (st + 1.0).unwrap();
    let ga = s1.broadcast_mul(gt).unwrap();
    let be = (s1.broadcast_mul(bt).unwrap() + sh).unwrap();
    let ours = ddpm_ops::group_norm(x.as_tensor(), &ga, &be, 32, 1e-5, true).unwrap();
    let gn = candle_nn::GroupNorm::new(gt.clone(), bt.clone(), 64, 32, 1e-5).unwrap();
    let theirs = gn
        .forward(x.as_tensor())
        .unwrap()
        .broadcast_mul(&s1.reshape((4, 64, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&sh.reshape((4, 64, 1, 1)).unwrap())
        .unwrap()
        .silu()
        .unwrap();
    let e = rel_err(&ours, &theirs);
    assert!(
        e < TOL,
        "group_norm scale-shift: forward differs by {e:.2e}"
    );
    let inputs = [
        ("dx", x.as_tensor()),
        ("dgamma", gt),
        ("dbeta", bt),
        ("dscale", st),
        ("dshift", sh),
    ];
    assert_same_grads("group_norm scale-shift", ours, theirs, 9, &inputs);
}

#[test]
fn group_norm_masked_matches_composite() {
    // Fused GroupNorm+SiLU+mask against candle_nn's GroupNorm, silu and a multiplication, forward
    // and all three gradients; the same values bit for bit as the unfused `group_norm * mask`.
    let dims = [4usize, 64, 16, 16];
    let x = Var::from_tensor(&randn(4, &dims, DType::F32).affine(3.0, 1.0).unwrap()).unwrap();
    let g = Var::from_tensor(&randn(5, &[64], DType::F32).affine(0.5, 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&randn(6, &[64], DType::F32).affine(0.5, 0.0).unwrap()).unwrap();
    let (g, b) = (g.as_tensor().clone(), b.as_tensor().clone());
    let mask = randn(7, &dims, DType::F32)
        .ge(-1.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(1.0 / 0.9, 0.0)
        .unwrap();
    let ours =
        ddpm_ops::group_norm_masked(x.as_tensor(), &g, &b, 32, 1e-5, true, Some(&mask)).unwrap();
    let unfused =
        (ddpm_ops::group_norm(x.as_tensor(), &g, &b, 32, 1e-5, true).unwrap() * &mask).unwrap();
    let diff = max_abs(&(&ours - &unfused).unwrap());
    assert_eq!(diff, 0.0, "fused mask differs from group_norm * mask");
    let gn = candle_nn::GroupNorm::new(g.clone(), b.clone(), 64, 32, 1e-5).unwrap();
    let theirs = (gn.forward(x.as_tensor()).unwrap().silu().unwrap() * &mask).unwrap();
    let e = rel_err(&ours, &theirs);
    assert!(e < TOL, "group_norm_masked: forward differs by {e:.2e}");
    let inputs = [("dx", x.as_tensor()), ("dgamma", &g), ("dbeta", &b)];
    assert_same_grads("group_norm_masked", ours, theirs, 8, &inputs);
}

#[test]
fn cat_channels_matches_candle() {
    let a = Var::from_tensor(&randn(10, &[4, 64, 8, 8], DType::F32)).unwrap();
    let b = Var::from_tensor(&randn(11, &[4, 32, 8, 8], DType::F32)).unwrap();
    let ours = ddpm_ops::cat_channels(a.as_tensor(), b.as_tensor()).unwrap();
    let theirs = candle_core::Tensor::cat(&[a.as_tensor(), b.as_tensor()], 1).unwrap();
    assert_eq!(ours.dims(), theirs.dims());
    assert_eq!(rel_err(&ours, &theirs), 0.0);
    let inputs = [("da", a.as_tensor()), ("db", b.as_tensor())];
    assert_same_grads("cat_channels", ours, theirs, 12, &inputs);
    let bad = randn(12, &[4, 32, 8, 7], DType::F32);
    assert!(ddpm_ops::cat_channels(a.as_tensor(), &bad).is_err());
}

/// `norm_conv2d` against `group_norm_masked`, `conv2d` and an add in sequence: the same kernels,
/// so the output is bitwise equal; the gradients of every input agree. `per_example` switches
/// the affine to `[B, C]`, the bias to `[B, cout]`, adds a dropout mask and drops the residual.
fn norm_conv_vs_sequence(per_example: bool, seed: u64) {
    let (b, cin, cout) = (4, 32, 16);
    let var = |s: u64, dims: &[usize], scale: f64| {
        Var::from_tensor(&randn(s, dims, DType::F32).affine(scale, 0.0).unwrap()).unwrap()
    };
    let affine: &[usize] = if per_example { &[b, cin] } else { &[cin] };
    let bias: &[usize] = if per_example { &[b, cout] } else { &[cout] };
    let x = var(seed, &[b, cin, 14, 14], 1.0);
    let (gamma, beta) = (var(seed + 1, affine, 0.5), var(seed + 2, affine, 0.5));
    let (w, bias) = (
        var(seed + 3, &[cout, cin, 3, 3], 0.1),
        var(seed + 4, bias, 1.0),
    );
    let r = var(seed + 5, &[b, cout, 14, 14], 1.0);
    let keep = randn(seed + 6, &[b, cin, 14, 14], DType::F32)
        .ge(0.0)
        .unwrap();
    let mask = keep.to_dtype(DType::F32).unwrap().affine(2.0, 0.0).unwrap();
    let mask = per_example.then_some(&mask);
    let residual = (!per_example).then(|| r.as_tensor());
    let norm = ddpm_ops::NormArgs {
        gamma: gamma.as_tensor(),
        beta: beta.as_tensor(),
        groups: 8,
        eps: 1e-5,
        silu: true,
        mask,
    };
    let conv = ddpm_ops::ConvArgs {
        weight: w.as_tensor(),
        bias: bias.as_tensor(),
        stride: 1,
        padding: 1,
    };
    let ours = ddpm_ops::norm_conv2d(x.as_tensor(), norm, conv, residual).unwrap();
    let (g, be) = (gamma.as_tensor(), beta.as_tensor());
    let h = ddpm_ops::group_norm_masked(x.as_tensor(), g, be, 8, 1e-5, true, mask).unwrap();
    let y = ddpm_ops::conv2d(&h, w.as_tensor(), Some(bias.as_tensor()), 1, 1).unwrap();
    let theirs = match residual {
        Some(r) => (y + r).unwrap(),
        None => y,
    };
    assert_eq!(rel_err(&ours, &theirs), 0.0);
    let mut inputs = vec![
        ("dx", x.as_tensor()),
        ("dgamma", g),
        ("dbeta", be),
        ("dw", w.as_tensor()),
        ("dbias", bias.as_tensor()),
    ];
    inputs.extend(residual.map(|r| ("dr", r)));
    assert_same_grads("norm_conv2d", ours, theirs, seed + 7, &inputs);
}

#[test]
fn norm_conv_matches_norm_then_conv() {
    norm_conv_vs_sequence(false, 31);
    norm_conv_vs_sequence(true, 41);
}

#[test]
fn norm_conv_rejects_mismatched_shapes() {
    let x = randn(51, &[2, 8, 6, 6], DType::F32);
    let (c8, c4) = (randn(52, &[8], DType::F32), randn(53, &[4], DType::F32));
    let w = randn(54, &[4, 8, 3, 3], DType::F32);
    let r = randn(55, &[2, 4, 6, 6], DType::F32);
    let norm = |gamma| ddpm_ops::NormArgs {
        gamma,
        beta: gamma,
        groups: 4,
        eps: 1e-5,
        silu: true,
        mask: None,
    };
    let conv = |bias| ddpm_ops::ConvArgs {
        weight: &w,
        bias,
        stride: 1,
        padding: 1,
    };
    let run = |n, c, r: Option<&Tensor>| ddpm_ops::norm_conv2d(&x, n, c, r);
    assert!(run(norm(&c8), conv(&c4), Some(&r)).is_ok());
    let bad_r = randn(56, &[2, 4, 6, 5], DType::F32);
    let e = run(norm(&c8), conv(&c4), Some(&bad_r)).unwrap_err();
    assert!(e.to_string().contains("residual"), "{e}");
    let e = run(norm(&c4), conv(&c4), None).unwrap_err();
    assert!(e.to_string().contains("gamma"), "{e}");
    let e = run(norm(&c8), conv(&c8), None).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
}

#[test]
fn upsample_matches_candle() {
    let x = Var::from_tensor(&randn(13, &[4, 40, 7, 9], DType::F32)).unwrap();
    let ours = ddpm_ops::upsample_nearest2x(x.as_tensor()).unwrap();
    let theirs = x.as_tensor().upsample_nearest2d(14, 18).unwrap();
    assert_eq!(ours.dims(), theirs.dims());
    assert_eq!(rel_err(&ours, &theirs), 0.0);
    // candle's own backward is right when the input is used once, as here.
    assert_same_grads(
        "upsample_nearest2x",
        ours,
        theirs,
        14,
        &[("dx", x.as_tensor())],
    );
    let bad = randn(12, &[4, 7, 9], DType::F32);
    assert!(ddpm_ops::upsample_nearest2x(&bad).is_err());
}

#[test]
fn softmax_matches_candle_nn() {
    let x = Var::from_tensor(
        &randn(8, &[4, 3, 37, 64], DType::F32)
            .affine(4.0, 0.0)
            .unwrap(),
    )
    .unwrap();
    let ours = ddpm_ops::softmax_last_dim(x.as_tensor()).unwrap();
    let theirs = candle_nn::ops::softmax(x.as_tensor(), candle_core::D::Minus1).unwrap();
    assert!(rel_err(&ours, &theirs) < 1e-6);
    assert_same_grads("softmax", ours, theirs, 9, &[("dx", x.as_tensor())]);
}

#[test]
fn attention_matches_composite() {
    // The op against candle's own matmuls and candle_nn's softmax, forward and gradients.
    let (n, d, t) = (6, 32, 64);
    let mk = |seed| Var::from_tensor(&randn(seed, &[n, d, t], DType::F32)).unwrap();
    let (q, k, v) = (mk(30), mk(31), mk(32));
    let scale = 1.0 / (d as f64).sqrt();
    let ours = ddpm_ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
    let s = (q.as_tensor().t().unwrap().matmul(k.as_tensor()).unwrap() * scale).unwrap();
    let w = candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap();
    let theirs = v.as_tensor().matmul(&w.t().unwrap()).unwrap();
    let e = rel_err(&ours, &theirs);
    assert!(e < TOL, "attention forward differs by {e:.2e}");
    let inputs = [
        ("dq", q.as_tensor()),
        ("dk", k.as_tensor()),
        ("dv", v.as_tensor()),
    ];
    assert_same_grads("attention", ours, theirs, 33, &inputs);
}
