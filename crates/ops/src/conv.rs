//! 2-D convolution (no groups, no dilation) with its backward, one GEMM per example and direction.
//!
//! For example `e` with `col = im2col(x_e)` (`[cin*kh*kw, ho*wo]`):
//! - forward: `y_e = W . col (+ bias)`, `W` viewed as `[cout, cin*kh*kw]`;
//! - weight gradient: `dW += dY_e . col^T`;
//! - input gradient: `dx_e = col2im(W^T . dY_e)`.
//!
//! Examples are spread over threads (each GEMM single-threaded, its column scratch reused and
//! hot in cache); with fewer examples than threads the GEMMs are threaded instead. A 1x1 conv
//! uses the input itself as its column matrix.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::WithDType;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use crate::elem::{fill_uninit, Elem, Uninit};
use crate::gemm::{gemm, Mat};
use crate::im2col::{col2im_add, im2col, Geom};
use crate::runtime::{fast_path_enabled, num_threads};
use crate::winograd::{self, F2, F4};

/// `conv2d(x [B, cin, H, W], weight [cout, cin, kh, kw]) + bias` with symmetric zero `padding`,
/// as `Tensor::conv2d(weight, padding, stride, 1, 1)` plus a broadcast bias, and differentiable
/// in all three arguments. `bias` is `[cout]`, or `[B, cout]` for a per-example bias (a ResBlock's
/// conv bias plus its timestep embedding, added without another pass over the output).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (batch, cout, _) = geometry(x.dims(), weight.dims(), stride, padding)?;
    if let Some(b) = bias {
        check_bias(b, batch, cout)?;
    }
    let on_cpu = x.device().is_cpu() && weight.device().is_cpu();
    if on_cpu && fast_path_enabled() && crate::precision::is_half(x.dtype()) {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let b = bias.map(f32).transpose()?;
        return conv2d(&f32(x)?, &f32(weight)?, b.as_ref(), stride, padding)?.to_dtype(x.dtype());
    }
    let dtypes_ok = matches!(x.dtype(), DType::F32 | DType::F64)
        && weight.dtype() == x.dtype()
        && bias.is_none_or(|b| b.dtype() == x.dtype());
    // Empty tensors take candle's path: the kernels split work by example and channel.
    let empty = x.elem_count() == 0 || weight.elem_count() == 0;
    if !(fast_path_enabled() && dtypes_ok && on_cpu) || empty {
        let y = x.conv2d(weight, padding, stride, 1, 1)?;
        return match bias {
            Some(b) if b.rank() == 2 => y.broadcast_add(&b.reshape((batch, cout, 1, 1))?),
            Some(b) => y.broadcast_add(&b.reshape((1, cout, 1, 1))?),
            None => Ok(y),
        };
    }
    let op = ConvOp { stride, padding };
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, op),
        None => x.apply_op2(&weight, op),
    }
}

/// The backward pass of [`conv2d`] alone: gradients for `(x, weight, bias)` given the output
/// gradient, each computed only when `need` says so. For benchmarks (timing the input and
/// weight gradients separately) and tests; training gets them through autograd. CPU f32/f64.
///
/// Shapes, stride, dtypes (all three alike, f32 or f64) and devices are checked; a mismatch is
/// an error, never a read outside a tensor.
pub fn conv2d_grads(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    geometry(x.dims(), weight.dims(), stride, padding)?;
    let dt = x.dtype();
    if !matches!(dt, DType::F32 | DType::F64) || weight.dtype() != dt || grad.dtype() != dt {
        bail!(
            "conv2d_grads: x, weight and grad must all be f32 or all f64, got {dt:?}, {:?}, {:?}",
            weight.dtype(),
            grad.dtype()
        );
    }
    ConvOp { stride, padding }.backward(x, weight, grad, need, false)
}

/// A conv bias is `[cout]` or, per example, `[batch, cout]`.
pub(crate) fn check_bias(bias: &Tensor, batch: usize, cout: usize) -> Result<()> {
    if bias.dims() != [cout] && bias.dims() != [batch, cout] {
        bail!(
            "conv2d: bias shape {:?}, expected [{cout}] or [{batch}, {cout}]",
            bias.dims()
        );
    }
    Ok(())
}

