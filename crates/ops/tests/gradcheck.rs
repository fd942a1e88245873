//! Finite-difference gradient checks (f64): every op's backward against central differences,
//! for every coordinate of every input, over the shapes the U-Net uses (3x3 stride 1 and 2,
//! 1x1, odd sizes, padding 0/1), in both the threaded-examples and threaded-GEMM paths.

mod common;

use candle_core::DType;
use common::{gradcheck, randn};

fn conv_case(b: usize, cin: usize, cout: usize, hw: (usize, usize), k: usize, s: usize, p: usize) {
    // Every test in this binary sets the same count: batches of 3+ take the threaded-examples
    // path, smaller ones the threaded-GEMM path, whatever the machine's core count.
    ddpm_ops::set_num_threads(3);
    let x = randn(1, &[b, cin, hw.0, hw.1], DType::F64);
    let w = randn(2, &[cout, cin, k, k], DType::F64);
    let bias = randn(3, &[cout], DType::F64);
    let worst = gradcheck(&[x.clone(), w.clone(), bias], |t| {
        ddpm_ops::conv2d(&t[0], &t[1], Some(&t[2]), s, p)
    });
    let worst_nb = gradcheck(&[x, w], |t| ddpm_ops::conv2d(&t[0], &t[1], None, s, p));
    println!("conv b{b} {cin}->{cout} {hw:?} k{k} s{s} p{p}: worst rel err {worst:.2e} / no bias {worst_nb:.2e}");
}

#[test]
fn conv3x3_stride1_pad1() {
    conv_case(3, 3, 4, (5, 6), 3, 1, 1);
}

#[test]
fn conv3x3_stride2_pad1_even_and_odd() {
    conv_case(2, 2, 3, (6, 6), 3, 2, 1);
    conv_case(3, 2, 3, (7, 5), 3, 2, 1);
    conv_case(4, 2, 3, (7, 5), 3, 2, 1);
}

#[test]
fn conv1x1_pointwise() {
    conv_case(3, 5, 3, (4, 3), 1, 1, 0);
}

#[test]
fn conv_unpadded_and_strided_1x1() {
    conv_case(2, 2, 3, (6, 5), 3, 1, 0);
    conv_case(2, 3, 2, (5, 5), 1, 2, 0);
    conv_case(2, 2, 2, (6, 6), 2, 2, 0);
}

#[test]
fn conv_tiled_columns() {
    // Tiny tiles: 64-pixel column tiles that end mid-row, several per example.
    ddpm_ops::set_tile_bytes(1);
    conv_case(3, 2, 2, (12, 11), 3, 1, 1);
    conv_case(3, 2, 2, (17, 17), 3, 2, 1);
    conv_case(1, 2, 2, (12, 11), 3, 1, 1);
}

#[test]
fn conv3x3_winograd4_sizes() {
    // Feature maps of 8+ pixels a side with 16+ channels in and out take F(4x4, 3x3) (others
    // F(2x2, 3x3)): whole tiles, partial tiles at the right and bottom edges, one example
    // (threaded GEMMs) and several.
    conv_case(2, 16, 16, (8, 8), 3, 1, 1);
    conv_case(2, 16, 17, (9, 10), 3, 1, 1);
    conv_case(1, 17, 16, (13, 11), 3, 1, 1);
}

#[test]
fn conv3x3_winograd_small_blocks() {
    // Blocks that end mid tile-row (27 F(4x4) tiles of 3 per row in blocks of ~14; 3 F(2x2) tiles
    // per row in blocks of 32 of 75). The block size only changes speed for the other tests.
    ddpm_ops::set_winograd_block_bytes(1);
    conv_case(3, 16, 16, (10, 10), 3, 1, 1);
    conv_case(3, 2, 2, (5, 6), 3, 1, 1);
}

#[test]
fn conv_single_example() {
    // One example: the threaded-GEMM path (fewer examples than threads).
    conv_case(1, 3, 4, (5, 5), 3, 1, 1);
}

#[test]
fn conv_per_example_bias() {
    ddpm_ops::set_num_threads(3);
    // [B, cout] bias (a ResBlock's conv bias plus its embedding): Winograd and im2col paths.
    for (k, s, p, hw) in [(3, 1, 1, (5, 6)), (3, 2, 1, (6, 5)), (1, 1, 0, (4, 3))] {
        let x = randn(1, &[3, 2, hw.0, hw.1], DType::F64);
        let w = randn(2, &[4, 2, k, k], DType::F64);
        let b = randn(3, &[3, 4], DType::F64);
        let worst = gradcheck(&[x, w, b], |t| {
            ddpm_ops::conv2d(&t[0], &t[1], Some(&t[2]), s, p)
        });
        println!("conv per-example bias k{k} s{s}: worst rel err {worst:.2e}");
    }
}

