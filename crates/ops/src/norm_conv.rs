//! `conv2d(silu(group_norm(x)) * mask) + bias [+ residual]` as one op: the second half of a
//! ResBlock (GroupNorm, scale-shift, SiLU, dropout, the output conv and the skip connection).
//!
//! As separate ops, the normalised activation between them is a node of candle's graph, and candle
//! 0.11's backward gives every node a zero-filled gradient buffer and then adds the incoming
//! gradient into it (`GradStore::or_insert`, then `add`): two full passes over the activation on
//! the calling thread alone, while the other cores wait. Fused, the conv's input gradient goes
//! straight into the GroupNorm backward and the residual is added in the op's own parallel pass
//! (its gradient is the output's, handed on unchanged). The work is the same kernels as [`crate::group_norm`]
//! and [`crate::conv2d`] (bitwise the same values); the normalised activation is kept by the op
//! for the weight gradient, as the graph kept it before.
//!
//! candle's custom ops take at most three tensors, so GroupNorm's affine (`[C]` or per example
//! `[B, C]`), the conv weight and its bias (`[cout]` or `[B, cout]`) travel as one flat tensor,
//! their concatenation (a copy of the parameters, tiny next to the activations).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};

use rayon::prelude::*;

use crate::conv::{check_bias, forward, geometry, slice, ConvOp};
use crate::elem::Elem;
use crate::norm::{check_args, GroupNormOp};
use crate::runtime::fast_path_enabled;

/// Values per parallel task of the residual add.
const ADD_CHUNK: usize = 1 << 14;

/// The GroupNorm (+ SiLU, + mask) half of [`norm_conv2d`], as [`crate::group_norm_masked`]
/// takes it.
#[derive(Debug, Clone, Copy)]
pub struct NormArgs<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
    /// A dropout mask shaped as `x` (not differentiated), or none.
    pub mask: Option<&'a Tensor>,
}

/// The convolution half of [`norm_conv2d`], as [`crate::conv2d`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct ConvArgs<'a> {
    pub weight: &'a Tensor,
    /// `[cout]`, or `[B, cout]` for a per-example bias.
    pub bias: &'a Tensor,
    pub stride: usize,
    pub padding: usize,
}

/// `conv2d(group_norm_masked(x, norm..), conv..) + residual`, differentiable in `x`, the affine,
/// the weight, the bias and the residual (shaped as the output). The same values as the two ops
/// in sequence; one graph node instead of two.
pub fn norm_conv2d(
    x: &Tensor,
    norm: NormArgs,
    conv: ConvArgs,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    check_args(x, norm.gamma, norm.beta, norm.groups, norm.mask)?;
    let (batch, cout, g) = geometry(x.dims(), conv.weight.dims(), conv.stride, conv.padding)?;
    check_bias(conv.bias, batch, cout)?;
    if let Some(r) = residual {
        if r.dims() != [batch, cout, g.ho, g.wo] {
            bail!(
                "norm_conv2d: residual shape {:?}, expected the output's {:?}",
                r.dims(),
                [batch, cout, g.ho, g.wo]
            );
        }
    }
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().is_cpu();
    let fast = fast_path_enabled()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu()
        && [norm.gamma, norm.beta, conv.weight, conv.bias]
            .into_iter()
            .chain(norm.mask)
            .chain(residual)
            .all(same)
        && x.elem_count() > 0
        && conv.weight.elem_count() > 0;
    if !fast {
        return composite(x, norm, conv, residual);
    }
    let params = Tensor::cat(
        &[
            &norm.gamma.flatten_all()?,
            &norm.beta.flatten_all()?,
            &conv.weight.flatten_all()?,
            &conv.bias.flatten_all()?,
        ],
        0,
    )?;
    let op = NormConv {
        norm: GroupNormOp::new(norm.groups, norm.eps, norm.silu, norm.mask)?,
        conv: ConvOp {
            stride: conv.stride,
            padding: conv.padding,
        },
        affine: norm.gamma.shape().clone(),
        weight: conv.weight.shape().clone(),
        bias: conv.bias.shape().clone(),
        pre: OnceLock::new(),
    };
    let x = x.contiguous()?;
    match residual {
        Some(r) => x.apply_op3(&params, &r.contiguous()?, op),
        None => x.apply_op2(&params, op),
    }
}

