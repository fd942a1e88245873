//! Vectors of f32 lanes for the Winograd tile transforms, over AVX-512 ([`Z`], 16 lanes) or
//! AVX2 ([`Y`], 8 lanes), and the arithmetic the transforms are written in ([`Arith`]), which
//! scalars share, so that one formula serves the scalar loops and the vector kernels.
//!
//! The transforms read tiles that overlap and lie anywhere in the image; the vector kernels
//! fetch one tile element of `N` tiles at once with a gather (masked lanes, whose pixel is
//! outside the image, read nothing and give 0), instead of copying each tile into scratch planes
//! one scalar at a time. No fused multiply-add is used, so every result is bitwise the scalar
//! loop's.

use std::ops::{Add, Mul, Neg, Sub};

use crate::elem::Elem;

/// What a transform formula needs: `+`, `-`, `*`, negation (the sign flipped, as for scalars)
/// and constants.
pub(crate) trait Arith:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Neg<Output = Self>
{
    /// The constant `v` (in every lane).
    fn k(v: f64) -> Self;
}

impl<T: Elem> Arith for T {
    #[inline(always)]
    fn k(v: f64) -> Self {
        T::from_f64(v)
    }
}

/// A vector of `N` f32 lanes with its index (`I`, i32 lanes) and mask (`M`) types.
///
/// # Safety
/// Implementations are only constructed (and their methods only called) on CPUs with the
/// instruction set they use: callers check [`Isa::detect`] first.
pub(crate) unsafe trait Lanes: Arith {
    const N: usize;
    type I: Copy;
    type M: Copy;
    /// Lanes `0..n` of `p` (`n <= N`; the rest 0, not read).
    unsafe fn load(p: *const f32, n: usize) -> Self;
    /// Stores lanes `0..n` to `p` (`n <= N`; nothing else is written).
    unsafe fn store(self, p: *mut f32, n: usize);
    /// `N` i32 lanes from `p`.
    unsafe fn load_i(p: *const i32) -> Self::I;
    /// `a + k` in every lane.
    fn add_i(a: Self::I, k: i32) -> Self::I;
    /// Lanes with `0 <= a < n`.
    fn within(a: Self::I, n: i32) -> Self::M;
    fn and(a: Self::M, b: Self::M) -> Self::M;
    /// Lanes `0..n`.
    fn first(n: usize) -> Self::M;
    /// `base[idx]` in the lanes of `m`, 0 in the others (whose addresses are not read).
    unsafe fn gather(base: *const f32, idx: Self::I, m: Self::M) -> Self;
    /// `base[idx] = self` in the lanes of `m`; the indices of those lanes must be distinct.
    unsafe fn scatter(self, base: *mut f32, idx: Self::I, m: Self::M);
    /// `(base[idx], base[idx + 1])` in the lanes of `m`, zeros in the others (whose pairs are
    /// not read): the two values of a pair that lie side by side. AVX-512 fetches each pair
    /// with one 64-bit gather element, half the elements of two 32-bit gathers.
    #[inline(always)]
    unsafe fn gather_pairs(base: *const f32, idx: Self::I, m: Self::M) -> (Self, Self) {
        (
            Self::gather(base, idx, m),
            Self::gather(base, Self::add_i(idx, 1), m),
        )
    }
    /// `base[idx] = a`, `base[idx + 1] = b` in the lanes of `m` (indices of distinct lanes at
    /// least 2 apart): one 64-bit scatter element per pair on AVX-512.
    #[inline(always)]
    unsafe fn scatter_pairs(a: Self, b: Self, base: *mut f32, idx: Self::I, m: Self::M) {
        a.scatter(base, idx, m);
        b.scatter(base, Self::add_i(idx, 1), m);
    }
}

/// The vector instruction set the gathered transforms run with, if any.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// What the tile transforms run with: [`Isa::cpu`] when the gathered transforms are on
    /// ([`crate::runtime::gather_enabled`]: measured faster on this CPU, or forced by
    /// `DDPM_OPS_GATHER`), else `None` (the scalar loops).
    pub fn detect() -> Option<Isa> {
        if crate::runtime::gather_enabled() {
            Isa::cpu()
        } else {
            None
        }
    }

    /// The CPU's vector instruction set for the gathered transforms: AVX-512F (unless
    /// `DDPM_OPS_AVX512=0`), else AVX2+FMA, else none.
    pub fn cpu() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::runtime::sgemm512_enabled() && std::arch::is_x86_feature_detected!("avx512f")
            {
                return Some(Isa::Avx512);
            }
            if crate::simd::has_avx2_fma() {
                return Some(Isa::Avx2);
            }
        }
        None
    }
}