#[test]
fn conv_input_without_gradient() {
    // x a plain tensor (not a variable): only weight and bias get gradients.
    let x = randn(1, &[2, 3, 5, 5], DType::F64);
    let w = candle_core::Var::from_tensor(&randn(2, &[4, 3, 3, 3], DType::F64)).unwrap();
    let b = candle_core::Var::from_tensor(&randn(3, &[4], DType::F64)).unwrap();
    let y = ddpm_ops::conv2d(&x, w.as_tensor(), Some(b.as_tensor()), 1, 1).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none());
    assert!(g.get(w.as_tensor()).is_some() && g.get(b.as_tensor()).is_some());
}

fn gn_case(dims: &[usize], groups: usize, silu: bool) {
    let c = dims[1];
    let x = randn(4, dims, DType::F64).affine(2.0, 0.5).unwrap();
    let g = randn(5, &[c], DType::F64).affine(0.5, 1.0).unwrap();
    let b = randn(6, &[c], DType::F64).affine(0.5, 0.0).unwrap();
    let worst = gradcheck(&[x, g, b], |t| {
        ddpm_ops::group_norm(&t[0], &t[1], &t[2], groups, 1e-5, silu)
    });
    println!("group_norm {dims:?} groups {groups} silu {silu}: worst rel err {worst:.2e}");
}

#[test]
fn group_norm_silu() {
    gn_case(&[3, 6, 4, 5], 3, true);
    gn_case(&[2, 4, 3, 3], 1, true);
}

#[test]
fn group_norm_plain() {
    gn_case(&[3, 6, 4, 5], 2, false);
    gn_case(&[2, 4, 7], 4, false);
}

#[test]
fn group_norm_masked() {
    // A dropout-like mask (zeros and 1/(1-p)) folded into the op; the mask gets no gradient.
    for (dims, groups, silu) in [([3usize, 6, 4, 5], 3, true), ([2, 4, 3, 3], 2, false)] {
        let c = dims[1];
        let x = randn(4, &dims, DType::F64).affine(2.0, 0.5).unwrap();
        let g = randn(5, &[c], DType::F64).affine(0.5, 1.0).unwrap();
        let b = randn(6, &[c], DType::F64).affine(0.5, 0.0).unwrap();
        let mask = randn(7, &dims, DType::F64)
            .ge(-0.5)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .affine(1.25, 0.0)
            .unwrap();
        let worst = gradcheck(&[x, g, b], |t| {
            ddpm_ops::group_norm_masked(&t[0], &t[1], &t[2], groups, 1e-5, silu, Some(&mask))
        });
        println!("group_norm_masked {dims:?} silu {silu}: worst rel err {worst:.2e}");
    }
}

#[test]
fn group_norm_per_example_affine() {
    // gamma and beta [B, C] (a ResBlock's scale-shift conditioning folded into the affine), with
    // and without a mask: per-example parameter gradients.
    for (dims, groups, silu, masked) in [
        (&[3usize, 6, 4, 5][..], 3, true, false),
        (&[2, 4, 3, 3], 2, true, true),
        (&[2, 4, 5], 4, false, false),
    ] {
        let (bsz, c) = (dims[0], dims[1]);
        let x = randn(4, dims, DType::F64).affine(2.0, 0.5).unwrap();
        let g = randn(5, &[bsz, c], DType::F64).affine(0.5, 1.0).unwrap();
        let b = randn(6, &[bsz, c], DType::F64).affine(0.5, 0.0).unwrap();
        let mask = masked.then(|| {
            let m = randn(7, dims, DType::F64).ge(-0.5).unwrap();
            m.to_dtype(DType::F64).unwrap().affine(1.25, 0.0).unwrap()
        });
        let worst = gradcheck(&[x, g, b], |t| {
            ddpm_ops::group_norm_masked(&t[0], &t[1], &t[2], groups, 1e-5, silu, mask.as_ref())
        });
        println!(
            "group_norm per-example {dims:?} silu {silu} mask {masked}: worst rel err {worst:.2e}"
        );
    }
}

#[test]
fn cat_channels() {
    let a = randn(8, &[3, 2, 4, 5], DType::F64);
    let b = randn(9, &[3, 3, 4, 5], DType::F64);
    // Squared so the gradient reaching each input depends on its values, not just ones.
    let worst = gradcheck(&[a, b], |t| ddpm_ops::cat_channels(&t[0], &t[1])?.sqr());
    println!("cat_channels: worst rel err {worst:.2e}");
}

