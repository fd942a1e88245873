//! GroupNorm with an optional fused SiLU, and its backward.
//!
//! Forward per (example, group) of `n` values: `x_hat = (x - mean) * rstd`,
//! `z = x_hat * gamma_c + beta_c`, `y = silu(z)` or `z`; mean and variance are accumulated in f64.
//! Backward, with `dz = dy * silu'(z)` (or `dy`):
//! `d_beta_c = sum dz`, `d_gamma_c = sum dz * x_hat`,
//! `dx = rstd * (gamma_c * dz - mean_g(gamma * dz) - x_hat * mean_g(gamma * dz * x_hat))`.
//! The statistics are kept from the forward pass; the backward reads `x` and `dy` twice.
//!
//! The affine parameters may also be per example (`[B, C]`): a ResBlock with scale-shift
//! conditioning computes `(norm(x) * gamma + beta) * (1 + scale) + shift` with `scale`, `shift`
//! `[B, C]` from the timestep embedding, which is the same GroupNorm with per-example
//! `gamma (1 + scale)` and `beta (1 + scale) + shift` (tiny `[B, C]` tensors), so the whole
//! `silu(...)` is one pass over the activations instead of five (and as many zero-filled gradient
//! buffers in the backward); the parameter gradients are then per example, not summed.
//!
//! [`group_norm_masked`] multiplies the output by a fixed mask (the ResBlock's dropout, which
//! follows GroupNorm+SiLU) inside the same pass, and `dy` by it in the backward. As a separate
//! `h * mask` node, dropout cost candle a forward pass, two backward multiplications (one of
//! them the unused gradient of the mask) and two zero-filled gradient accumulators.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::WithDType;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use crate::conv::slice;
use crate::elem::{lanes_sum, lanes_sum2, Elem, Uninit};
use crate::runtime::fast_path_enabled;
use crate::simd::simd_variant;

/// GroupNorm over `x [B, C, ...]` with per-channel affine `gamma`, `beta` (`[C]`, or `[B, C]`
/// for a different affine per example), `groups` groups and variance epsilon `eps` (PyTorch's
/// definition: biased variance), followed by SiLU when `silu`. Differentiable in all three
/// tensors.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    group_norm_masked(x, gamma, beta, groups, eps, silu, None)
}

/// [`group_norm`] followed by `* mask` (same shape as `x`, not differentiated: a dropout mask
/// of zeros and `1 / (1 - p)`), fused into the op.
pub fn group_norm_masked(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check_args(x, gamma, beta, groups, mask)?;
    if crate::precision::is_half(x.dtype()) {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let m = mask.map(f32).transpose()?;
        let y = group_norm_masked(
            &f32(x)?,
            &f32(gamma)?,
            &f32(beta)?,
            groups,
            eps,
            silu,
            m.as_ref(),
        )?;
        return y.to_dtype(x.dtype());
    }
    // Empty tensors take candle's path: the kernel works in whole groups.
    let fast = fast_path_enabled()
        && x.elem_count() > 0
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && gamma.dtype() == x.dtype()
        && beta.dtype() == x.dtype()
        && mask.is_none_or(|m| m.dtype() == x.dtype() && m.device().is_cpu())
        && x.device().is_cpu()
        && gamma.device().is_cpu()
        && beta.device().is_cpu();
    if !fast {
        let y = composite(x, gamma, beta, groups, eps, silu)?;
        return match mask {
            Some(m) => y * m.detach(),
            None => Ok(y),
        };
    }
    let op = GroupNormOp::new(groups, eps, silu, mask)?;
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
}

/// The shape checks of [`group_norm_masked`]: `x [B, C, ...]` with `C` a multiple of `groups`,
/// `gamma`, `beta` both `[C]` or both `[B, C]`, `mask` shaped as `x`.
pub(crate) fn check_args(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    mask: Option<&Tensor>,
) -> Result<()> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("group_norm: input must be [B, C, ...], got {dims:?}");
    }
    let c = dims[1];
    if groups == 0 || !c.is_multiple_of(groups) {
        bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    let per_example = gamma.dims() == [dims[0], c];
    if !(gamma.dims() == [c] || per_example) || beta.dims() != gamma.dims() {
        bail!(
            "group_norm: gamma {:?} / beta {:?} must both be [{c}] or [{}, {c}]",
            gamma.dims(),
            beta.dims(),
            dims[0]
        );
    }
    if let Some(m) = mask {
        if m.dims() != dims {
            bail!(
                "group_norm: mask shape {:?} differs from input {dims:?}",
                m.dims()
            );
        }
    }
    Ok(())
}

