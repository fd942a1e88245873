//! Sinusoidal timestep features (improved-diffusion convention: cosines first, then sines).

use candle_core::{Tensor, D};

/// `[B] -> [B, dim]`: `cos(t * f_i)` for `i < dim/2`, then `sin(t * f_i)`, with
/// `f_i = max_period^(-i / (dim/2))`; a zero column is appended when `dim` is odd.
/// Frequencies are computed in f64 on the host and the result is in `t`'s dtype.
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f64) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let b = t.dim(0)?;
    let freqs: Vec<f64> =
        (0..half).map(|i| (-(max_period.ln()) * i as f64 / half as f64).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?.to_dtype(t.dtype())?;
    let args = t.reshape((b, 1))?.broadcast_mul(&freqs)?;
    let mut emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?;
    if dim % 2 == 1 {
        emb = Tensor::cat(&[emb, Tensor::zeros((b, 1), t.dtype(), t.device())?], D::Minus1)?;
    }
    Ok(emb)
}
