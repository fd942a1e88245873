//! Shared helpers of the integration tests: reference-vector loading and comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// Where the reference vectors are: `$DDPM_REFS_DIR`, else the repository's copy
/// (`tests/data/refs`), else the shared folder they were copied from. A missing file is a test
/// failure, never a skip.
pub fn refs_file(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(d) = std::env::var("DDPM_REFS_DIR") {
        dirs.push(d.into());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    dirs.push(root.join("tests/data/refs"));
    dirs.push(PathBuf::from("/work/shared/refs/public"));
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("reference file {name} not found in any of {dirs:?}");
}

pub fn load_json(name: &str) -> Value {
    let p = refs_file(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Flattens a nested JSON array of numbers; returns values and shape.
pub fn flatten(v: &Value) -> (Vec<f64>, Vec<usize>) {
    fn rec(v: &Value, depth: usize, out: &mut Vec<f64>, shape: &mut Vec<usize>) {
        match v {
            Value::Array(a) => {
                if shape.len() <= depth {
                    shape.push(a.len());
                }
                for x in a {
                    rec(x, depth + 1, out, shape);
                }
            }
            Value::Number(n) => out.push(n.as_f64().expect("number")),
            other => panic!("not a number: {other}"),
        }
    }
    let mut out = Vec::new();
    let mut shape = Vec::new();
    rec(v, 0, &mut out, &mut shape);
    (out, shape)
}

pub fn tensor(v: &Value, dtype: DType) -> Tensor {
    let (vals, shape) = flatten(v);
    Tensor::from_vec(vals, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer") as usize)
        .collect()
}

/// Largest `|got - exp| / max(1, |exp|)` (the refs README's mixed tolerance measure).
pub fn max_mixed_err(got: &Tensor, exp: &[f64]) -> f64 {
    let g: Vec<f64> = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(g.len(), exp.len(), "length mismatch");
    g.iter()
        .zip(exp)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f64::max)
}

/// Largest relative error `|got - exp| / max|exp|` over the whole tensor.
pub fn max_rel_err(got: &Tensor, exp: &[f64]) -> f64 {
    let g: Vec<f64> = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(g.len(), exp.len(), "length mismatch");
    let scale = exp.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    g.iter()
        .zip(exp)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Gives every variable of a freshly initialised model a random value (fan-in scaled), so the
/// zero-initialised output layers do not make the network output identically 0.
pub fn randomize(varmap: &candle_nn::VarMap, seed: u64) {
    use ddpm_rng::{Stream, StreamKey};
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (k, name) in names.into_iter().enumerate() {
        let v = &data[name];
        let dims = v.dims().to_vec();
        let n: usize = dims.iter().product();
        let mut z = vec![0f32; n];
        StreamKey::new(seed, Stream::Noise, 77, k as u64).fill_normal(&mut z);
        let scale = if dims.len() >= 2 {
            1.0 / (dims[1..].iter().product::<usize>() as f32).sqrt()
        } else {
            0.2
        };
        let offset = if dims.len() < 2 && name.ends_with("weight") {
            1.0
        } else {
            0.0
        };
        let vals: Vec<f32> = z.iter().map(|x| x * scale + offset).collect();
        let t = Tensor::from_vec(vals, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        v.set(&t).unwrap();
    }
}
