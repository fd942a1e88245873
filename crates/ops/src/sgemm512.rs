//! An f32 GEMM kernel for AVX-512 CPUs: `C [m, n] (+)= A [m, k] . B [k, n]`, `C` and `B`
//! row-major, `A` with any strides (a transposed `A` is a view with swapped strides). That is
//! the shape of the convolutions' forward-shaped products (Winograd forward and input gradient,
//! im2col forward and input gradient); the weight gradients (`B = X^T`) stay with `gemm`.
//!
//! The `gemm` crate runs its AVX2 kernels on AVX-512 CPUs (its AVX-512 ones measured slower
//! for the weight-gradient shape, bench/RESULTS.md), and packs both operands first. Here
//! each 12 x 32 block of `C` is held in 24 zmm registers while `k` runs: per `k`, two loads of
//! `B`'s row (masked at the right edge, so no remainder loop), twelve broadcasts of `A`, 24
//! FMAs. `B`'s 32-column panel is reused from L1 by every row block; nothing is packed. (Packing
//! `B = X^T` panels for the weight gradients measured no faster than `gemm`'s kernel: the
//! transposing copy ate the gain.)
//!
//! Each `C` element is `sum over k in order` of `a * b` with fused multiply-adds, one
//! accumulator per element, so results do not depend on how `m` and `n` are blocked.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of `C` per register block.
#[cfg(target_arch = "x86_64")]
const MR: usize = 12;
/// Columns of `C` per register block (two zmm vectors).
#[cfg(target_arch = "x86_64")]
const NR: usize = 32;

/// Whether [`sgemm`] can run here.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::runtime::sgemm512_enabled() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C = (accumulate ? C : 0) + A . B`: element `(i, p)` of `A` at `a + i * a_s.0 + p * a_s.1`,
/// `(p, j)` of `B` at `b + p * ldb + j`, `C` row-major with row stride `ldc`.
///
/// # Safety
/// [`available`] must be true; `a` and `b` must be valid for reads of the `m x k` and `k x n`
/// matrices they describe, `c` for writes (and reads when accumulating) of `m x n` with `ldc`,
/// not overlapping `a` or `b`.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: *const f32,
    a_s: (usize, usize),
    b: *const f32,
    ldb: usize,
) {
    let mut j0 = 0;
    while j0 < n {
        let w = (n - j0).min(NR);
        let mask = |lanes: usize| -> __mmask16 { ((1u32 << lanes.min(16)) - 1) as __mmask16 };
        let masks = (mask(w), mask(w.saturating_sub(16)));
        let mut i0 = 0;
        while i0 < m {
            let rows = (m - i0).min(MR);
            let blk = Block {
                k,
                a: a.add(i0 * a_s.0),
                a_s,
                b: b.add(j0),
                ldb,
                c: c.add(i0 * ldc + j0),
                ldc,
                accumulate,
                masks,
            };
            // One instantiation per row count, so the accumulators stay in registers.
            match rows {
                12 => blk.run::<12>(),
                11 => blk.run::<11>(),
                10 => blk.run::<10>(),
                9 => blk.run::<9>(),
                8 => blk.run::<8>(),
                7 => blk.run::<7>(),
                6 => blk.run::<6>(),
                5 => blk.run::<5>(),
                4 => blk.run::<4>(),
                3 => blk.run::<3>(),
                2 => blk.run::<2>(),
                _ => blk.run::<1>(),
            }
            i0 += rows;
        }
        j0 += NR;
    }
}

/// One register block of `C`: `R` rows, up to [`NR`] columns (lanes outside `masks` untouched).
#[cfg(target_arch = "x86_64")]
struct Block {
    k: usize,
    a: *const f32,
    a_s: (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    masks: (__mmask16, __mmask16),
}

#[cfg(target_arch = "x86_64")]
impl Block {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize>(&self) {
        let (m0, m1) = self.masks;
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for p in 0..self.k {
            let row = self.b.add(p * self.ldb);
            // Masked-off lanes are neither read nor faulted on.
            let b0 = _mm512_maskz_loadu_ps(m0, row);
            let b1 = _mm512_maskz_loadu_ps(m1, row.add(16));
            for i in 0..R {
                let av = _mm512_set1_ps(*self.a.add(i * self.a_s.0 + p * self.a_s.1));
                lo[i] = _mm512_fmadd_ps(av, b0, lo[i]);
                hi[i] = _mm512_fmadd_ps(av, b1, hi[i]);
            }
        }
        for i in 0..R {
            let out = self.c.add(i * self.ldc);
            let (mut r0, mut r1) = (lo[i], hi[i]);
            if self.accumulate {
                r0 = _mm512_add_ps(r0, _mm512_maskz_loadu_ps(m0, out));
                r1 = _mm512_add_ps(r1, _mm512_maskz_loadu_ps(m1, out.add(16)));
            }
            _mm512_mask_storeu_ps(out, m0, r0);
            _mm512_mask_storeu_ps(out.add(16), m1, r1);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    _m: usize,
    _n: usize,
    _k: usize,
    _c: *mut f32,
    _ldc: usize,
    _accumulate: bool,
    _a: *const f32,
    _a_s: (usize, usize),
    _b: *const f32,
    _ldb: usize,
) {
    unreachable!("sgemm512::available() is false off x86-64")
}