/// `s` as f32 values when `T` is f32.
pub(crate) fn as_f32<T: 'static>(s: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) })
}

/// `s` as mutable f32 values when `T` is f32.
pub(crate) fn as_f32_mut<T: 'static>(s: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32.
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut f32, s.len()) })
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Y, Z};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::{Add, Mul, Neg, Sub};

    use super::{Arith, Lanes};

    /// 16 f32 lanes in a zmm register (AVX-512F).
    #[derive(Clone, Copy)]
    pub(crate) struct Z(__m512);

    /// 8 f32 lanes in a ymm register (AVX2).
    #[derive(Clone, Copy)]
    pub(crate) struct Y(__m256);

    macro_rules! binop {
        ($ty:ident, $tr:ident, $f:ident, $op:ident) => {
            impl $tr for $ty {
                type Output = $ty;
                #[inline(always)]
                fn $f(self, o: $ty) -> $ty {
                    // SAFETY: a value of this type exists only on a CPU with its features.
                    $ty(unsafe { $op(self.0, o.0) })
                }
            }
        };
    }
    binop!(Z, Add, add, _mm512_add_ps);
    binop!(Z, Sub, sub, _mm512_sub_ps);
    binop!(Z, Mul, mul, _mm512_mul_ps);
    binop!(Y, Add, add, _mm256_add_ps);
    binop!(Y, Sub, sub, _mm256_sub_ps);
    binop!(Y, Mul, mul, _mm256_mul_ps);

    impl Neg for Z {
        type Output = Z;
        #[inline(always)]
        fn neg(self) -> Z {
            // SAFETY: see `binop!`. The sign bit flipped (0 - x would turn -0 into +0).
            Z(unsafe {
                let sign = _mm512_set1_epi32(i32::MIN);
                _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(self.0), sign))
            })
        }
    }

    impl Neg for Y {
        type Output = Y;
        #[inline(always)]
        fn neg(self) -> Y {
            // SAFETY: see `binop!`.
            Y(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
        }
    }

    impl Arith for Z {
        #[inline(always)]
        fn k(v: f64) -> Self {
            // SAFETY: see `binop!`.
            Z(unsafe { _mm512_set1_ps(v as f32) })
        }
    }

    impl Arith for Y {
        #[inline(always)]
        fn k(v: f64) -> Self {
            // SAFETY: see `binop!`.
            Y(unsafe { _mm256_set1_ps(v as f32) })
        }
    }

    // SAFETY: only used inside `#[target_feature(enable = "avx512f")]` functions reached after
    // `Isa::detect` returned `Avx512`.
    unsafe impl Lanes for Z {
        const N: usize = 16;
        type I = __m512i;
        type M = __mmask16;
        #[inline(always)]
        unsafe fn load(p: *const f32, n: usize) -> Self {
            if n >= 16 {
                Z(_mm512_loadu_ps(p))
            } else {
                Z(_mm512_maskz_loadu_ps(Self::first(n), p))
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, n: usize) {
            if n >= 16 {
                _mm512_storeu_ps(p, self.0)
            } else {
                _mm512_mask_storeu_ps(p, Self::first(n), self.0)
            }
        }
        #[inline(always)]
        unsafe fn load_i(p: *const i32) -> __m512i {
            _mm512_loadu_si512(p as *const __m512i)
        }
        #[inline(always)]
        fn add_i(a: __m512i, k: i32) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_add_epi32(a, _mm512_set1_epi32(k)) }
        }
        #[inline(always)]
        fn within(a: __m512i, n: i32) -> __mmask16 {
            // Unsigned: a negative `a` is above any `n`.
            // SAFETY: see the impl.
            unsafe { _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(n)) }
        }
        #[inline(always)]
        fn and(a: __mmask16, b: __mmask16) -> __mmask16 {
            a & b
        }
        #[inline(always)]
        fn first(n: usize) -> __mmask16 {
            ((1u32 << n.min(16)) - 1) as __mmask16
        }
        #[inline(always)]
        unsafe fn gather(base: *const f32, idx: __m512i, m: __mmask16) -> Self {
            Z(_mm512_mask_i32gather_ps::<4>(
                _mm512_setzero_ps(),
                m,
                idx,
                base,
            ))
        }
        #[inline(always)]
        unsafe fn scatter(self, base: *mut f32, idx: __m512i, m: __mmask16) {
            _mm512_mask_i32scatter_ps::<4>(base, m, idx, self.0)
        }
        #[inline(always)]
        unsafe fn gather_pairs(base: *const f32, idx: __m512i, m: __mmask16) -> (Self, Self) {
            // Lanes 0-7 and 8-15 as pairs [a0 b0 a1 b1 ..], then split into a and b.
            let (base, zero) = (base as *const f64, _mm512_setzero_pd());
            let idx_hi = _mm512_extracti64x4_epi64::<1>(idx);
            let lo_idx = _mm512_castsi512_si256(idx);
            let lo = _mm512_mask_i32gather_pd::<4>(zero, m as __mmask8, lo_idx, base);
            let hi = _mm512_mask_i32gather_pd::<4>(zero, (m >> 8) as __mmask8, idx_hi, base);
            let (lo, hi) = (_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
            (
                Z(_mm512_permutex2var_ps(lo, even, hi)),
                Z(_mm512_permutex2var_ps(lo, odd, hi)),
            )
        }
        #[inline(always)]
        unsafe fn scatter_pairs(a: Self, b: Self, base: *mut f32, idx: __m512i, m: __mmask16) {
            // [a0 b0 a1 b1 .. a7 b7] and [a8 b8 .. a15 b15], one 64-bit element per pair.
            let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
            let lo = _mm512_castps_pd(_mm512_permutex2var_ps(a.0, first, b.0));
            let hi = _mm512_castps_pd(_mm512_permutex2var_ps(a.0, second, b.0));
            let base = base as *mut f64;
            _mm512_mask_i32scatter_pd::<4>(base, m as __mmask8, _mm512_castsi512_si256(idx), lo);
            let idx_hi = _mm512_extracti64x4_epi64::<1>(idx);
            _mm512_mask_i32scatter_pd::<4>(base, (m >> 8) as __mmask8, idx_hi, hi);
        }
    }

    // SAFETY: only used inside `#[target_feature(enable = "avx2,fma")]` functions reached after
    // `Isa::detect` returned `Avx2`.
    unsafe impl Lanes for Y {
        const N: usize = 8;
        type I = __m256i;
        type M = __m256i;
        #[inline(always)]
        unsafe fn load(p: *const f32, n: usize) -> Self {
            if n >= 8 {
                Y(_mm256_loadu_ps(p))
            } else {
                Y(_mm256_maskload_ps(p, Self::first(n)))
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, n: usize) {
            if n >= 8 {
                _mm256_storeu_ps(p, self.0)
            } else {
                _mm256_maskstore_ps(p, Self::first(n), self.0)
            }
        }
        #[inline(always)]
        unsafe fn load_i(p: *const i32) -> __m256i {
            _mm256_loadu_si256(p as *const __m256i)
        }
        #[inline(always)]
        fn add_i(a: __m256i, k: i32) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_add_epi32(a, _mm256_set1_epi32(k)) }
        }
        #[inline(always)]
        fn within(a: __m256i, n: i32) -> __m256i {
            // SAFETY: see the impl.
            unsafe {
                let below = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), a);
                let nonneg = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(-1));
                _mm256_and_si256(below, nonneg)
            }
        }
        #[inline(always)]
        fn and(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_and_si256(a, b) }
        }
        #[inline(always)]
        fn first(n: usize) -> __m256i {
            // SAFETY: see the impl.
            unsafe {
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), lane)
            }
        }
        #[inline(always)]
        unsafe fn gather(base: *const f32, idx: __m256i, m: __m256i) -> Self {
            Y(_mm256_mask_i32gather_ps::<4>(
                _mm256_setzero_ps(),
                base,
                idx,
                _mm256_castsi256_ps(m),
            ))
        }
        #[inline(always)]
        unsafe fn scatter(self, base: *mut f32, idx: __m256i, m: __m256i) {
            // AVX2 has no scatter: lane by lane.
            let (mut v, mut i) = ([0f32; 8], [0i32; 8]);
            _mm256_storeu_ps(v.as_mut_ptr(), self.0);
            _mm256_storeu_si256(i.as_mut_ptr() as *mut __m256i, idx);
            let mut bits = _mm256_movemask_ps(_mm256_castsi256_ps(m)) as u32;
            while bits != 0 {
                let l = bits.trailing_zeros() as usize;
                *base.offset(i[l] as isize) = v[l];
                bits &= bits - 1;
            }
        }
    }
}