/// The same function from candle's differentiable ops (other devices and dtypes).
fn composite(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let mut affine = vec![1usize; dims.len()];
    affine[1] = c;
    if gamma.rank() == 2 {
        affine[0] = b;
    }
    let xg = x.reshape((b, groups, ()))?;
    let mean = xg.mean_keepdim(D::Minus1)?;
    let centred = xg.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims)?
        .broadcast_mul(&gamma.reshape(affine.clone())?)?
        .broadcast_add(&beta.reshape(affine)?)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

pub(crate) struct GroupNormOp {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) silu: bool,
    /// Multiplies the output (and `dy` in the backward); contiguous, shaped as `x`.
    pub(crate) mask: Option<Tensor>,
    /// `(mean, rstd)` per (example, group), from the forward pass.
    stats: OnceLock<Vec<(f64, f64)>>,
}

/// Sizes: examples, channels, channels per group, values per channel; whether gamma and beta
/// are per example (`[B, C]`).
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    b: usize,
    c: usize,
    cg: usize,
    s: usize,
    per_example: bool,
}

impl Dims {
    /// Index in gamma / beta of the first channel of (example, group) `i`.
    #[inline(always)]
    fn affine0(&self, i: usize, groups: usize) -> usize {
        let c0 = (i % groups) * self.cg;
        if self.per_example {
            (i / groups) * self.c + c0
        } else {
            c0
        }
    }
}

impl GroupNormOp {
    pub(crate) fn new(groups: usize, eps: f64, silu: bool, mask: Option<&Tensor>) -> Result<Self> {
        Ok(Self {
            groups,
            eps,
            silu,
            mask: mask.map(|m| m.detach().contiguous()).transpose()?,
            stats: OnceLock::new(),
        })
    }

    /// The forward over contiguous values, keeping the statistics for the backward.
    pub(crate) fn run<T: Elem>(&self, d: Dims, x: &[T], gamma: &[T], beta: &[T]) -> Result<Vec<T>> {
        let (y, st) = self.with_mask::<T, _>(|m| Ok(forward::<T>(self, d, x, gamma, beta, m)))?;
        let _ = self.stats.set(st);
        Ok(y)
    }

    /// Runs `f` on the mask's values (`None` without a mask).
    fn with_mask<T: Elem, R>(&self, f: impl FnOnce(Option<&[T]>) -> Result<R>) -> Result<R> {
        let Some(m) = &self.mask else { return f(None) };
        let (s, l) = m.storage_and_layout();
        let Storage::Cpu(s) = &*s else {
            bail!("ddpm-ops group_norm: the mask is not on the CPU")
        };
        f(Some(slice::<T>(s, l)?))
    }

    pub(crate) fn dims(&self, shape: &Shape, gamma: &Shape) -> Dims {
        let d = shape.dims();
        Dims {
            b: d[0],
            c: d[1],
            cg: d[1] / self.groups,
            s: d[2..].iter().product(),
            per_example: gamma.rank() == 2,
        }
    }
}

#[inline(always)]
fn sigmoid<T: Elem>(z: T) -> T {
    T::ONE / (T::ONE + (-z).exp())
}

/// `z * sigmoid(z)` with one division and no dependent multiply (the forward's SiLU waits on
/// its division).
#[inline(always)]
fn silu<T: Elem>(z: T) -> T {
    z / (T::ONE + (-z).exp())
}

