//! Finite-difference gradient checking for candle models (f64, CPU).
//!
//! The loss is `sum(output * R)` for a fixed random `R`, so every output element contributes with a
//! different weight. For each parameter tensor (and each input), the analytic gradient from
//! candle's backward pass is compared with the central difference `(L(p + h) - L(p - h)) / 2h` at a
//! deterministic sample of coordinates (all of them for small tensors).
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ddpm_rng::{Stream, StreamKey};

pub const H: f64 = 1e-5;

/// `n` standard normals from a fixed key, as an f64 tensor.
pub fn randn(seed: u64, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let mut v = vec![0f32; n];
    StreamKey::new(seed, Stream::Noise, 99, 0).fill_normal(&mut v);
    let v: Vec<f64> = v.into_iter().map(f64::from).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

pub fn var(seed: u64, dims: &[usize]) -> Var {
    Var::from_tensor(&randn(seed, dims)).unwrap()
}

/// Gives every variable of `varmap` a random value, so zero-initialised layers do not zero out the
/// gradients of everything before them and GroupNorm affines are not the identity.
pub fn randomize(varmap: &VarMap, seed: u64) {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (k, name) in names.into_iter().enumerate() {
        let v = &data[name];
        let dims = v.dims().to_vec();
        let z = randn(seed.wrapping_add(1000 + k as u64), &dims);
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            (z * (1.0 / (fan_in as f64).sqrt())).unwrap()
        } else if name.ends_with("weight") {
            ((z * 0.2).unwrap() + 1.0).unwrap()
        } else {
            (z * 0.2).unwrap()
        };
        v.set(&t.to_dtype(v.dtype()).unwrap()).unwrap();
    }
}

/// All variables of a map, sorted by name.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap();
    let mut v: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[derive(Debug, Default)]
pub struct Report {
    pub tensors: usize,
    pub coords: usize,
    pub max_abs_err: f64,
    pub max_rel_err: f64,
    pub failures: Vec<String>,
}

impl Report {
    pub fn assert_ok(&self, what: &str) {
        eprintln!(
            "gradcheck {what}: {} tensors, {} coordinates, max abs err {:.2e}, max rel err {:.2e}",
            self.tensors, self.coords, self.max_abs_err, self.max_rel_err
        );
        assert!(
            self.tensors > 0 && self.coords > 0,
            "{what}: nothing was checked"
        );
        assert!(
            self.failures.is_empty(),
            "{what}: gradient mismatches:\n{}",
            self.failures.join("\n")
        );
    }
}

fn coords(name: &str, n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    let key = StreamKey::new(7, Stream::Timestep, 0, ddpm_unet::params::name_hash(name));
    let mut c = vec![0, n - 1];
    let mut i = 0;
    while c.len() < max {
        let j = key.below(i, n as u32) as usize;
        i += 1;
        if !c.contains(&j) {
            c.push(j);
        }
    }
    c
}

/// Compares candle's gradient of `loss` with central differences for every variable in `vars`,
/// at up to `max_coords` coordinates each. `loss` must recompute from the current variable values.
pub fn check(vars: &[(String, Var)], max_coords: usize, loss: impl Fn() -> Tensor) -> Report {
    let l0 = loss();
    assert_eq!(l0.dtype(), DType::F64, "gradient checks run in f64");
    let grads = l0.backward().unwrap();
    let mut r = Report::default();
    let eval = || loss().to_scalar::<f64>().unwrap();
    for (name, v) in vars {
        r.tensors += 1;
        let Some(g) = grads.get(v.as_tensor()) else {
            r.failures
                .push(format!("{name}: no gradient reached this tensor"));
            continue;
        };
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let orig = v.as_tensor().clone().copy().unwrap();
        let mut vals: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let dims = v.dims().to_vec();
        for i in coords(name, vals.len(), max_coords) {
            let x = vals[i];
            vals[i] = x + H;
            v.set(&Tensor::from_vec(vals.clone(), dims.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let lp = eval();
            vals[i] = x - H;
            v.set(&Tensor::from_vec(vals.clone(), dims.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let lm = eval();
            vals[i] = x;
            let fd = (lp - lm) / (2.0 * H);
            let an = g[i];
            let abs = (fd - an).abs();
            let scale = fd.abs().max(an.abs());
            let rel = if scale > 0.0 { abs / scale } else { 0.0 };
            r.coords += 1;
            r.max_abs_err = r.max_abs_err.max(abs);
            if scale > 1e-4 {
                r.max_rel_err = r.max_rel_err.max(rel);
            }
            // Central differences in f64 with h = 1e-5 agree with autograd to ~3e-9 absolute and ~2e-7
            // relative on these models; the bound leaves a few-fold margin.
            if abs > 2e-8 + 1e-6 * scale {
                r.failures.push(format!(
                    "{name}[{i}]: autograd {an:.9e}, finite difference {fd:.9e}"
                ));
            }
        }
        v.set(&orig).unwrap();
    }
    r
}

/// `sum(y * R)` with a fixed random `R` of `y`'s shape.
pub fn weighted_sum(y: &Tensor, seed: u64) -> Tensor {
    let r = randn(seed, y.dims());
    (y * r).unwrap().sum_all().unwrap()
}