/// Checks a convolution's shapes and returns `(batch, cout, geometry)`: `x` `[B, cin, H, W]`,
/// `weight` `[cout, cin, kh, kw]` with the same `cin`, a positive stride and a non-empty kernel
/// that fits in the padded input.
pub(crate) fn geometry(
    x: &[usize],
    w: &[usize],
    stride: usize,
    padding: usize,
) -> Result<(usize, usize, Geom)> {
    let (&[b, cin, h, wd], &[cout, wcin, kh, kw]) = (x, w) else {
        bail!("conv2d: input {x:?} and weight {w:?} must both have 4 dimensions");
    };
    if wcin != cin {
        bail!("conv2d: input has {cin} channels, weight expects {wcin}");
    }
    if stride == 0 {
        bail!("conv2d: stride must be positive");
    }
    if kh == 0 || kw == 0 {
        bail!("conv2d: empty kernel {kh}x{kw}");
    }
    let padded = |n: usize| padding.checked_mul(2).and_then(|p| p.checked_add(n));
    let (Some(ph), Some(pw)) = (padded(h), padded(wd)) else {
        bail!("conv2d: padding {padding} overflows");
    };
    if ph < kh || pw < kw {
        bail!("conv2d: kernel {kh}x{kw} larger than padded input {h}x{wd} (padding {padding})");
    }
    let g = Geom {
        cin,
        h,
        w: wd,
        kh,
        kw,
        stride,
        pad: padding,
        ho: (ph - kh) / stride + 1,
        wo: (pw - kw) / stride + 1,
    };
    // `k` is at most the weight's element count; `n` grows with the padding.
    let n = g.ho.checked_mul(g.wo);
    let sizes = [
        n.and_then(|n| n.checked_mul(b)?.checked_mul(cout)),
        n.and_then(|n| n.checked_mul(g.k())),
    ];
    if sizes
        .iter()
        .any(|s| s.is_none_or(|n| n > isize::MAX as usize))
    {
        bail!("conv2d: output or column matrix of input {x:?}, weight {w:?} is too large");
    }
    Ok((b, cout, g))
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvOp {
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl ConvOp {
    pub(crate) fn geom(&self, x: &Shape, w: &Shape) -> Result<(usize, usize, Geom)> {
        geometry(x.dims(), w.dims(), self.stride, self.padding)
    }

    fn cpu_forward(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cout, g) = self.geom(lx.shape(), lw.shape())?;
        let shape = Shape::from((b, cout, g.ho, g.wo));
        macro_rules! run {
            ($t:ty) => {{
                let x = slice::<$t>(sx, lx)?;
                let w = slice::<$t>(sw, lw)?;
                let bias = match bias {
                    Some((s, l)) => {
                        let stride = if l.shape().rank() == 2 { cout } else { 0 };
                        Some((slice::<$t>(s, l)?, stride))
                    }
                    None => None,
                };
                <$t>::to_cpu_storage_owned(forward(&g, b, cout, x, w, bias))
            }};
        }
        let out = match sx.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("ddpm-ops conv2d: unsupported dtype {dt:?}"),
        };
        Ok((out, shape))
    }

    /// Gradients for `(x, weight, bias)`; each computed only when `need` says so. The bias
    /// gradient is `[B, cout]` when `per_example_bias`, else `[cout]`.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
        need: [bool; 3],
        per_example_bias: bool,
    ) -> Result<[Option<Tensor>; 3]> {
        let (b, cout, g) = self.geom(x.shape(), weight.shape())?;
        if grad.dims() != [b, cout, g.ho, g.wo] {
            bail!(
                "conv2d backward: gradient shape {:?}, expected {:?}",
                grad.dims(),
                [b, cout, g.ho, g.wo]
            );
        }
        let (x, weight, grad) = (x.contiguous()?, weight.contiguous()?, grad.contiguous()?);
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = weight.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (Storage::Cpu(sx), Storage::Cpu(sw), Storage::Cpu(sg)) = (&*sx, &*sw, &*sg) else {
            bail!("ddpm-ops conv2d backward: tensors are not on the CPU");
        };
        macro_rules! run {
            ($t:ty) => {{
                let r = backward::<$t>(
                    &g,
                    b,
                    cout,
                    slice(sx, lx)?,
                    slice(sw, lw)?,
                    slice(sg, lg)?,
                    need,
                    per_example_bias,
                );
                let wrap = |v: Option<Vec<$t>>, s: &Shape| {
                    v.map(|v| {
                        Tensor::from_storage(
                            Storage::Cpu(<$t>::to_cpu_storage_owned(v)),
                            s.clone(),
                            BackpropOp::none(),
                            false,
                        )
                    })
                };
                [
                    wrap(r.0, x.shape()),
                    wrap(r.1, weight.shape()),
                    wrap(
                        r.2,
                        &if per_example_bias {
                            Shape::from((b, cout))
                        } else {
                            Shape::from(cout)
                        },
                    ),
                ]
            }};
        }
        Ok(match sx.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("ddpm-ops conv2d backward: unsupported dtype {dt:?}"),
        })
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "ddpm-conv2d"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward(sx, lx, sw, lw, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = self.backward(
            x,
            weight,
            grad,
            [x.track_op(), weight.track_op(), false],
            false,
        )?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward(sx, lx, sw, lw, Some((sb, lb)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = [x.track_op(), weight.track_op(), bias.track_op()];
        let [dx, dw, db] = self.backward(x, weight, grad, need, bias.rank() == 2)?;
        Ok((dx, dw, db))
    }
}

/// The contiguous data of a tensor's storage.
pub(crate) fn slice<'a, T: Elem>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("ddpm-ops: expected a contiguous tensor, got layout {l:?}"),
    }
}