/// `(mean, 1 / sqrt(var + eps))` of one group, two-pass.
#[inline(always)]
fn stats<T: Elem>(xs: &[T], eps: f64) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = lanes_sum(xs, |v| v) / n;
    let m = T::from_f64(mean);
    let var = lanes_sum(xs, |v| (v - m) * (v - m)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The group of `mask` (if any) that goes with group `i` of `len` values.
#[inline(always)]
fn mask_group<T>(mask: Option<&[T]>, i: usize, len: usize) -> Option<&[T]> {
    mask.map(|m| &m[i * len..(i + 1) * len])
}

fn forward<T: Elem>(
    op: &GroupNormOp,
    d: Dims,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    mask: Option<&[T]>,
) -> (Vec<T>, Vec<(f64, f64)>) {
    let len = d.cg * d.s;
    let mut y = Uninit::<T>::new(x.len());
    let stats: Vec<(f64, f64)> = y
        .slots()
        .par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .enumerate()
        .map(|(i, (yg, xg))| {
            let mg = mask_group(mask, i, len);
            forward_group_simd(op, d, i, yg, xg, gamma, beta, mg)
        })
        .collect();
    // SAFETY: every group's values were written.
    (unsafe { y.assume_init() }, stats)
}

simd_variant!(fn forward_group_simd<T>(
    op: &GroupNormOp,
    d: Dims,
    i: usize,
    yg: &mut [MaybeUninit<T>],
    xg: &[T],
    gamma: &[T],
    beta: &[T],
    mg: Option<&[T]>,
) -> (f64, f64) = forward_group);

simd_variant!(fn backward_group_simd<T>(
    op: &GroupNormOp,
    d: Dims,
    i: usize,
    dxg: &mut [MaybeUninit<T>],
    xg: &[T],
    dyg: &[T],
    gamma: &[T],
    beta: &[T],
    stats: &[(f64, f64)],
    mg: Option<&[T]>,
) -> Vec<(f64, f64)> = backward_group);

/// One (example, group) of [`forward`]: writes `yg`, returns `(mean, rstd)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_group<T: Elem>(
    op: &GroupNormOp,
    d: Dims,
    i: usize,
    yg: &mut [MaybeUninit<T>],
    xg: &[T],
    gamma: &[T],
    beta: &[T],
    mg: Option<&[T]>,
) -> (f64, f64) {
    let (mean, rstd) = stats(xg, op.eps);
    let c0 = d.affine0(i, op.groups);
    for (j, (yc, xc)) in yg
        .chunks_exact_mut(d.s)
        .zip(xg.chunks_exact(d.s))
        .enumerate()
    {
        let a = gamma[c0 + j].to_f64() * rstd;
        let (a, sh) = (
            T::from_f64(a),
            T::from_f64(beta[c0 + j].to_f64() - mean * a),
        );
        match (op.silu, mg) {
            (true, None) => {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    let z = v * a + sh;
                    o.write(silu(z));
                }
            }
            (false, None) => {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    o.write(v * a + sh);
                }
            }
            (silu, Some(mg)) => {
                let mc = &mg[j * d.s..(j + 1) * d.s];
                for ((o, &v), &m) in yc.iter_mut().zip(xc).zip(mc) {
                    let z = v * a + sh;
                    o.write(if silu { self::silu(z) } else { z } * m);
                }
            }
        }
    }
    (mean, rstd)
}

type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);

#[allow(clippy::too_many_arguments)]
fn backward<T: Elem>(
    op: &GroupNormOp,
    d: Dims,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    dy: &[T],
    stats: &[(f64, f64)],
    mask: Option<&[T]>,
) -> Grads<T> {
    let len = d.cg * d.s;
    let mut dx = Uninit::<T>::new(x.len());
    // Per (example, group): per channel (sum dz, sum dz * x_hat).
    let sums: Vec<Vec<(f64, f64)>> = dx
        .slots()
        .par_chunks_mut(len)
        .zip(x.par_chunks(len).zip(dy.par_chunks(len)))
        .enumerate()
        .map(|(i, (dxg, (xg, dyg)))| {
            let mg = mask_group(mask, i, len);
            backward_group_simd(op, d, i, dxg, xg, dyg, gamma, beta, stats, mg)
        })
        .collect();
    let (dgamma, dbeta) = reduce_param_grads::<T>(op, d, sums);
    // SAFETY: every group's values were written.
    (unsafe { dx.assume_init() }, dgamma, dbeta)
}

/// One (example, group) of [`backward`]: writes `dxg`, returns per channel
/// `(sum dz, sum dz * x_hat)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_group<T: Elem>(
    op: &GroupNormOp,
    d: Dims,
    i: usize,
    dxg: &mut [MaybeUninit<T>],
    xg: &[T],
    dyg: &[T],
    gamma: &[T],
    beta: &[T],
    stats: &[(f64, f64)],
    mg: Option<&[T]>,
) -> Vec<(f64, f64)> {
    let n = (d.cg * d.s) as f64;
    // Written in full by the loop below, before anything reads it.
    for v in dxg.iter_mut() {
        v.write(T::ZERO);
    }
    // SAFETY: just initialised.
    let dxg = unsafe { &mut *(dxg as *mut [MaybeUninit<T>] as *mut [T]) };
    let (mean, rstd) = stats[i];
    let (mean_t, rstd_t) = (T::from_f64(mean), T::from_f64(rstd));
    let c0 = d.affine0(i, op.groups);
    let mut per_c = Vec::with_capacity(d.cg);
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    // Pass 1: dz into dx, channel sums.
    for (j, ((dzc, xc), dyc)) in dxg
        .chunks_exact_mut(d.s)
        .zip(xg.chunks_exact(d.s))
        .zip(dyg.chunks_exact(d.s))
        .enumerate()
    {
        let (g, bt) = (gamma[c0 + j], beta[c0 + j]);
        match (op.silu, mg) {
            (true, None) => {
                for ((o, &v), &gy) in dzc.iter_mut().zip(xc).zip(dyc) {
                    let z = (v - mean_t) * rstd_t * g + bt;
                    let sg = sigmoid(z);
                    *o = gy * sg * (T::ONE + z * (T::ONE - sg));
                }
            }
            (true, Some(mg)) => {
                let mc = &mg[j * d.s..(j + 1) * d.s];
                for (((o, &v), &gy), &m) in dzc.iter_mut().zip(xc).zip(dyc).zip(mc) {
                    let z = (v - mean_t) * rstd_t * g + bt;
                    let sg = sigmoid(z);
                    *o = gy * m * sg * (T::ONE + z * (T::ONE - sg));
                }
            }
            (false, None) => dzc.copy_from_slice(dyc),
            (false, Some(mg)) => {
                let mc = &mg[j * d.s..(j + 1) * d.s];
                for ((o, &gy), &m) in dzc.iter_mut().zip(dyc).zip(mc) {
                    *o = gy * m;
                }
            }
        }
        let sdz = lanes_sum(dzc, |v| v);
        let sdzx = lanes_sum2(dzc, xc, |dz, v| dz * ((v - mean_t) * rstd_t));
        s1 += g.to_f64() * sdz;
        s2 += g.to_f64() * sdzx;
        per_c.push((sdz, sdzx));
    }
    // Pass 2: dx from dz.
    let (m1, m2) = (T::from_f64(s1 / n), T::from_f64(s2 / n));
    for (j, (dxc, xc)) in dxg
        .chunks_exact_mut(d.s)
        .zip(xg.chunks_exact(d.s))
        .enumerate()
    {
        let g = gamma[c0 + j];
        for (o, &v) in dxc.iter_mut().zip(xc) {
            let xh = (v - mean_t) * rstd_t;
            *o = rstd_t * (g * *o - m1 - xh * m2);
        }
    }
    per_c
}

