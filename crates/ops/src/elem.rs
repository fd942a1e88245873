//! The float types the kernels are written for, and per-thread scratch buffers.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

use candle_core::WithDType;

/// f32 or f64. The kernels are generic so that the f64 instance, which the finite-difference
/// gradient tests run, is the same code as the f32 one that trains.
pub(crate) trait Elem:
    WithDType
    + gemm_sealed::GemmElem
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    /// Runs `f` on this thread's scratch buffer of at least `len` elements (contents
    /// unspecified). Buffers grow and are kept, so steady-state training allocates no scratch.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

pub(crate) mod gemm_sealed {
    /// Types `gemm::gemm` implements a kernel for.
    pub trait GemmElem: 'static {}
    impl GemmElem for f32 {}
    impl GemmElem for f64 {}
}

macro_rules! impl_elem {
    ($t:ty, $key:ident, $exp:path) => {
        thread_local! {
            static $key: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
        }
        impl Elem for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                $key.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut buf) => {
                        if buf.len() < len {
                            buf.resize(len, 0.0);
                        }
                        f(&mut buf[..len])
                    }
                    // Re-entered on this thread (a work-stealing rayon wait inside `f`): use a
                    // private buffer rather than fail.
                    Err(_) => f(&mut vec![0.0; len]),
                })
            }
        }
    };
}

impl_elem!(f32, SCRATCH_F32, exp_f32);
impl_elem!(f64, SCRATCH_F64, f64::exp);

/// `e^x` for f32 without a libm call, so loops around it vectorise: Cephes' `expf` (range
/// reduction by `ln 2` in two parts, degree-6 polynomial), within 2 ulp of the true value on
/// `[-87.3, 88]`. Inputs are clamped to that range: below, the result is ~1.2e-38 instead of a
/// subnormal or 0; above 88 it saturates at e^88 ~ 1.65e38 instead of overflowing (the kernels
/// only feed it `x - max <= 0` and sigmoid arguments, where neither matters). NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Selects rather than `clamp`, so the loop vectorises (NaN becomes the lower bound here and
    // is restored at the end).
    let xc = if x > -87.336_55 { x } else { -87.336_55 };
    let xc = if xc < 88.0 { xc } else { 88.0 };
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // SAFETY: n is an integer in [-126, 127] (xc is finite and clamped).
    let k = unsafe { n.to_int_unchecked::<i32>() };
    let y = e * f32::from_bits(((k + 127) as u32) << 23);
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `sum f(x)` in f64, from 8 interleaved partial sums of `T` flushed to f64 every 256 values:
/// vectorisable, and the f32 partial sums stay short enough to lose nothing that matters.
#[inline(always)]
pub(crate) fn lanes_sum<T: Elem>(xs: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut total = 0.0f64;
    for block in xs.chunks(256) {
        let mut acc = [T::ZERO; 8];
        let mut it = block.chunks_exact(8);
        for c in &mut it {
            for i in 0..8 {
                acc[i] += f(c[i]);
            }
        }
        for &v in it.remainder() {
            acc[0] += f(v);
        }
        total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
    }
    total
}

/// `sum f(a, b)` over two slices of equal length, as [`lanes_sum`].
#[inline(always)]
pub(crate) fn lanes_sum2<T: Elem>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut total = 0.0f64;
    for (ba, bb) in a.chunks(256).zip(b.chunks(256)) {
        let mut acc = [T::ZERO; 8];
        let (mut ia, mut ib) = (ba.chunks_exact(8), bb.chunks_exact(8));
        for (ca, cb) in (&mut ia).zip(&mut ib) {
            for i in 0..8 {
                acc[i] += f(ca[i], cb[i]);
            }
        }
        for (&va, &vb) in ia.remainder().iter().zip(ib.remainder()) {
            acc[0] += f(va, vb);
        }
        total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
    }
    total
}

/// Largest element (NaN-propagation aside), 8 lanes so it vectorises.
#[inline(always)]
pub(crate) fn lanes_max<T: Elem>(xs: &[T]) -> T {
    let mut acc = [xs[0]; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc[0];
    for &v in acc[1..].iter().chain(it.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

/// A vector whose elements are all written before they are read. Avoids zero-filling large
/// outputs that a GEMM overwrites anyway; [`Uninit::assume_init`] is the caller's promise that
/// every element was written.
pub(crate) struct Uninit<T>(Vec<MaybeUninit<T>>);

impl<T: Copy> Uninit<T> {
    pub(crate) fn new(len: usize) -> Self {
        let mut v = Vec::with_capacity(len);
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { v.set_len(len) };
        Self(v)
    }

    pub(crate) fn slots(&mut self) -> &mut [MaybeUninit<T>] {
        &mut self.0
    }

    /// # Safety
    /// Every element must have been written.
    pub(crate) unsafe fn assume_init(self) -> Vec<T> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        // SAFETY: MaybeUninit<T> has T's layout; the caller guarantees initialisation.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
    }
}

/// Writes `value` into every slot.
pub(crate) fn fill_uninit<T: Copy>(slots: &mut [MaybeUninit<T>], value: T) {
    for s in slots {
        s.write(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.001_7;
        }
        // 2 ulp of f32 is 2 * 2^-23 relative, at worst.
        assert!(
            worst < 2.0 * f32::EPSILON as f64,
            "worst relative error {worst:.3e}"
        );
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1000.0) < 1.3e-38 && exp_f32(-1000.0) >= 0.0);
        assert!(exp_f32(1000.0).is_finite());
    }

    #[test]
    fn lane_reductions() {
        let v: Vec<f32> = (0..1001).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let want: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
        assert_eq!(lanes_sum(&v, |x| x * x), want);
        let w: Vec<f32> = v.iter().map(|x| x * 0.5).collect();
        let want2: f64 = v.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert_eq!(lanes_sum2(&v, &w, |a, b| a * b), want2);
        assert_eq!(lanes_max(&v), 50.0);
        assert_eq!(
            lanes_max(&v[..3]),
            v[..3].iter().cloned().fold(f32::MIN, f32::max)
        );
    }
}