/// How to split `b` examples: over threads (each GEMM single-threaded) when there are enough,
/// else one example at a time with threaded GEMMs. Returns (chunks, threads per GEMM).
fn plan(b: usize) -> (usize, usize) {
    let t = num_threads();
    if t > 1 && b >= t {
        (t, 1)
    } else {
        (1, t)
    }
}

/// Output-pixel tiles `(p0, p1)` of one example for the weight gradient: as many columns as
/// keep a `[k, cols]` column tile within [`crate::tile_bytes`] (so im2col writes it into L2 and
/// the GEMM reads it from there), at least 64, all of them when tiling is off. Measured on the
/// U-Net's convs (bench/RESULTS.md): tiling helps dW (large `k`), not the forward or dX.
fn tiles<T>(g: &Geom) -> impl Iterator<Item = (usize, usize)> {
    let n = g.n();
    let budget = crate::runtime::tile_bytes() / std::mem::size_of::<T>();
    let nt = if budget == 0 {
        n
    } else {
        (budget / g.k()).clamp(64, n.max(64)).min(n)
    };
    (0..n.div_ceil(nt)).map(move |t| (t * nt, ((t + 1) * nt).min(n)))
}

/// Columns `p0..p1` of one example's im2col, over channels in parallel when `par`.
fn unfold<T: Elem>(g: &Geom, x: &[T], (p0, p1): (usize, usize), col: &mut [T], par: bool) {
    let (plane, rows) = (g.h * g.w, g.kh * g.kw * (p1 - p0));
    if par {
        col.par_chunks_mut(rows)
            .zip(x.par_chunks(plane))
            .for_each(|(c, xp)| im2col(g, xp, p0, p1, c));
    } else {
        im2col(g, x, p0, p1, col);
    }
}

/// `col2im` of columns `p0..p1` of one example onto initialised `dx`, over channels in parallel
/// when `par`.
fn fold<T: Elem>(g: &Geom, col: &[T], (p0, p1): (usize, usize), dx: &mut [T], par: bool) {
    let (plane, rows) = (g.h * g.w, g.kh * g.kw * (p1 - p0));
    if par {
        col.par_chunks(rows)
            .zip(dx.par_chunks_mut(plane))
            .for_each(|(c, d)| col2im_add(g, c, p0, p1, d));
    } else {
        col2im_add(g, col, p0, p1, dx);
    }
}

/// Columns `p0..` of a row-major matrix with row stride `ld`.
fn cols<T>(data: &[T], ld: usize, p0: usize) -> Mat<T> {
    Mat::rows(&data[p0..], ld)
}

