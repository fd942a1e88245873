//! Argument checks and the CPU work split shared by the ops.

use crate::KernelError;
use candle_core::{CpuStorage, DType, Layout, Tensor};
use rayon::prelude::*;

/// Elements per CPU work item (a multiple of 4 so that a chunk starts on a Philox block). Examples are
/// split into chunks so that a small batch of large images still spreads over all threads; which thread
/// runs a chunk never changes its values.
pub(crate) const CHUNK: usize = 16 * 1024;

/// `(batch, elements per example)` of an f32 tensor `[B, ...]`, within the kernels' u32 index space.
pub(crate) fn batch_dims(
    op: &'static str,
    what: &str,
    t: &Tensor,
) -> Result<(usize, usize), KernelError> {
    if t.dtype() != DType::F32 {
        return Err(KernelError::bad(
            op,
            format!("{what} must be f32, got {:?}", t.dtype()),
        ));
    }
    let dims = t.dims();
    if dims.is_empty() {
        return Err(KernelError::bad(
            op,
            format!("{what} must have a batch dimension, got a scalar"),
        ));
    }
    let b = dims[0];
    let n: usize = dims[1..].iter().product();
    if n >= 1 << 31 || b > u32::MAX as usize {
        return Err(KernelError::bad(
            op,
            format!("{what} {dims:?} is too large (per-example elements must be < 2^31)"),
        ));
    }
    Ok((b, n))
}

/// The contiguous f32 data of a CPU storage (the ops make their inputs contiguous before applying).
pub(crate) fn cpu_f32<'a>(
    op: &'static str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Splits `out` (P planes of `b * n`) into per-example chunks of at most [`CHUNK`] elements and runs
/// `f(example, first_element, planes)` on each in parallel on the current rayon pool.
pub(crate) fn for_each_chunk<const P: usize, F>(out: &mut [f32], b: usize, n: usize, f: F)
where
    F: Fn(usize, usize, [&mut [f32]; P]) + Sync + Send,
{
    let plane = b * n;
    if plane == 0 {
        return;
    }
    debug_assert_eq!(out.len(), P * plane);
    let mut iters: Vec<_> = out
        .chunks_mut(plane)
        .map(|p| p.chunks_mut(n).flat_map(|ex| ex.chunks_mut(CHUNK)))
        .collect();
    let per_example = n.div_ceil(CHUNK);
    let mut items = Vec::with_capacity(b * per_example);
    for i in 0..b {
        for c in 0..per_example {
            let planes: [&mut [f32]; P] =
                std::array::from_fn(|k| iters[k].next().expect("chunk count matches"));
            items.push((i, c * CHUNK, planes));
        }
    }
    items
        .into_par_iter()
        .for_each(|(i, e0, planes)| f(i, e0, planes));
}
