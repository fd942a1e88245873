//! Unfolding one example's feature map into GEMM columns, and folding columns back.
//!
//! Layout (Caffe's): `col[(c * kh + i) * kw + j][oh * wo + ow] = x[c][oh * s + i - p][ow * s + j - p]`
//! (zero outside the image). With the kernel rows first, the forward product `W . col` lands in
//! NCHW order with no transpose, and each column row is a handful of contiguous copies.

use crate::elem::Elem;

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

    fn src_row(&self, oh: usize, i: usize) -> Option<usize> {
        let ih = oh * self.stride + i;
        (ih >= self.pad && ih - self.pad < self.h).then(|| ih - self.pad)
    }
}

/// Writes the column rows of some consecutive input channels of one example.
/// `x`: those channels' `[rows / (kh * kw), h, w]` planes; `col`: the rows to fill, `n()` long.
pub(crate) fn im2col<T: Elem>(g: &Geom, x: &[T], col: &mut [T]) {
    let n = g.n();
    let (s, p) = (g.stride, g.pad);
    for (r, dst) in col.chunks_exact_mut(n).enumerate() {
        let c = r / (g.kh * g.kw);
        let i = (r / g.kw) % g.kh;
        let j = r % g.kw;
        let (lo, hi) = g.valid_cols(j);
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for (oh, d) in dst.chunks_exact_mut(g.wo).enumerate() {
            let Some(ih) = g.src_row(oh, i) else {
                d.fill(T::ZERO);
                continue;
            };
            let src = &plane[ih * g.w..(ih + 1) * g.w];
            d[..lo].fill(T::ZERO);
            d[hi..].fill(T::ZERO);
            if lo < hi {
                let first = lo * s + j - p;
                if s == 1 {
                    d[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                } else {
                    for (k, v) in d[lo..hi].iter_mut().enumerate() {
                        *v = src[first + k * s];
                    }
                }
            }
        }
    }
}

/// Adds column rows back onto their pixels: the adjoint of [`im2col`].
/// `dx`: the rows' channels' `[rows / (kh * kw), h, w]` planes, already initialised.
pub(crate) fn col2im_add<T: Elem>(g: &Geom, col: &[T], dx: &mut [T]) {
    let n = g.n();
    let (s, p) = (g.stride, g.pad);
    let taps = g.kh * g.kw;
    for (r, src) in col.chunks_exact(n).enumerate() {
        let c = r / taps;
        let i = (r / g.kw) % g.kh;
        let j = r % g.kw;
        let (lo, hi) = g.valid_cols(j);
        if lo >= hi {
            continue;
        }
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for (oh, sr) in src.chunks_exact(g.wo).enumerate() {
            let Some(ih) = g.src_row(oh, i) else {
                continue;
            };
            let dst = &mut plane[ih * g.w..(ih + 1) * g.w];
            let first = lo * s + j - p;
            if s == 1 {
                for (d, v) in dst[first..first + (hi - lo)].iter_mut().zip(&sr[lo..hi]) {
                    *d += *v;
                }
            } else {
                for (k, v) in sr[lo..hi].iter().enumerate() {
                    dst[first + k * s] += *v;
                }
            }
        }
    }
}