/// `bias`: values and example stride (0: one `[cout]` bias for all; `cout`: `[B, cout]`).
pub(crate) fn forward<T: Elem>(
    g: &Geom,
    b: usize,
    cout: usize,
    x: &[T],
    w: &[T],
    bias: Option<(&[T], usize)>,
) -> Vec<T> {
    if winograd::applies(g) {
        let hw = (g.h, g.w);
        if winograd::use_f4(g, cout) {
            return winograd::forward::<F4, T>(b, g.cin, cout, hw, x, w, bias);
        }
        return winograd::forward::<F2, T>(b, g.cin, cout, hw, x, w, bias);
    }
    let (k, n, in_len, out_len) = (g.k(), g.n(), g.cin * g.h * g.w, cout * g.n());
    let mut out = Uninit::<T>::new(b * out_len);
    let wm = Mat::rows(w, k);
    let acc = bias.is_some();
    let one = |e: usize, y: &mut [MaybeUninit<T>], threads: usize| {
        if let Some((bias, stride)) = bias {
            for (row, &v) in y.chunks_exact_mut(n).zip(&bias[e * stride..]) {
                fill_uninit(row, v);
            }
        }
        let yp = y.as_mut_ptr() as *mut T;
        let xe = &x[e * in_len..(e + 1) * in_len];
        // SAFETY (GEMMs): shapes match the slices; y has cout * n slots, initialised when
        // accumulating; each tile writes its own columns.
        if g.is_pointwise() {
            unsafe { gemm(cout, n, k, yp, n, acc, wm, Mat::rows(xe, n), threads) };
        } else {
            T::with_scratch(k * n, |col| {
                unfold(g, xe, (0, n), col, threads > 1);
                unsafe { gemm(cout, n, k, yp, n, acc, wm, Mat::rows(col, n), threads) };
            });
        }
    };
    let (chunks, threads) = plan(b);
    if chunks > 1 {
        out.slots()
            .par_chunks_mut(out_len)
            .enumerate()
            .for_each(|(e, y)| one(e, y, 1));
    } else {
        for (e, y) in out.slots().chunks_mut(out_len).enumerate() {
            one(e, y, threads);
        }
    }
    // SAFETY: every example's output was written (bias fill + accumulate, or a plain GEMM).
    unsafe { out.assume_init() }
}

type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

