//! Softmax over the last dimension with backward: `dx = y * (dy - sum(dy * y))`.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::WithDType;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use crate::conv::slice;
use crate::elem::{lanes_max, lanes_sum, lanes_sum2, Elem};
use crate::runtime::fast_path_enabled;
use crate::simd::simd_variant;

/// Softmax over the last dimension, differentiable (candle 0.11's `softmax_last_dim` has no
/// backward; its composite `softmax` is several passes each way). Other devices and dtypes use
/// `candle_nn`'s composite formula.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax_scaled(x, 1.0)
}

/// `softmax(scale * x)` over the last dimension in one op (attention's `q.k / sqrt(d)` without
/// a separate scaling pass), differentiable. `scale` must be positive and finite.
pub fn softmax_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    if x.rank() == 0 {
        bail!("softmax: scalar input");
    }
    if !(scale > 0.0 && scale.is_finite()) {
        bail!("softmax: scale must be positive and finite, got {scale}");
    }
    if crate::precision::is_half(x.dtype()) {
        return softmax_scaled(&x.to_dtype(DType::F32)?, scale)?.to_dtype(x.dtype());
    }
    // Empty tensors take candle's path: the kernel works in rows of the last dimension.
    let fast = fast_path_enabled()
        && x.elem_count() > 0
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu();
    if !fast {
        let x = if scale == 1.0 {
            x.clone()
        } else {
            (x * scale)?
        };
        let max = x.max_keepdim(D::Minus1)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        return e.broadcast_div(&e.sum_keepdim(D::Minus1)?);
    }
    x.contiguous()?.apply_op1(SoftmaxOp { scale })
}

struct SoftmaxOp {
    scale: f64,
}

fn forward<T: Elem>(x: &[T], d: usize, scale: T) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| forward_row_simd(yr, xr, scale));
    y
}

fn backward<T: Elem>(y: &[T], dy: &[T], d: usize, scale: T) -> Vec<T> {
    let mut dx = vec![T::ZERO; y.len()];
    dx.par_chunks_mut(d)
        .zip(y.par_chunks(d).zip(dy.par_chunks(d)))
        .for_each(|(o, (yr, gr))| backward_row_simd(o, yr, gr, scale));
    dx
}

simd_variant!(fn forward_row_simd<T>(yr: &mut [T], xr: &[T], scale: T) -> () = forward_row);
simd_variant!(fn backward_row_simd<T>(o: &mut [T], yr: &[T], gr: &[T], scale: T) -> () = backward_row);

#[inline(always)]
fn forward_row<T: Elem>(yr: &mut [T], xr: &[T], scale: T) {
    // max(scale * x) = scale * max(x) for scale > 0.
    let m = lanes_max(xr) * scale;
    for (o, &v) in yr.iter_mut().zip(xr) {
        *o = (v * scale - m).exp();
    }
    let inv = T::ONE / T::from_f64(lanes_sum(yr, |v| v));
    yr.iter_mut().for_each(|o| *o *= inv);
}

#[inline(always)]
fn backward_row<T: Elem>(o: &mut [T], yr: &[T], gr: &[T], scale: T) {
    let s = T::from_f64(lanes_sum2(yr, gr, |a, b| a * b));
    for ((a, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
        *a = scale * yv * (gv - s);
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "ddpm-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims()[l.dims().len() - 1];
        let out = match s.dtype() {
            DType::F32 => {
                let y = forward(slice::<f32>(s, l)?, d.max(1), self.scale as f32);
                f32::to_cpu_storage_owned(y)
            }
            DType::F64 => {
                f64::to_cpu_storage_owned(forward(slice::<f64>(s, l)?, d.max(1), self.scale))
            }
            dt => bail!("ddpm-ops softmax: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = res.dim(D::Minus1)?.max(1);
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        let (sy, ly) = res.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (Storage::Cpu(sy), Storage::Cpu(sg)) = (&*sy, &*sg) else {
            bail!("ddpm-ops softmax backward: tensors are not on the CPU");
        };
        let dx = match sy.dtype() {
            DType::F32 => {
                let dx = backward(slice(sy, ly)?, slice(sg, lg)?, d, self.scale as f32);
                f32::to_cpu_storage_owned(dx)
            }
            DType::F64 => {
                let dx = backward(slice(sy, ly)?, slice(sg, lg)?, d, self.scale);
                f64::to_cpu_storage_owned(dx)
            }
            dt => bail!("ddpm-ops softmax backward: unsupported dtype {dt:?}"),
        };
        Ok(Some(Tensor::from_storage(
            Storage::Cpu(dx),
            res.shape().clone(),
            BackpropOp::none(),
            false,
        )))
    }
}
