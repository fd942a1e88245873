//! The elementwise kernels (GroupNorm, softmax) give bitwise the same values from their AVX-512
//! and AVX2 builds: neither contracts multiply-adds nor reorders sums, only the vector width
//! differs. Its own process: it flips the process-wide `DDPM_OPS_AVX512` switch. On a CPU
//! without AVX-512 both runs take the AVX2 build (the comparison then holds trivially; noted).

mod common;

use candle_core::{DType, Tensor, Var};
use common::randn;

/// An op under test, on its inputs.
type Op<'a> = &'a dyn Fn(&[Tensor]) -> Tensor;

/// Output and input gradients of `op` on `inputs` for a fixed cotangent, as bits.
fn bits_of(inputs: &[Tensor], op: Op) -> Vec<Vec<u32>> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts);
    let r = randn(77, y.dims(), DType::F32);
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    let mut out = vec![bits(&y)];
    out.extend(ts.iter().map(|t| bits(grads.get(t).unwrap())));
    out
}

#[test]
fn avx512_and_avx2_builds_agree_bitwise() {
    let x = randn(1, &[3, 32, 13, 11], DType::F32);
    let gamma = randn(2, &[3, 32], DType::F32);
    let beta = randn(3, &[3, 32], DType::F32);
    let mask = randn(4, &[3, 32, 13, 11], DType::F32).ge(0.0).unwrap();
    let mask = mask.to_dtype(DType::F32).unwrap();
    let s = randn(5, &[6, 37, 45], DType::F32);
    let norm = move |t: &[Tensor]| {
        ddpm_ops::group_norm_masked(&t[0], &t[1], &t[2], 8, 1e-5, true, Some(&mask)).unwrap()
    };
    let softmax = |t: &[Tensor]| ddpm_ops::softmax_scaled(&t[0], 0.3).unwrap();
    let cases: [(&str, Vec<Tensor>, Op); 2] = [
        ("group_norm_masked", vec![x, gamma, beta], &norm),
        ("softmax_scaled", vec![s], &softmax),
    ];
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    println!("AVX-512F on this CPU: {avx512} (without it both runs use the AVX2 build)");
    for (what, inputs, op) in cases {
        ddpm_ops::set_sgemm512(true);
        let wide = bits_of(&inputs, op);
        ddpm_ops::set_sgemm512(false);
        let narrow = bits_of(&inputs, op);
        ddpm_ops::set_sgemm512(true);
        for (i, (a, b)) in wide.iter().zip(&narrow).enumerate() {
            let diff = a.iter().zip(b).filter(|(p, q)| p != q).count();
            assert_eq!(
                diff, 0,
                "{what}: tensor {i} (0 = output) differs in {diff} values"
            );
        }
    }
}
