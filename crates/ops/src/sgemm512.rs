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
/// `(p, j)` of `B` at `b + p * ldb + j`, or with `b_t` at `b + j * ldb + p` (a transposed `X`,
/// the weight gradients' `B = X^T`), `C` row-major with row stride `ldc`.
///
/// A transposed `B` is packed, 32 columns at a time, into a row-major panel by 16 x 16
/// in-register transposes (64 shuffles per 256 values, on the shuffle port, beside the FMAs),
/// and the panel is then multiplied as a row-major `B`.
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
    (b, ldb, b_t): (*const f32, usize, bool),
) {
    let mut panel = Vec::new();
    if b_t {
        panel.resize(k.next_multiple_of(16) * NR, 0f32);
    }
    let mut j0 = 0;
    while j0 < n {
        let w = (n - j0).min(NR);
        let (bp, ldbp) = if b_t {
            pack_transposed(b.add(j0 * ldb), ldb, k, w, panel.as_mut_ptr());
            (panel.as_ptr(), NR)
        } else {
            (b.add(j0), ldb)
        };
        let mask = |lanes: usize| -> __mmask16 { ((1u32 << lanes.min(16)) - 1) as __mmask16 };
        let masks = (mask(w), mask(w.saturating_sub(16)));
        let mut i0 = 0;
        while i0 < m {
            let rows = (m - i0).min(MR);
            let blk = Block {
                k,
                a: a.add(i0 * a_s.0),
                a_s,
                b: bp,
                ldb: ldbp,
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

/// Packs columns `0..w` (`w <= 32`) of `B` (`(p, j)` at `b + j * ldb + p`, `p < k`) into
/// `panel[p * 32 + j]`; columns `w..32` are left as they are (the kernel masks them off).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_transposed(b: *const f32, ldb: usize, k: usize, w: usize, panel: *mut f32) {
    for half in 0..2 {
        let cols = w.saturating_sub(16 * half).min(16);
        if cols == 0 {
            break;
        }
        let mut p0 = 0;
        while p0 < k {
            let kk = (k - p0).min(16);
            let mask = ((1u32 << kk) - 1) as __mmask16;
            let mut r = [_mm512_setzero_ps(); 16];
            for (t, row) in r.iter_mut().enumerate().take(cols) {
                *row = _mm512_maskz_loadu_ps(mask, b.add((16 * half + t) * ldb + p0));
            }
            transpose16(&mut r);
            for (t, row) in r.iter().enumerate().take(kk) {
                _mm512_storeu_ps(panel.add((p0 + t) * NR + 16 * half), *row);
            }
            p0 += 16;
        }
    }
}

/// `r[i][j] -> r[j][i]` for a 16 x 16 block: 32-bit then 64-bit interleaves within 128-bit
/// lanes (a 4 x 4 transpose per lane and group of four rows), then a 4 x 4 transpose of the
/// 128-bit lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // s[g][q]: lane l holds column 4l + q of rows 4g .. 4g + 3.
    let mut s = [[_mm512_setzero_ps(); 4]; 4];
    let pd = _mm512_castps_pd;
    for (g, sg) in s.iter_mut().enumerate() {
        let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        sg[0] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        sg[1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        sg[2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        sg[3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(b), pd(d)));
    }
    for q in 0..4 {
        let u0 = _mm512_shuffle_f32x4::<0x44>(s[0][q], s[1][q]);
        let u1 = _mm512_shuffle_f32x4::<0xEE>(s[0][q], s[1][q]);
        let u2 = _mm512_shuffle_f32x4::<0x44>(s[2][q], s[3][q]);
        let u3 = _mm512_shuffle_f32x4::<0xEE>(s[2][q], s[3][q]);
        r[q] = _mm512_shuffle_f32x4::<0x88>(u0, u2);
        r[4 + q] = _mm512_shuffle_f32x4::<0xDD>(u0, u2);
        r[8 + q] = _mm512_shuffle_f32x4::<0x88>(u1, u3);
        r[12 + q] = _mm512_shuffle_f32x4::<0xDD>(u1, u3);
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
    _b: (*const f32, usize, bool),
) {
    unreachable!("sgemm512::available() is false off x86-64")
}
