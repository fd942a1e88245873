//! Channel concatenation of two `[B, C, ...]` tensors (the U-Net decoder's skip connections).
//!
//! candle's `Tensor::cat` copies on one thread; here the examples are copied in parallel. The
//! backward hands out `narrow` views of the gradient (no copy); candle's accumulation reads them.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::conv::slice;
use crate::elem::{Elem, Uninit};
use crate::runtime::fast_path_enabled;

/// `cat([a, b], 1)` for `a [B, Ca, ...]`, `b [B, Cb, ...]` with equal other dimensions.
pub fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    if da.len() < 2 || da.len() != db.len() || da[0] != db[0] || da[2..] != db[2..] {
        bail!("cat_channels: shapes {da:?} and {db:?} differ outside dimension 1");
    }
    // Empty tensors take candle's path: the kernel splits the output by example.
    let fast = fast_path_enabled()
        && a.elem_count() > 0
        && b.elem_count() > 0
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.dtype() == b.dtype()
        && a.device().is_cpu()
        && b.device().is_cpu();
    if !fast {
        return Tensor::cat(&[a, b], 1);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, CatChannels)
}

struct CatChannels;

fn forward<T: Elem>(a: &[T], b: &[T], batch: usize) -> Vec<T> {
    let (na, nb) = (a.len() / batch, b.len() / batch);
    let mut out = Uninit::<T>::new(a.len() + b.len());
    out.slots()
        .par_chunks_mut(na + nb)
        .enumerate()
        .for_each(|(e, dst)| {
            let (da, db) = dst.split_at_mut(na);
            for (d, s) in da.iter_mut().zip(&a[e * na..(e + 1) * na]) {
                d.write(*s);
            }
            for (d, s) in db.iter_mut().zip(&b[e * nb..(e + 1) * nb]) {
                d.write(*s);
            }
        });
    // SAFETY: each example's block is both inputs' values, all written.
    unsafe { out.assume_init() }
}

impl CustomOp2 for CatChannels {
    fn name(&self) -> &'static str {
        "ddpm-cat-channels"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mut dims = la.dims().to_vec();
        let batch = dims[0];
        dims[1] += lb.dims()[1];
        let out = match sa.dtype() {
            DType::F32 => {
                f32::to_cpu_storage_owned(forward::<f32>(slice(sa, la)?, slice(sb, lb)?, batch))
            }
            DType::F64 => {
                f64::to_cpu_storage_owned(forward::<f64>(slice(sa, la)?, slice(sb, lb)?, batch))
            }
            dt => bail!("ddpm-ops cat_channels: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ca = a.dim(1)?;
        Ok((
            Some(grad.narrow(1, 0, ca)?),
            Some(grad.narrow(1, ca, b.dim(1)?)?),
        ))
    }
}
