//! Mixed precision: bf16 inputs are computed in f32 and rounded back once, forward and backward,
//! so a bf16 op returns exactly the f32 op's result on the same (bf16-valued) inputs, rounded.
//! Computed in bf16 throughout (candle's composites), GroupNorm's statistics and the convolution's
//! sums would carry 8-bit-mantissa rounding at every addition instead.

mod common;

use candle_core::{DType, Tensor, Var};
use common::randn;

/// bf16 copies of random tensors as variables, and their (exact) f32 values as variables.
fn pair(seed: u64, dims: &[usize], scale: f64) -> (Var, Var) {
    let h = randn(seed, dims, DType::F32)
        .affine(scale, 0.0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let f = h.to_dtype(DType::F32).unwrap();
    (Var::from_tensor(&h).unwrap(), Var::from_tensor(&f).unwrap())
}

/// The bf16 values' bits (widening bf16 to f32 is exact).
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// `op` on the bf16 variables equals `op` on the f32 ones rounded to bf16, and so does every
/// input gradient for the same (bf16-valued) cotangent.
fn check(what: &str, inputs: &[(Var, Var)], op: impl Fn(&[Tensor]) -> Tensor) {
    let half: Vec<Tensor> = inputs.iter().map(|(h, _)| h.as_tensor().clone()).collect();
    let full: Vec<Tensor> = inputs.iter().map(|(_, f)| f.as_tensor().clone()).collect();
    let (yh, yf) = (op(&half), op(&full));
    assert_eq!(yh.dtype(), DType::BF16, "{what}: output dtype");
    assert_eq!(
        bits(&yh),
        bits(&yf.to_dtype(DType::BF16).unwrap()),
        "{what}: forward is not the f32 result rounded once"
    );
    let r = randn(99, yh.dims(), DType::F32)
        .to_dtype(DType::BF16)
        .unwrap();
    let gh = (yh * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let rf = r.to_dtype(DType::F32).unwrap();
    let gf = (yf * rf).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, (h, f)) in inputs.iter().enumerate() {
        let (dh, df) = (
            gh.get(h.as_tensor()).unwrap(),
            gf.get(f.as_tensor()).unwrap(),
        );
        assert_eq!(dh.dtype(), DType::BF16);
        assert_eq!(
            bits(dh),
            bits(&df.to_dtype(DType::BF16).unwrap()),
            "{what}: gradient of input {i} is not the f32 gradient rounded once"
        );
    }
}

#[test]
fn conv2d_bf16_is_f32_rounded() {
    for (k, s) in [(3, 1), (3, 2), (1, 1)] {
        let x = pair(1, &[2, 16, 12, 12], 1.0);
        let w = pair(2, &[24, 16, k, k], 0.2);
        let b = pair(3, &[24], 1.0);
        check(&format!("conv k{k} s{s}"), &[x, w, b], |t| {
            ddpm_ops::conv2d(&t[0], &t[1], Some(&t[2]), s, k / 2).unwrap()
        });
    }
}

#[test]
fn group_norm_bf16_is_f32_rounded() {
    let x = pair(4, &[2, 16, 6, 6], 3.0);
    let g = pair(5, &[16], 1.0);
    let b = pair(6, &[16], 1.0);
    check("group_norm silu", &[x.clone(), g.clone(), b.clone()], |t| {
        ddpm_ops::group_norm(&t[0], &t[1], &t[2], 4, 1e-5, true).unwrap()
    });
    // per-example affine (scale-shift conditioning) with a dropout mask
    let gs = pair(7, &[2, 16], 1.0);
    let bs = pair(8, &[2, 16], 1.0);
    let mask = randn(9, &[2, 16, 6, 6], DType::F32)
        .ge(0.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    check("group_norm scale-shift masked", &[x, gs, bs], |t| {
        let m = mask.to_dtype(t[0].dtype()).unwrap();
        ddpm_ops::group_norm_masked(&t[0], &t[1], &t[2], 4, 1e-5, true, Some(&m)).unwrap()
    });
}

#[test]
fn softmax_and_attention_bf16_are_f32_rounded() {
    let x = pair(10, &[3, 5, 17], 4.0);
    check("softmax", &[x], |t| {
        ddpm_ops::softmax_scaled(&t[0], 0.5).unwrap()
    });
    let q = pair(11, &[4, 8, 16], 1.0);
    let k = pair(12, &[4, 8, 16], 1.0);
    let v = pair(13, &[4, 8, 16], 1.0);
    check("attention", &[q, k, v], |t| {
        ddpm_ops::attention(&t[0], &t[1], &t[2], 1.0 / 8f64.sqrt()).unwrap()
    });
}