#[test]
fn norm_conv() {
    ddpm_ops::set_num_threads(3);
    // Winograd (3x3, both F(2x2) and F(4x4) sizes), strided and 1x1 convs; per-channel and
    // per-example affine and bias; with a mask and a residual (squared in as well, so its gradient
    // is not only the output's).
    let cases = [
        (3, 4, 4, (5, 6), 3, 1, false),
        (2, 16, 16, (9, 8), 3, 1, true),
        (3, 4, 3, (7, 5), 3, 2, false),
        (2, 4, 2, (4, 3), 1, 1, true),
    ];
    for (b, cin, cout, hw, k, s, per_example) in cases {
        let p = k / 2;
        let (ho, wo) = ((hw.0 + 2 * p - k) / s + 1, (hw.1 + 2 * p - k) / s + 1);
        let affine: &[usize] = if per_example { &[b, cin] } else { &[cin] };
        let bias: &[usize] = if per_example { &[b, cout] } else { &[cout] };
        let x = randn(21, &[b, cin, hw.0, hw.1], DType::F64);
        let gamma = randn(22, affine, DType::F64);
        let beta = randn(23, affine, DType::F64);
        let w = randn(24, &[cout, cin, k, k], DType::F64);
        let bias = randn(25, bias, DType::F64);
        let r = randn(26, &[b, cout, ho, wo], DType::F64);
        let mask = randn(27, &[b, cin, hw.0, hw.1], DType::F64)
            .ge(0.0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let mask = per_example.then_some(mask);
        let worst = gradcheck(&[x, gamma, beta, w, bias, r], |t| {
            let norm = ddpm_ops::NormArgs {
                gamma: &t[1],
                beta: &t[2],
                groups: 2,
                eps: 1e-5,
                silu: true,
                mask: mask.as_ref(),
            };
            let conv = ddpm_ops::ConvArgs {
                weight: &t[3],
                bias: &t[4],
                stride: s,
                padding: p,
            };
            ddpm_ops::norm_conv2d(&t[0], norm, conv, Some(&t[5]))? + t[5].sqr()?
        });
        println!("norm_conv b{b} {cin}->{cout} {hw:?} k{k} s{s}: worst rel err {worst:.2e}");
    }
}

#[test]
fn upsample_nearest2x() {
    // Odd sizes and enough planes for several parallel tasks; squared so the gradient reaching
    // each input pixel depends on the four values it was copied to.
    let x = randn(13, &[3, 7, 3, 5], DType::F64);
    let worst = gradcheck(&[x], |t| ddpm_ops::upsample_nearest2x(&t[0])?.sqr());
    println!("upsample_nearest2x: worst rel err {worst:.2e}");
}

#[test]
fn softmax_last_dim() {
    let x = randn(7, &[3, 4, 7], DType::F64).affine(2.0, 0.0).unwrap();
    let worst = gradcheck(&[x], |t| ddpm_ops::softmax_last_dim(&t[0]));
    println!("softmax: worst rel err {worst:.2e}");
}

#[test]
fn softmax_scaled() {
    let x = randn(7, &[2, 3, 6], DType::F64).affine(2.0, 0.0).unwrap();
    let worst = gradcheck(&[x], |t| ddpm_ops::softmax_scaled(&t[0], 0.37));
    println!("softmax scaled: worst rel err {worst:.2e}");
    assert!(ddpm_ops::softmax_scaled(&randn(1, &[2, 3], DType::F64), 0.0).is_err());
}

#[test]
fn softmax_of_noncontiguous_input() {
    let x = randn(8, &[3, 5, 4], DType::F64).affine(2.0, 0.0).unwrap();
    let worst = gradcheck(&[x], |t| ddpm_ops::softmax_last_dim(&t[0].transpose(1, 2)?));
    println!("softmax (transposed input): worst rel err {worst:.2e}");
}

#[test]
fn attention_op() {
    // n = batch x heads items of [d, t]; several items (threaded items) and one (threaded GEMMs).
    for (n, d, t) in [(3, 4, 5), (1, 3, 6)] {
        let q = randn(20, &[n, d, t], DType::F64);
        let k = randn(21, &[n, d, t], DType::F64);
        let v = randn(22, &[n, d, t], DType::F64);
        let worst = gradcheck(&[q, k, v], |x| {
            ddpm_ops::attention(&x[0], &x[1], &x[2], 0.6)
        });
        println!("attention n{n} d{d} t{t}: worst rel err {worst:.2e}");
    }
}

#[test]
fn chain_of_ops() {
    ddpm_ops::set_num_threads(3);
    // conv -> GroupNorm+SiLU -> strided conv, with x used twice (as in a residual block).
    let x = randn(9, &[3, 4, 6, 6], DType::F64);
    let w1 = randn(10, &[4, 4, 3, 3], DType::F64)
        .affine(0.3, 0.0)
        .unwrap();
    let g = randn(11, &[4], DType::F64).affine(0.3, 1.0).unwrap();
    let b = randn(12, &[4], DType::F64).affine(0.3, 0.0).unwrap();
    let w2 = randn(13, &[3, 4, 3, 3], DType::F64)
        .affine(0.3, 0.0)
        .unwrap();
    let worst = gradcheck(&[x, w1, g, b, w2], |t| {
        let h = ddpm_ops::conv2d(&t[0], &t[1], None, 1, 1)?;
        let h = (ddpm_ops::group_norm(&h, &t[2], &t[3], 2, 1e-5, true)? + &t[0])?;
        ddpm_ops::conv2d(&h, &t[4], None, 2, 1)
    });
    println!("chain: worst rel err {worst:.2e}");
}
