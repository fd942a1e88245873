//! Nearest-neighbour 2x upsampling of `[B, C, H, W]` (the U-Net decoder's `Upsample`).
//!
//! As a candle composite (reshape, broadcast, reshape) the forward is a strided copy and the
//! backward a `sum_keepdim` over two strided axes plus the accumulation, all on one thread in
//! candle 0.11: about 3% of the quickstart training step, serial while the other cores waited
//! (bench/RESULTS.md). Here both directions are one parallel pass over the planes: the forward
//! writes each input pixel to its 2x2 block, the backward sums each 2x2 block of the gradient.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::conv::slice;
use crate::elem::{Elem, Uninit};
use crate::runtime::fast_path_enabled;

/// Planes per parallel task: a 7x7 plane is 49 values, too little work for a task of its own.
const MIN_PLANES: usize = 16;

/// `x [B, C, H, W]` -> `[B, C, 2H, 2W]` with `y[.., 2i + a, 2j + b] = x[.., i, j]`, the same values
/// as candle's `upsample_nearest2d(2H, 2W)`; differentiable (the gradient is the 2x2 block sum).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let fast = fast_path_enabled()
        && x.elem_count() > 0
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu();
    if !fast {
        // candle's own upsample_nearest2d has a wrong backward when its input is reused; this
        // composite's gradient is a plain sum.
        return x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, 2 * h, 2 * w));
    }
    x.contiguous()?.apply_op1(Upsample2x)
}

struct Upsample2x;

/// The gradient of [`Upsample2x`]: `[B, C, 2H, 2W]` -> `[B, C, H, W]`, each 2x2 block summed.
struct BlockSum2x;

fn upsample<T: Elem>(x: &[T], h: usize, w: usize) -> Vec<T> {
    let mut out = Uninit::<T>::new(4 * x.len());
    out.slots()
        .par_chunks_mut(4 * h * w)
        .with_min_len(MIN_PLANES)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for (rows, row) in dst.chunks_exact_mut(4 * w).zip(src.chunks_exact(w)) {
                let (top, bottom) = rows.split_at_mut(2 * w);
                let pairs = top.chunks_exact_mut(2).zip(bottom.chunks_exact_mut(2));
                for ((t, b), &v) in pairs.zip(row) {
                    t[0].write(v);
                    t[1].write(v);
                    b[0].write(v);
                    b[1].write(v);
                }
            }
        });
    // SAFETY: every output row pair was written from its input row.
    unsafe { out.assume_init() }
}

fn block_sum<T: Elem>(g: &[T], h: usize, w: usize) -> Vec<T> {
    let mut out = Uninit::<T>::new(g.len() / 4);
    out.slots()
        .par_chunks_mut(h * w)
        .with_min_len(MIN_PLANES)
        .zip(g.par_chunks(4 * h * w))
        .for_each(|(dst, src)| {
            for (row, rows) in dst.chunks_exact_mut(w).zip(src.chunks_exact(4 * w)) {
                let (top, bottom) = rows.split_at(2 * w);
                for ((d, t), b) in row
                    .iter_mut()
                    .zip(top.chunks_exact(2))
                    .zip(bottom.chunks_exact(2))
                {
                    d.write((t[0] + t[1]) + (b[0] + b[1]));
                }
            }
        });
    // SAFETY: every output pixel was written from its 2x2 block.
    unsafe { out.assume_init() }
}

/// `(B, C, H, W)` of a contiguous 4-D layout, or an error naming the op.
fn dims4(l: &Layout, op: &str) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        &[b, c, h, w] => Ok((b, c, h, w)),
        d => bail!("ddpm-ops {op}: expected [B, C, H, W], got {d:?}"),
    }
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "ddpm-upsample-nearest2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims4(l, "upsample_nearest2x")?;
        let out = match s.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(upsample::<f32>(slice(s, l)?, h, w)),
            DType::F64 => f64::to_cpu_storage_owned(upsample::<f64>(slice(s, l)?, h, w)),
            dt => bail!("ddpm-ops upsample_nearest2x: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(BlockSum2x)?))
    }
}

impl CustomOp1 for BlockSum2x {
    fn name(&self) -> &'static str {
        "ddpm-upsample-nearest2x-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h2, w2) = dims4(l, "upsample_nearest2x backward")?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            bail!("ddpm-ops upsample_nearest2x backward: gradient {h2}x{w2} is not 2x an input");
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let out = match s.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(block_sum::<f32>(slice(s, l)?, h, w)),
            DType::F64 => f64::to_cpu_storage_owned(block_sum::<f64>(slice(s, l)?, h, w)),
            dt => bail!("ddpm-ops upsample_nearest2x backward: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from((b, c, h, w))))
    }
}
