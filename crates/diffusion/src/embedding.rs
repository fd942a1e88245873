//! Sinusoidal timestep embedding (improved-diffusion `nn.timestep_embedding`): `[cos | sin]`, cos first.
//!
//! The frequencies are computed in the precision of the output, with improved-diffusion's operation order,
//! because at t ~ 1000 a one-ulp difference in a f32 frequency moves `t * freq` by ~6e-5 and the
//! embedding by as much. Computing them in f32 the way torch does keeps the f32 path within ~1e-6 of a
//! PyTorch-trained model's embedding.

use candle_core::{DType, Tensor};

use crate::tensor::host_tensor;

/// The default `max_period` of improved-diffusion.
pub const DEFAULT_MAX_PERIOD: f64 = 10000.0;

/// `freqs[i] = exp(-ln(max_period) * i / half)` in f64.
fn freqs_f64(half: usize, max_period: f64) -> Vec<f64> {
    let l = -max_period.ln();
    (0..half)
        .map(|i| (l * i as f64 / half as f64).exp())
        .collect()
}

/// The same frequencies as torch computes them in f32: every operation rounded to f32.
fn freqs_f32(half: usize, max_period: f64) -> Vec<f64> {
    let l = (-max_period.ln()) as f32;
    (0..half)
        .map(|i| {
            let a = l * i as f32 / half as f32;
            // exp in f64 then one rounding: the correctly rounded f32 exp.
            ((a as f64).exp() as f32) as f64
        })
        .collect()
}

/// The `dim / 2` frequencies as the embedding of dtype `dtype` uses them (f64 values; exact f32 values
/// for every other dtype).
pub fn embedding_frequencies(dim: usize, max_period: f64, dtype: DType) -> Vec<f64> {
    match dtype {
        DType::F64 => freqs_f64(dim / 2, max_period),
        _ => freqs_f32(dim / 2, max_period),
    }
}

/// `[B] -> [B, dim]` embedding of (possibly fractional) timesteps, in the dtype and device of `t`.
/// An odd `dim` gets a trailing zero column.
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f64) -> candle_core::Result<Tensor> {
    let freqs = embedding_frequencies(dim, max_period, t.dtype());
    timestep_embedding_with_frequencies(t, &freqs, dim)
}

/// The embedding with explicit frequencies (`dim / 2` of them), rounded once to the dtype of `t`.
pub fn timestep_embedding_with_frequencies(
    t: &Tensor,
    freqs: &[f64],
    dim: usize,
) -> candle_core::Result<Tensor> {
    let b = t.dim(0)?;
    let dtype = t.dtype();
    let device = t.device();
    let half = dim / 2;
    if freqs.len() != half {
        candle_core::bail!(
            "{} frequencies for an embedding of dimension {dim}",
            freqs.len()
        );
    }
    if half == 0 {
        return Tensor::zeros((b, dim), dtype, device);
    }
    let freqs = host_tensor(freqs, vec![1, half], dtype, device)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let args = t.reshape((b, 1))?.broadcast_mul(&freqs)?;
    let mut parts = vec![args.cos()?, args.sin()?];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((b, 1), dtype, device)?);
    }
    Tensor::cat(&parts, 1)
}

/// f64 host version: row-major `[t.len(), dim]`.
pub fn timestep_embedding_f64(t: &[f64], dim: usize, max_period: f64) -> Vec<f64> {
    let half = dim / 2;
    let freqs = freqs_f64(half, max_period);
    let mut out = Vec::with_capacity(t.len() * dim);
    for &ti in t {
        out.extend(freqs.iter().map(|f| (ti * f).cos()));
        out.extend(freqs.iter().map(|f| (ti * f).sin()));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layout_cos_first_and_odd_dim() {
        let t = Tensor::new(&[0.0f64, 3.0], &Device::Cpu).unwrap();
        let e = timestep_embedding(&t, 7, DEFAULT_MAX_PERIOD).unwrap();
        assert_eq!(e.dims(), &[2, 7]);
        let e = e.to_vec2::<f64>().unwrap();
        // t = 0: cos = 1, sin = 0, trailing zero.
        assert_eq!(e[0], vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        // First frequency is 1: cos(3), then sin(3) at position half.
        assert_eq!(e[1][0], 3f64.cos());
        assert_eq!(e[1][3], 3f64.sin());
        assert_eq!(e[1][6], 0.0);
        let h = timestep_embedding_f64(&[0.0, 3.0], 7, DEFAULT_MAX_PERIOD);
        assert_eq!(h[7..], e[1][..]);
    }

    #[test]
    fn f32_and_f64_paths_agree() {
        let t64 = Tensor::new(&[0.0f64, 1.0, 17.0, 500.0, 999.0], &Device::Cpu).unwrap();
        let t32 = t64.to_dtype(DType::F32).unwrap();
        let a = timestep_embedding(&t64, 64, DEFAULT_MAX_PERIOD).unwrap();
        let b = timestep_embedding(&t32, 64, DEFAULT_MAX_PERIOD).unwrap();
        assert_eq!(b.dtype(), DType::F32);
        let d = (a - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        let max = d
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        // f32 rounding of t * freq at t = 999 moves the embedding by up to ~1e-4.
        assert!(max < 2e-4, "max diff {max}");
    }

    #[test]
    fn tiny_dims() {
        let t = Tensor::new(&[5.0f32], &Device::Cpu).unwrap();
        assert_eq!(timestep_embedding(&t, 0, 10.0).unwrap().dims(), &[1, 0]);
        let e = timestep_embedding(&t, 1, 10.0).unwrap();
        assert_eq!(e.to_vec2::<f32>().unwrap(), vec![vec![0.0]]);
    }
}
