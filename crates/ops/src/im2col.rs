//! Unfolding one example's feature map into GEMM columns, and folding columns back.
//!
//! Layout (Caffe's): `col[(c * kh + i) * kw + j][oh * wo + ow] = x[c][oh * s + i - p][ow * s + j - p]`
//! (zero outside the image). With the kernel rows first, the forward product `W . col` lands in
//! NCHW order with no transpose, and each column row is a handful of contiguous copies.

use crate::elem::Elem;
use crate::simd::simd_variant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    /// Rows of the column matrix (`cin * kh * kw`).
    pub fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Columns of the column matrix (`ho * wo`).
    pub fn n(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1x1, stride-1, unpadded conv: the input already is its column matrix.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Output columns `ow` whose input column `ow * s + j - p` lies inside `0..w`.
    #[inline(always)]
    fn valid_cols(&self, j: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.pad);
        let lo = if j >= p { 0 } else { (p - j).div_ceil(s) };
        let hi = if self.w + p > j {
            ((self.w + p - j - 1) / s + 1).min(self.wo)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    #[inline(always)]
    fn src_row(&self, oh: usize, i: usize) -> Option<usize> {
        let ih = oh * self.stride + i;
        (ih >= self.pad && ih - self.pad < self.h).then(|| ih - self.pad)
    }
}

/// Writes columns `p0..p1` (output pixels, row-major over `(oh, ow)`) of the column rows of
/// some consecutive input channels of one example. `x`: those channels' `[rows / (kh * kw), h, w]`
/// planes; `col`: the rows to fill, `p1 - p0` long each.
pub(crate) fn im2col<T: Elem>(g: &Geom, x: &[T], p0: usize, p1: usize, col: &mut [T]) {
    im2col_simd(g, x, p0, p1, col)
}

simd_variant!(fn im2col_simd<T>(g: &Geom, x: &[T], p0: usize, p1: usize, col: &mut [T]) -> () = im2col_impl);
simd_variant!(fn col2im_simd<T>(g: &Geom, col: &[T], p0: usize, p1: usize, dx: &mut [T]) -> () = col2im_impl);

#[inline(always)]
fn im2col_impl<T: Elem>(g: &Geom, x: &[T], p0: usize, p1: usize, col: &mut [T]) {
    if g.stride == 1 && g.wo == g.w {
        im2col_same(g, x, p0, p1, col)
    } else {
        im2col_rows(g, x, p0, p1, col)
    }
}

/// [`im2col`] one output row segment at a time (any stride and padding).
#[inline(always)]
fn im2col_rows<T: Elem>(g: &Geom, x: &[T], p0: usize, p1: usize, col: &mut [T]) {
    let nt = p1 - p0;
    let (s, p) = (g.stride, g.pad);
    for (r, dst) in col.chunks_exact_mut(nt).enumerate() {
        let c = r / (g.kh * g.kw);
        let i = (r / g.kw) % g.kh;
        let j = r % g.kw;
        let (lo, hi) = g.valid_cols(j);
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for oh in p0 / g.wo..p1.div_ceil(g.wo) {
            // This output row's part of the tile, as ow in a..b.
            let base = oh * g.wo;
            let (a, b) = (p0.max(base) - base, p1.min(base + g.wo) - base);
            let d = &mut dst[base + a - p0..base + b - p0];
            let Some(ih) = g.src_row(oh, i) else {
                d.fill(T::ZERO);
                continue;
            };
            let src = &plane[ih * g.w..(ih + 1) * g.w];
            let (vl, vh) = (lo.clamp(a, b), hi.clamp(a, b));
            d[..vl - a].fill(T::ZERO);
            d[vh - a..].fill(T::ZERO);
            if vl < vh {
                let first = vl * s + j - p;
                let d = &mut d[vl - a..vh - a];
                if s == 1 {
                    d.copy_from_slice(&src[first..first + (vh - vl)]);
                } else {
                    for (k, v) in d.iter_mut().enumerate() {
                        *v = src[first + k * s];
                    }
                }
            }
        }
    }
}

/// [`im2col`] for stride 1 and "same" width (`wo == w`): output pixel `q` of row `(c, i, j)` reads
/// input pixel `q + (i - p) * w + (j - p)` of the flattened plane, so each row is one contiguous
/// copy, then zeros where the tap falls in the padding (whole output rows at the top/bottom, and
/// `|j - p|` columns at the left or right edge of the others, which the copy filled from the
/// neighbouring image row).
#[inline(always)]
fn im2col_same<T: Elem>(g: &Geom, x: &[T], p0: usize, p1: usize, col: &mut [T]) {
    let nt = p1 - p0;
    let (w, p) = (g.w, g.pad as isize);
    let plane_len = (g.h * w) as isize;
    for (r, dst) in col.chunks_exact_mut(nt).enumerate() {
        let c = r / (g.kh * g.kw);
        let i = ((r / g.kw) % g.kh) as isize;
        let j = (r % g.kw) as isize;
        let plane = &x[c * g.h * w..(c + 1) * g.h * w];
        // Output rows whose input row oh + i - p is inside the image.
        let oh_lo = (p - i).max(0) as usize;
        let oh_hi = ((g.h as isize + p - i).max(0) as usize).min(g.ho);
        let shift = (i - p) * w as isize + (j - p);
        // Pixels q of the tile in valid rows whose source index is inside the plane.
        let qa = (p0.max(oh_lo * w) as isize).max(-shift);
        let qb = (p1.min(oh_hi * w) as isize).min(plane_len - shift);
        if qa < qb {
            let (qa, qb) = (qa as usize, qb as usize);
            let src = (qa as isize + shift) as usize;
            dst[..qa - p0].fill(T::ZERO);
            dst[qa - p0..qb - p0].copy_from_slice(&plane[src..src + (qb - qa)]);
            dst[qb - p0..].fill(T::ZERO);
            // Edge columns of the valid rows: the tap is in the padding.
            let (lo, hi) = g.valid_cols(j as usize);
            for oh in (qa / w)..qb.div_ceil(w) {
                let base = oh * w;
                for ow in (0..lo).chain(hi..w) {
                    let q = base + ow;
                    if q >= qa && q < qb {
                        dst[q - p0] = T::ZERO;
                    }
                }
            }
        } else {
            dst.fill(T::ZERO);
        }
    }
}

/// Adds columns `p0..p1` of column rows back onto their pixels: the adjoint of [`im2col`].
/// `dx`: the rows' channels' `[rows / (kh * kw), h, w]` planes, already initialised.
pub(crate) fn col2im_add<T: Elem>(g: &Geom, col: &[T], p0: usize, p1: usize, dx: &mut [T]) {
    col2im_simd(g, col, p0, p1, dx)
}

#[inline(always)]
fn col2im_impl<T: Elem>(g: &Geom, col: &[T], p0: usize, p1: usize, dx: &mut [T]) {
    let nt = p1 - p0;
    let (s, p) = (g.stride, g.pad);
    for (r, src) in col.chunks_exact(nt).enumerate() {
        let c = r / (g.kh * g.kw);
        let i = (r / g.kw) % g.kh;
        let j = r % g.kw;
        let (lo, hi) = g.valid_cols(j);
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for oh in p0 / g.wo..p1.div_ceil(g.wo) {
            let Some(ih) = g.src_row(oh, i) else {
                continue;
            };
            let base = oh * g.wo;
            let (a, b) = (p0.max(base) - base, p1.min(base + g.wo) - base);
            let (vl, vh) = (lo.clamp(a, b), hi.clamp(a, b));
            if vl >= vh {
                continue;
            }
            let sr = &src[base + vl - p0..base + vh - p0];
            let dst = &mut plane[ih * g.w..(ih + 1) * g.w];
            let first = vl * s + j - p;
            if s == 1 {
                for (d, v) in dst[first..first + (vh - vl)].iter_mut().zip(sr) {
                    *d += *v;
                }
            } else {
                for (k, v) in sr.iter().enumerate() {
                    dst[first + k * s] += *v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_width_fast_path_matches_row_segments() {
        for (h, w, k) in [
            (5, 7, 3),
            (4, 4, 5),
            (9, 3, 3),
            (1, 6, 3),
            (6, 6, 1),
            (3, 2, 5),
        ] {
            let p = k / 2;
            let g = Geom {
                cin: 2,
                h,
                w,
                kh: k,
                kw: k,
                stride: 1,
                pad: p,
                ho: h,
                wo: w,
            };
            let x: Vec<f32> = (0..2 * h * w).map(|v| v as f32 + 1.0).collect();
            let n = g.n();
            for (p0, p1) in [(0, n), (1, n - 1), (n / 3, n / 2 + 1), (0, 1)] {
                let len = g.k() * (p1 - p0);
                let (mut a, mut b) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                im2col_same(&g, &x, p0, p1, &mut a);
                im2col_rows(&g, &x, p0, p1, &mut b);
                assert_eq!(a, b, "h {h} w {w} k {k} tile {p0}..{p1}");
            }
        }
    }
}