/// The two ops in sequence (other devices and dtypes, `DDPM_OPS=candle`).
fn composite(x: &Tensor, n: NormArgs, c: ConvArgs, residual: Option<&Tensor>) -> Result<Tensor> {
    let h = crate::group_norm_masked(x, n.gamma, n.beta, n.groups, n.eps, n.silu, n.mask)?;
    let y = crate::conv2d(&h, c.weight, Some(c.bias), c.stride, c.padding)?;
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// `y += r`, split over threads.
fn add_into<T: Elem>(y: &mut [T], r: &[T]) {
    y.par_chunks_mut(ADD_CHUNK)
        .zip(r.par_chunks(ADD_CHUNK))
        .for_each(|(y, r)| y.iter_mut().zip(r).for_each(|(a, b)| *a += *b));
}

struct NormConv {
    norm: GroupNormOp,
    conv: ConvOp,
    /// Shapes of the three parts of the flat parameter tensor, in order.
    affine: Shape,
    weight: Shape,
    bias: Shape,
    /// The conv's input from the forward pass (needed for the weight gradient).
    pre: OnceLock<Tensor>,
}

/// The flat parameters split into `(gamma, beta, weight, bias)`.
type Parts<'a, T> = (&'a [T], &'a [T], &'a [T], &'a [T]);

impl NormConv {
    fn lens(&self) -> [usize; 4] {
        let a = self.affine.elem_count();
        [a, a, self.weight.elem_count(), self.bias.elem_count()]
    }

    fn split<'a, T>(&self, p: &'a [T]) -> Result<Parts<'a, T>> {
        let [a, _, w, b] = self.lens();
        if p.len() != 2 * a + w + b {
            bail!(
                "ddpm-ops norm_conv2d: {} parameters, expected 2 x {a} affine + {w} weights + {b} biases",
                p.len()
            );
        }
        let (gamma, rest) = p.split_at(a);
        let (beta, rest) = rest.split_at(a);
        let (weight, bias) = rest.split_at(w);
        Ok((gamma, beta, weight, bias))
    }

    fn cpu_forward(
        &self,
        (sx, lx): (&CpuStorage, &Layout),
        (sp, lp): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cout, g) = self.conv.geom(lx.shape(), &self.weight)?;
        let shape = Shape::from((b, cout, g.ho, g.wo));
        let d = self.norm.dims(lx.shape(), &self.affine);
        let bias_stride = if self.bias.rank() == 2 { cout } else { 0 };
        macro_rules! run {
            ($t:ty) => {{
                let (gamma, beta, w, bias) = self.split(slice::<$t>(sp, lp)?)?;
                let pre = self.norm.run::<$t>(d, slice(sx, lx)?, gamma, beta)?;
                let mut y = forward(&g, b, cout, &pre, w, Some((bias, bias_stride)));
                if let Some((sr, lr)) = residual {
                    add_into(&mut y, slice::<$t>(sr, lr)?);
                }
                let pre = Storage::Cpu(<$t>::to_cpu_storage_owned(pre));
                let pre = Tensor::from_storage(pre, lx.shape().clone(), BackpropOp::none(), false);
                let _ = self.pre.set(pre);
                <$t>::to_cpu_storage_owned(y)
            }};
        }
        let out = match sx.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("ddpm-ops norm_conv2d: unsupported dtype {dt:?}"),
        };
        Ok((out, shape))
    }

    /// Gradients for `x` and the flat parameters (each only when tracked).
    fn grads(
        &self,
        x: &Tensor,
        params: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_p) = (x.track_op(), params.track_op());
        if !(need_x || need_p) {
            return Ok((None, None));
        }
        let [a, _, nw, _] = self.lens();
        let p = params.detach();
        let part = |at: usize, len: usize, s: &Shape| p.narrow(0, at, len)?.reshape(s);
        let (gamma, beta) = (part(0, a, &self.affine)?, part(a, a, &self.affine)?);
        let weight = part(2 * a, nw, &self.weight)?;
        let Some(pre) = self.pre.get() else {
            bail!("ddpm-ops norm_conv2d backward: the forward pass kept no input for the conv");
        };
        let need = [true, need_p, need_p];
        let [dpre, dw, db] = self
            .conv
            .backward(pre, &weight, grad, need, self.bias.rank() == 2)?;
        let Some(dpre) = dpre else {
            bail!("ddpm-ops norm_conv2d backward: no input gradient from the conv");
        };
        let (dx, dg, dbeta) = CustomOp3::bwd(&self.norm, &x.detach(), &gamma, &beta, pre, &dpre)?;
        let dparams = match (need_p, dg, dbeta, dw, db) {
            (true, Some(dg), Some(dbeta), Some(dw), Some(db)) => Some(Tensor::cat(
                &[
                    &dg.flatten_all()?,
                    &dbeta.flatten_all()?,
                    &dw.flatten_all()?,
                    &db.flatten_all()?,
                ],
                0,
            )?),
            _ => None,
        };
        Ok((dx.filter(|_| need_x), dparams))
    }
}

impl CustomOp2 for NormConv {
    fn name(&self) -> &'static str {
        "ddpm-norm-conv2d"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((sx, lx), (sp, lp), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, params, grad)
    }
}

impl CustomOp3 for NormConv {
    fn name(&self) -> &'static str {
        "ddpm-norm-conv2d-residual"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((sx, lx), (sp, lp), Some((sr, lr)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = self.grads(x, params, grad)?;
        Ok((dx, dp, residual.track_op().then(|| grad.clone())))
    }
}