#[allow(clippy::too_many_arguments)]
fn backward<T: Elem>(
    g: &Geom,
    b: usize,
    cout: usize,
    x: &[T],
    w: &[T],
    dy: &[T],
    [need_dx, need_dw, need_db]: [bool; 3],
    per_example_bias: bool,
) -> Grads<T> {
    if per_example_bias || winograd::applies(g) {
        let n = g.n();
        // Per example and channel, then (unless per example) over the batch in order.
        let db = need_db.then(|| {
            let per: Vec<T> = dy.par_chunks_exact(n).map(sum).collect();
            if per_example_bias {
                per
            } else {
                let mut db = vec![T::ZERO; cout];
                for pe in per.chunks_exact(cout) {
                    db.iter_mut().zip(pe).for_each(|(a, v)| *a += *v);
                }
                db
            }
        });
        if !winograd::applies(g) {
            let (dx, dw, _) = backward(g, b, cout, x, w, dy, [need_dx, need_dw, false], false);
            return (dx, dw, db);
        }
        let (hw, cin) = ((g.h, g.w), g.cin);
        let (dx, dw) = if winograd::use_f4(g, cout) {
            (
                need_dx.then(|| winograd::input_grad::<F4, T>(b, cin, cout, hw, w, dy)),
                need_dw.then(|| winograd::weight_grad::<F4, T>(b, cin, cout, hw, x, dy)),
            )
        } else {
            (
                need_dx.then(|| winograd::input_grad::<F2, T>(b, cin, cout, hw, w, dy)),
                need_dw.then(|| winograd::weight_grad::<F2, T>(b, cin, cout, hw, x, dy)),
            )
        };
        return (dx, dw, db);
    }
    let (k, n, in_len, out_len) = (g.k(), g.n(), g.cin * g.h * g.w, cout * g.n());
    let (chunks, threads) = plan(b);
    let mut dx = need_dx.then(|| Uninit::<T>::new(b * in_len));
    // Contiguous example ranges, one per chunk, and their slices of dx.
    let bounds: Vec<usize> = (0..=chunks).map(|i| i * b / chunks).collect();
    let mut dx_parts: Vec<&mut [MaybeUninit<T>]> = Vec::with_capacity(chunks);
    let mut rest: &mut [MaybeUninit<T>] = dx.as_mut().map_or(&mut [], |d| d.slots());
    for i in 0..chunks {
        let len = if need_dx {
            (bounds[i + 1] - bounds[i]) * in_len
        } else {
            0
        };
        let (head, tail) = rest.split_at_mut(len);
        dx_parts.push(head);
        rest = tail;
    }
    let wm = Mat::rows(w, k);
    let run_chunk = |i: usize, dxp: &mut [MaybeUninit<T>]| -> (Vec<T>, Vec<T>) {
        let mut dw = vec![T::ZERO; if need_dw { cout * k } else { 0 }];
        let mut db = vec![T::ZERO; if need_db { cout } else { 0 }];
        for (j, e) in (bounds[i]..bounds[i + 1]).enumerate() {
            let dye = &dy[e * out_len..(e + 1) * out_len];
            let xe = &x[e * in_len..(e + 1) * in_len];
            if need_db {
                for (acc, row) in db.iter_mut().zip(dye.chunks_exact(n)) {
                    *acc += sum(row);
                }
            }
            let dxe = if need_dx {
                Some(&mut dxp[j * in_len..(j + 1) * in_len])
            } else {
                None
            };
            let dym = Mat::rows(dye, n);
            let dwp = dw.as_mut_ptr();
            // SAFETY (all GEMMs below): operand shapes match their slices, outputs don't alias.
            if g.is_pointwise() {
                if need_dw {
                    let xt = Mat::rows(xe, n).t();
                    unsafe { gemm(cout, k, n, dwp, k, true, dym, xt, threads) };
                }
                if let Some(d) = dxe {
                    let dp = d.as_mut_ptr() as *mut T;
                    unsafe { gemm(k, n, cout, dp, n, false, wm.t(), dym, threads) };
                }
                continue;
            }
            let dxe = dxe.map(|d| {
                fill_uninit(d, T::ZERO);
                // SAFETY: just initialised.
                unsafe { &mut *(d as *mut [MaybeUninit<T>] as *mut [T]) }
            });
            // dW in column tiles that stay in L2; dX in one piece (its GEMM has k = cout, so
            // tiling only adds calls, and col2im prefers whole rows).
            let scratch = if need_dx {
                k * n
            } else {
                k * tiles::<T>(g).map(|t| t.1 - t.0).max().unwrap_or(0)
            };
            T::with_scratch(scratch, |col| {
                if need_dw {
                    for t in tiles::<T>(g) {
                        let nt = t.1 - t.0;
                        let col = &mut col[..k * nt];
                        unfold(g, xe, t, col, threads > 1);
                        let ct = Mat::rows(col, nt).t();
                        let dyt = cols(dye, n, t.0);
                        unsafe { gemm(cout, k, nt, dwp, k, true, dyt, ct, threads) };
                    }
                }
                if let Some(d) = dxe {
                    let cp = col.as_mut_ptr();
                    unsafe { gemm(k, n, cout, cp, n, false, wm.t(), dym, threads) };
                    fold(g, col, (0, n), d, threads > 1);
                }
            });
        }
        (dw, db)
    };
    let partials: Vec<(Vec<T>, Vec<T>)> = if chunks > 1 {
        dx_parts
            .into_par_iter()
            .enumerate()
            .map(|(i, d)| run_chunk(i, d))
            .collect()
    } else {
        dx_parts
            .into_iter()
            .enumerate()
            .map(|(i, d)| run_chunk(i, d))
            .collect()
    };
    // Fixed-order reduction of the per-chunk sums.
    let mut it = partials.into_iter();
    let (mut dw, mut db) = it.next().expect("at least one chunk");
    for (pw, pb) in it {
        dw.iter_mut().zip(&pw).for_each(|(a, v)| *a += *v);
        db.iter_mut().zip(&pb).for_each(|(a, v)| *a += *v);
    }
    // SAFETY: each example's dx was written by a plain GEMM (1x1) or zero-fill + fold.
    let dx = dx.map(|d| unsafe { d.assume_init() });
    (dx, need_dw.then_some(dw), need_db.then_some(db))
}

/// Sum with several accumulators (vectorisable, and less rounding than one running sum).
pub(crate) fn sum<T: Elem>(v: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += *x;
        }
    }
    let mut s = T::ZERO;
    for x in chunks.remainder() {
        s += *x;
    }
    acc.iter().fold(T::ZERO, |a, b| a + *b) + s
}
