//! `conv2d(x, weight, bias) + residual` as one op: a ResBlock's output convolution and its skip
//! connection.
//!
//! As two candle ops the sum is a full serial pass in the forward, and in the backward candle 0.11
//! gives both of the add's inputs a zero-filled gradient buffer plus another full add each
//! (`GradStore::or_insert` then `add`), all on the calling thread while the other cores wait. As
//! one op the residual is added in the op's own parallel pass, and the backward hands the
//! output gradient to the residual unchanged (one accumulation instead of two).
//!
//! candle's custom ops take at most three tensors, so the weight and the bias travel as one flat
//! tensor `[cout * cin * kh * kw + cout]` (their concatenation: a copy of the parameters, tiny
//! next to the activations), split again inside the op.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::conv::{forward, geometry, slice, ConvOp};
use crate::elem::Elem;
use crate::runtime::fast_path_enabled;

/// Values per parallel task of the residual add.
const ADD_CHUNK: usize = 1 << 14;

/// `conv2d(x, weight, Some(bias), stride, padding) + residual`, differentiable in all four;
/// `bias` is `[cout]`, `residual` has the output's shape `[B, cout, Ho, Wo]`.
pub fn conv2d_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (batch, cout, g) = geometry(x.dims(), weight.dims(), stride, padding)?;
    if bias.dims() != [cout] {
        bail!(
            "conv2d_residual: bias shape {:?}, expected [{cout}]",
            bias.dims()
        );
    }
    if residual.dims() != [batch, cout, g.ho, g.wo] {
        bail!(
            "conv2d_residual: residual shape {:?}, expected the output's {:?}",
            residual.dims(),
            [batch, cout, g.ho, g.wo]
        );
    }
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().is_cpu();
    let fast = fast_path_enabled()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu()
        && [weight, bias, residual].into_iter().all(same)
        && x.elem_count() > 0
        && weight.elem_count() > 0;
    if !fast {
        return crate::conv2d(x, weight, Some(bias), stride, padding)? + residual;
    }
    let wb = Tensor::cat(&[&weight.flatten_all()?, bias], 0)?;
    let op = ConvResidual {
        conv: ConvOp { stride, padding },
        wshape: weight.shape().clone(),
    };
    x.contiguous()?.apply_op3(&wb, &residual.contiguous()?, op)
}

struct ConvResidual {
    conv: ConvOp,
    /// `[cout, cin, kh, kw]`: the first `wshape.elem_count()` values of the flat parameter tensor.
    wshape: Shape,
}

/// `y += r`, split over threads.
fn add_into<T: Elem>(y: &mut [T], r: &[T]) {
    y.par_chunks_mut(ADD_CHUNK)
        .zip(r.par_chunks(ADD_CHUNK))
        .for_each(|(y, r)| y.iter_mut().zip(r).for_each(|(a, b)| *a += *b));
}

impl CustomOp3 for ConvResidual {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-residual"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        swb: &CpuStorage,
        lwb: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cout, g) = self.conv.geom(lx.shape(), &self.wshape)?;
        let nw = self.wshape.elem_count();
        if lwb.shape().elem_count() != nw + cout {
            bail!(
                "ddpm-ops conv2d_residual: {} parameters, expected {nw} weights + {cout} biases",
                lwb.shape().elem_count()
            );
        }
        let shape = Shape::from((b, cout, g.ho, g.wo));
        if lr.shape() != &shape {
            bail!(
                "ddpm-ops conv2d_residual: residual {:?}, expected {shape:?}",
                lr.shape()
            );
        }
        macro_rules! run {
            ($t:ty) => {{
                let (w, bias) = slice::<$t>(swb, lwb)?.split_at(nw);
                let mut y = forward(&g, b, cout, slice::<$t>(sx, lx)?, w, Some((bias, 0)));
                add_into(&mut y, slice::<$t>(sr, lr)?);
                <$t>::to_cpu_storage_owned(y)
            }};
        }
        let out = match sx.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("ddpm-ops conv2d_residual: unsupported dtype {dt:?}"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let nw = self.wshape.elem_count();
        let weight = wb.detach().narrow(0, 0, nw)?.reshape(&self.wshape)?;
        let need_wb = wb.track_op();
        let need = [x.track_op(), need_wb, need_wb];
        let [dx, dw, db] = self.conv.backward(x, &weight, grad, need, false)?;
        let dwb = match (dw, db) {
            (Some(dw), Some(db)) => Some(Tensor::cat(&[&dw.flatten_all()?, &db], 0)?),
            _ => None,
        };
        let dr = residual.track_op().then(|| grad.clone());
        Ok((dx, dwb, dr))
    }
}
