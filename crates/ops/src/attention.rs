//! Dot-product attention over channel-major q, k, v (improved-diffusion's
//! `QKVAttentionLegacy`) as one op with its own backward.
//!
//! For each of the `n` (batch x heads) items, with `q, k, v` of shape `[d, t]`:
//! `P = softmax(scale * q^T k)` over the last dimension (`[t, t]`) and `out = v P^T` (`[d, t]`).
//! Backward, from `dOut`: `dV = dOut P`, `dP = dOut^T v`, `dS = scale * P * (dP - rowsum(dP * P))`,
//! `dQ = k dS^T`, `dK = q dS`. Every product is one GEMM on strided views, so nothing is
//! transposed in memory, and the `[t, t]` scores exist once (kept from the forward) instead of
//! as several graph nodes whose gradients candle would each zero-fill and accumulate.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::WithDType;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::conv::slice;
use crate::elem::{lanes_max, lanes_sum, lanes_sum2, Elem, Uninit};
use crate::gemm::{gemm, Mat};
use crate::runtime::{fast_path_enabled, num_threads};
use crate::simd::simd_variant;

/// `v softmax(scale * q^T k)^T` per item: `q, k, v` are `[n, d, t]` (n = batch x heads,
/// channel-major as improved-diffusion lays them out); returns `[n, d, t]`. Differentiable in
/// all three. `scale` must be positive and finite (usually `1 / sqrt(d)`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (n, d, t) = q.dims3()?;
    if k.dims() != [n, d, t] || v.dims() != [n, d, t] {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} must all be [n, d, t]",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if !(scale > 0.0 && scale.is_finite()) {
        bail!("attention: scale must be positive and finite, got {scale}");
    }
    let on_cpu = q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu();
    if on_cpu && fast_path_enabled() && crate::precision::is_half(q.dtype()) {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return attention(&f32(q)?, &f32(k)?, &f32(v)?, scale)?.to_dtype(q.dtype());
    }
    // Empty tensors take candle's path: the kernel works in rows of `t`.
    let fast = fast_path_enabled()
        && n * d * t > 0
        && matches!(q.dtype(), DType::F32 | DType::F64)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && q.device().is_cpu()
        && k.device().is_cpu()
        && v.device().is_cpu();
    if !fast {
        let w = crate::softmax_scaled(&q.t()?.matmul(k)?, scale)?;
        return v.matmul(&w.t()?);
    }
    let op = AttentionOp {
        scale,
        probs: OnceLock::new(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct AttentionOp {
    scale: f64,
    /// The softmax probabilities `[n, t, t]` from the forward pass, as f32 or f64 bytes.
    probs: OnceLock<CpuStorage>,
}

#[inline(always)]
fn softmax_rows<T: Elem>(s: &mut [T], t: usize, scale: T) {
    for row in s.chunks_exact_mut(t) {
        let m = lanes_max(row) * scale;
        for x in row.iter_mut() {
            *x = (*x * scale - m).exp();
        }
        let inv = T::ONE / T::from_f64(lanes_sum(row, |x| x));
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// `ds = scale * p * (dp - rowsum(dp * p))`, in place of `dp`.
#[inline(always)]
fn softmax_grad_rows<T: Elem>(dp: &mut [T], p: &[T], t: usize, scale: T) {
    for (dr, pr) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
        let s = T::from_f64(lanes_sum2(dr, pr, |a, b| a * b));
        for (x, &pv) in dr.iter_mut().zip(pr) {
            *x = scale * pv * (*x - s);
        }
    }
}

simd_variant!(fn softmax_rows_simd<T>(s: &mut [T], t: usize, scale: T) -> () = softmax_rows);
simd_variant!(fn softmax_grad_rows_simd<T>(dp: &mut [T], p: &[T], t: usize, scale: T) -> () = softmax_grad_rows);

/// Items run on different threads (single-threaded GEMMs) when there are enough of them.
fn gemm_threads(n: usize) -> usize {
    if n >= num_threads() {
        1
    } else {
        num_threads()
    }
}

/// Forward: returns `(out [n, d, t], probs [n, t, t])`.
fn forward<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    n: usize,
    d: usize,
    t: usize,
    scale: f64,
) -> (Vec<T>, Vec<T>) {
    let mut out = Uninit::<T>::new(n * d * t);
    let mut probs = Uninit::<T>::new(n * t * t);
    let threads = gemm_threads(n);
    let one = |i: usize, o: &mut [std::mem::MaybeUninit<T>], p: &mut [std::mem::MaybeUninit<T>]| {
        let (qi, ki, vi) = (&q[i * d * t..], &k[i * d * t..], &v[i * d * t..]);
        let pp = p.as_mut_ptr() as *mut T;
        // SAFETY (GEMMs): shapes match the slices; outputs are written in full (no accumulate).
        // S = q^T k: [t, d] x [d, t].
        unsafe {
            gemm(
                t,
                t,
                d,
                pp,
                t,
                false,
                Mat::rows(qi, t).t(),
                Mat::rows(ki, t),
                threads,
            )
        };
        // SAFETY: just written in full.
        let ps = unsafe { std::slice::from_raw_parts_mut(pp, t * t) };
        softmax_rows_simd(ps, t, T::from_f64(scale));
        // out = v P^T: [d, t] x [t, t].
        let op = o.as_mut_ptr() as *mut T;
        unsafe {
            gemm(
                d,
                t,
                t,
                op,
                t,
                false,
                Mat::rows(vi, t),
                Mat::rows(ps, t).t(),
                threads,
            )
        };
    };
    if threads == 1 {
        out.slots()
            .par_chunks_mut(d * t)
            .zip(probs.slots().par_chunks_mut(t * t))
            .enumerate()
            .for_each(|(i, (o, p))| one(i, o, p));
    } else {
        for (i, (o, p)) in out
            .slots()
            .chunks_mut(d * t)
            .zip(probs.slots().chunks_mut(t * t))
            .enumerate()
        {
            one(i, o, p);
        }
    }
    // SAFETY: every item's output and probabilities were written by the GEMMs above.
    unsafe { (out.assume_init(), probs.assume_init()) }
}

type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);

#[allow(clippy::too_many_arguments)]
fn backward<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    p: &[T],
    dout: &[T],
    n: usize,
    d: usize,
    t: usize,
    scale: f64,
) -> Grads<T> {
    let len = d * t;
    let (mut dq, mut dk, mut dv) = (
        Uninit::<T>::new(n * len),
        Uninit::<T>::new(n * len),
        Uninit::<T>::new(n * len),
    );
    let threads = gemm_threads(n);
    let one = |i: usize,
               dqi: &mut [std::mem::MaybeUninit<T>],
               dki: &mut [std::mem::MaybeUninit<T>],
               dvi: &mut [std::mem::MaybeUninit<T>]| {
        let (qi, ki, vi) = (
            &q[i * len..(i + 1) * len],
            &k[i * len..(i + 1) * len],
            &v[i * len..(i + 1) * len],
        );
        let (pi, doi) = (
            &p[i * t * t..(i + 1) * t * t],
            &dout[i * len..(i + 1) * len],
        );
        let (dqp, dkp, dvp) = (
            dqi.as_mut_ptr() as *mut T,
            dki.as_mut_ptr() as *mut T,
            dvi.as_mut_ptr() as *mut T,
        );
        T::with_scratch(t * t, |ds| {
            // SAFETY (GEMMs): shapes match the slices; each output is written in full.
            // dV = dOut P: [d, t] x [t, t].
            unsafe {
                gemm(
                    d,
                    t,
                    t,
                    dvp,
                    t,
                    false,
                    Mat::rows(doi, t),
                    Mat::rows(pi, t),
                    threads,
                )
            };
            // dP = dOut^T v: [t, d] x [d, t].
            let dsp = ds.as_mut_ptr();
            unsafe {
                gemm(
                    t,
                    t,
                    d,
                    dsp,
                    t,
                    false,
                    Mat::rows(doi, t).t(),
                    Mat::rows(vi, t),
                    threads,
                )
            };
            softmax_grad_rows_simd(ds, pi, t, T::from_f64(scale));
            // dQ = k dS^T: [d, t] x [t, t]^T; dK = q dS: [d, t] x [t, t].
            unsafe {
                gemm(
                    d,
                    t,
                    t,
                    dqp,
                    t,
                    false,
                    Mat::rows(ki, t),
                    Mat::rows(ds, t).t(),
                    threads,
                )
            };
            unsafe {
                gemm(
                    d,
                    t,
                    t,
                    dkp,
                    t,
                    false,
                    Mat::rows(qi, t),
                    Mat::rows(ds, t),
                    threads,
                )
            };
        });
    };
    if threads == 1 {
        dq.slots()
            .par_chunks_mut(len)
            .zip(dk.slots().par_chunks_mut(len))
            .zip(dv.slots().par_chunks_mut(len))
            .enumerate()
            .for_each(|(i, ((a, b), c))| one(i, a, b, c));
    } else {
        for (i, ((a, b), c)) in dq
            .slots()
            .chunks_mut(len)
            .zip(dk.slots().chunks_mut(len))
            .zip(dv.slots().chunks_mut(len))
            .enumerate()
        {
            one(i, a, b, c);
        }
    }
    // SAFETY: each item's three gradients were written in full by the GEMMs above.
    unsafe { (dq.assume_init(), dk.assume_init(), dv.assume_init()) }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ddpm-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d, t) = lq.shape().dims3()?;
        macro_rules! run {
            ($ty:ty) => {{
                let (out, probs) = forward::<$ty>(
                    slice(sq, lq)?,
                    slice(sk, lk)?,
                    slice(sv, lv)?,
                    n,
                    d,
                    t,
                    self.scale,
                );
                let _ = self.probs.set(<$ty>::to_cpu_storage_owned(probs));
                <$ty>::to_cpu_storage_owned(out)
            }};
        }
        let out = match sq.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("ddpm-ops attention: unsupported dtype {dt:?}"),
        };
        Ok((out, lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, d, t) = q.dims3()?;
        let Some(probs) = self.probs.get() else {
            bail!("ddpm-ops attention backward: the forward pass did not run on the CPU");
        };
        let (q, k, v, grad) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            grad.contiguous()?,
        );
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (Storage::Cpu(sq), Storage::Cpu(sk), Storage::Cpu(sv), Storage::Cpu(sg)) =
            (&*sq, &*sk, &*sv, &*sg)
        else {
            bail!("ddpm-ops attention backward: tensors are not on the CPU");
        };
        macro_rules! run {
            ($ty:ty) => {{
                let p = <$ty>::cpu_storage_as_slice(probs)?;
                let (dq, dk, dv) = backward::<$ty>(
                    slice(sq, lq)?,
                    slice(sk, lk)?,
                    slice(sv, lv)?,
                    p,
                    slice(sg, lg)?,
                    n,
                    d,
                    t,
                    self.scale,
                );
                let wrap = |x: Vec<$ty>| {
                    Tensor::from_storage(
                        Storage::Cpu(<$ty>::to_cpu_storage_owned(x)),
                        (n, d, t),
                        BackpropOp::none(),
                        false,
                    )
                };
                (wrap(dq), wrap(dk), wrap(dv))
            }};
        }
        let (dq, dk, dv) = match sq.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("ddpm-ops attention backward: unsupported dtype {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
