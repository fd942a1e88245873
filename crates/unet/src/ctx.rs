//! Per-call state of a forward pass: training or not, and where dropout masks come from.
//!
//! Dropout masks are drawn from ddpm-rng, keyed by the example's index in the *global* batch, so
//! a sample gets the same mask whether it is processed on rank 0 of 1 or rank 3 of 8, and a
//! resumed run draws the same masks as an uninterrupted one. candle's own dropout uses a
//! thread-local RNG and has neither property.

use candle_core::{DType, Device, Tensor};
use ddpm_rng::StreamKey;
use rayon::prelude::*;

use crate::error::{Result, UNetError};

/// Identifies the dropout masks of one training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    /// Optimiser step.
    pub step: u64,
    /// Global index of the first example of the local batch.
    pub first_example: u64,
}

/// How to run a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardCtx {
    /// Training mode: dropout is applied (and needs `dropout`).
    pub train: bool,
    pub dropout: Option<DropoutKey>,
}

impl ForwardCtx {
    /// Inference: no dropout.
    pub fn eval() -> Self {
        Self {
            train: false,
            dropout: None,
        }
    }

    /// Training with the dropout masks of `key`.
    pub fn train(key: DropoutKey) -> Self {
        Self {
            train: true,
            dropout: Some(key),
        }
    }

    /// The multiplicative dropout mask of dropout layer `layer` for a feature map of shape
    /// `[B, ...]`, or `None` when no dropout applies. Element `e` of local example `i` is kept
    /// (and scaled by `1 / (1 - p)`) when draw `e` of
    /// `StreamKey::dropout(seed, layer, step, first_example + i)` is `>= p`.
    pub fn dropout_mask(
        &self,
        layer: u32,
        p: f64,
        dims: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        if !self.train || p <= 0.0 {
            return Ok(None);
        }
        let key = self.dropout.ok_or_else(|| {
            UNetError::Input(
                "training forward with dropout > 0 needs ForwardCtx::dropout (a DropoutKey)".into(),
            )
        })?;
        Ok(Some(dropout_mask(key, layer, p, dims, dtype, device)?))
    }
}

/// See [`ForwardCtx::dropout_mask`].
pub fn dropout_mask(
    key: DropoutKey,
    layer: u32,
    p: f64,
    dims: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let b = dims.first().copied().unwrap_or(1);
    let per_example: usize = dims.iter().skip(1).product();
    let scale = (1.0 / (1.0 - p)) as f32;
    let p = p as f32;
    let mut mask = vec![0f32; b * per_example];
    // One stream per example, so the examples can be drawn on any threads in any order.
    mask.par_chunks_mut(per_example.max(1))
        .enumerate()
        .take(b)
        .for_each(|(i, chunk)| {
            let sk = StreamKey::dropout(key.seed, layer, key.step, key.first_example + i as u64);
            sk.fill_uniform(chunk);
            for m in chunk.iter_mut() {
                *m = if *m >= p { scale } else { 0.0 };
            }
        });
    Ok(Tensor::from_vec(mask, dims, device)?.to_dtype(dtype)?)
}
