//! Shared helpers: seeded inputs and a finite-difference gradient check.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};

/// Deterministic standard normals (xorshift + Box-Muller), independent of any RNG crate.
pub fn randn(seed: u64, dims: &[usize], dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let (u1, u2) = (next(), next());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Largest |a - b| relative to max(1, max |b|).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1.0)
}

/// Checks the autograd gradient of `loss = sum(f(inputs) * r)` (r fixed random weights) against
/// central differences for EVERY coordinate of every input (f64; keep inputs small).
/// Returns the worst |analytic - numeric| / max(1, |numeric|) over all coordinates.
pub fn gradcheck(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> f64 {
    let h = 1e-5;
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).unwrap();
    let r = randn(99, out.dims(), DType::F64);
    let loss = |xs: &[Tensor]| -> f64 {
        (f(xs).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut worst = 0.0f64;
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for input {i}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = inputs[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(g.len(), base.len());
        for k in 0..base.len() {
            let eval = |d: f64| {
                let mut p = base.clone();
                p[k] += d;
                let mut xs: Vec<Tensor> = inputs.to_vec();
                xs[i] = Tensor::from_vec(p, inputs[i].dims(), &Device::Cpu).unwrap();
                loss(&xs)
            };
            let num = (eval(h) - eval(-h)) / (2.0 * h);
            let err = (g[k] - num).abs() / num.abs().max(1.0);
            assert!(
                err < 1e-6,
                "input {i} coord {k}: autograd {} vs central difference {num} (err {err:.2e})",
                g[k]
            );
            worst = worst.max(err);
        }
    }
    worst
}