/// Sums the per-(example, group) parameter gradients in a fixed order (per example: places them).
fn reduce_param_grads<T: Elem>(
    op: &GroupNormOp,
    d: Dims,
    sums: Vec<Vec<(f64, f64)>>,
) -> (Vec<T>, Vec<T>) {
    let n = if d.per_example { d.b * d.c } else { d.c };
    let mut dgamma = vec![0.0f64; n];
    let mut dbeta = vec![0.0f64; n];
    for (i, per_c) in sums.iter().enumerate() {
        let c0 = d.affine0(i, op.groups);
        for (j, &(sdz, sdzx)) in per_c.iter().enumerate() {
            dbeta[c0 + j] += sdz;
            dgamma[c0 + j] += sdzx;
        }
    }
    debug_assert_eq!(sums.len(), d.b * op.groups);
    let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
    (cast(dgamma), cast(dbeta))
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        if self.silu {
            "ddpm-group-norm-silu"
        } else {
            "ddpm-group-norm"
        }
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(lx.shape(), lg.shape());
        macro_rules! run {
            ($t:ty) => {{
                let y = self.run::<$t>(d, slice(sx, lx)?, slice(sg, lg)?, slice(sb, lb)?)?;
                <$t>::to_cpu_storage_owned(y)
            }};
        }
        let out = match sx.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("ddpm-ops group_norm: unsupported dtype {dt:?}"),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.shape(), gamma.shape());
        let (x, gamma, beta, grad) = (
            x.contiguous()?,
            gamma.contiguous()?,
            beta.contiguous()?,
            grad.contiguous()?,
        );
        let (sx, lx) = x.storage_and_layout();
        let (sg, lg) = gamma.storage_and_layout();
        let (sb, lb) = beta.storage_and_layout();
        let (sd, ld) = grad.storage_and_layout();
        let (Storage::Cpu(sx), Storage::Cpu(sg), Storage::Cpu(sb), Storage::Cpu(sd)) =
            (&*sx, &*sg, &*sb, &*sd)
        else {
            bail!("ddpm-ops group_norm backward: tensors are not on the CPU");
        };
        macro_rules! run {
            ($t:ty) => {{
                let xs = slice::<$t>(sx, lx)?;
                let fresh;
                let st = match self.stats.get() {
                    Some(st) => st.as_slice(),
                    None => {
                        fresh = xs
                            .chunks_exact(d.cg * d.s)
                            .map(|g| stats(g, self.eps))
                            .collect::<Vec<_>>();
                        fresh.as_slice()
                    }
                };
                let (dx, dg, db) = self.with_mask::<$t, _>(|m| {
                    let (g, b, dy) = (slice(sg, lg)?, slice(sb, lb)?, slice(sd, ld)?);
                    Ok(backward::<$t>(self, d, xs, g, b, dy, st, m))
                })?;
                let wrap = |v: Vec<$t>, s: &Shape| {
                    Tensor::from_storage(
                        Storage::Cpu(<$t>::to_cpu_storage_owned(v)),
                        s.clone(),
                        BackpropOp::none(),
                        false,
                    )
                };
                (
                    wrap(dx, x.shape()),
                    wrap(dg, gamma.shape()),
                    wrap(db, beta.shape()),
                )
            }};
        }
        let (dx, dg, db) = match sx.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("ddpm-ops group_norm backward: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dg), Some(db)))
    }
}
