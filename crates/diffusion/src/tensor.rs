//! Bridges from the f64 host tables to per-sample coefficient tensors.
//!
//! Coefficients are gathered on the host and uploaded as a `[B, 1, .., 1]` tensor in the dtype and on the
//! device of the data. This keeps every table in f64 until the last moment (improved-diffusion's
//! `_extract_into_tensor`) and needs no gather kernel on the device.

use candle_core::{DType, Device, Tensor};

use crate::error::{DiffusionError, Result};

/// A `[B, 1, .., 1]` tensor (rank of `like`) holding `values[b]`, in `like`'s dtype and device.
pub fn per_sample(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let b = like.dim(0)?;
    if values.len() != b {
        return Err(DiffusionError::Shape(format!(
            "{} per-sample values for a batch of {b}",
            values.len()
        )));
    }
    let mut shape = vec![1usize; like.rank()];
    shape[0] = b;
    host_tensor(values, shape, like.dtype(), like.device())
}

/// A tensor of the given shape from f64 host values, rounded once to `dtype`.
pub fn host_tensor(
    values: &[f64],
    shape: Vec<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = match dtype {
        DType::F64 => Tensor::from_vec(values.to_vec(), shape, device)?,
        DType::F32 => Tensor::from_vec(
            values.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
            shape,
            device,
        )?,
        other => Tensor::from_vec(
            values.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
            shape,
            device,
        )?
        .to_dtype(other)?,
    };
    Ok(t)
}

/// `table[t[b]]` for each sample as a `[B, 1, .., 1]` tensor shaped for broadcasting against `like`.
pub fn extract(table: &[f64], t: &[usize], like: &Tensor) -> Result<Tensor> {
    let vals = gather(table, t)?;
    per_sample(&vals, like)
}

/// `table[t[b]]` on the host, with a range check instead of a panic.
pub fn gather(table: &[f64], t: &[usize]) -> Result<Vec<f64>> {
    t.iter()
        .map(|&ti| {
            table
                .get(ti)
                .copied()
                .ok_or(DiffusionError::TimestepOutOfRange {
                    t: ti,
                    num_timesteps: table.len(),
                })
        })
        .collect()
}

/// Mean over every axis but the batch axis: `[B, ..] -> [B]`.
pub fn mean_flat(x: &Tensor) -> Result<Tensor> {
    if x.rank() < 2 {
        return Ok(x.clone());
    }
    Ok(x.flatten_from(1)?.mean(1)?)
}

/// Checks that two tensors have the same shape, naming them in the error.
pub fn same_shape(a: &Tensor, a_name: &str, b: &Tensor, b_name: &str) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(DiffusionError::Shape(format!(
            "{a_name} has shape {:?} but {b_name} has shape {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}

/// Checks that a per-sample host vector matches the batch size of `x`.
pub fn check_batch(t: &[usize], x: &Tensor, name: &str) -> Result<()> {
    let b = x.dim(0)?;
    if t.len() != b {
        return Err(DiffusionError::Shape(format!(
            "{} timesteps for {name} with batch size {b}",
            t.len()
        )));
    }
    Ok(())
}
