//! Winograd F(4x4, 3x3) for 3x3, stride-1, padding-1 convolutions (Lavin & Gray, 2016, with
//! the interpolation points 0, +-1, +-2, infinity).
//!
//! The same scheme as [`super::F2`]'s F(2x2, 3x3), with 4x4 output tiles read from 6x6
//! input tiles: `y = A^T [(G g G^T) * (B^T d B)] A`, i.e. 36 GEMMs `M[k] = U[k] . V[k]` per
//! block of tiles instead of 16. Per output pixel that is 36/16 = 2.25 multiply-adds per input
//! channel instead of 4 (F(2x2)) or 9 (direct), and the transformed input is 2.25x the input
//! instead of 4x. The price is larger rounding error (the transforms have entries up to 8, and
//! 1/24 in G; in f32 the results stay within the equality tests' 2e-5 of candle's direct
//! convolution, up to 256-channel reductions) and heavier transforms.
//!
//! The transforms work on structure-of-arrays buffers `[36][tiles of the block]`, so every
//! arithmetic loop runs over a block's tiles (up to 512) and vectorises whatever the image
//! width; tiles are gathered from a zero-padded copy of each image plane, so there is no
//! bounds test per tile.

use super::gathered::TileForms;
use super::lanes::Arith;
use super::{kernel_grads, kernel_planes, KernelForms, SharedOut, Tiles};
use crate::elem::Elem;

/// Planes of transformed data: 6x6 per tile.
const P: usize = 36;

/// F(4x4, 3x3).
pub(crate) struct F4;

// Blocks of up to 4 MiB, larger than L2, where 1 MiB would leave fewer than 128 tiles (many
// channels): fewer, wider GEMMs (bench/RESULTS.md).
impl_variant!(F4 {
    M: 4,
    PLANES: P,
    BLOCK_BYTES: 1 << 22,
    MIN_BLOCK: 16
});

/// `B^T d` for a 6-vector `d` (of scalars or of vectors of tiles).
#[inline(always)]
fn bt6<X: Arith>(d: [X; 6]) -> [X; 6] {
    let (c2, c4, c5) = (X::k(2.0), X::k(4.0), X::k(5.0));
    let [a0, a1, a2, a3, a4, a5] = d;
    [
        c4 * a0 - c5 * a2 + a4,
        a3 + a4 - c4 * (a1 + a2),
        c4 * (a1 - a2) - a3 + a4,
        c2 * (a3 - a1) - a2 + a4,
        c2 * (a1 - a3) - a2 + a4,
        c4 * a1 - c5 * a3 + a5,
    ]
}

/// `A^T m` for a 6-vector `m`: 4 results.
#[inline(always)]
fn at6<X: Arith>(m: [X; 6]) -> [X; 4] {
    let (c2, c4, c8) = (X::k(2.0), X::k(4.0), X::k(8.0));
    let (s12, d12) = (m[1] + m[2], m[1] - m[2]);
    let (s34, d34) = (m[3] + m[4], m[3] - m[4]);
    [
        m[0] + s12 + s34,
        d12 + c2 * d34,
        s12 + c4 * s34,
        d12 + c8 * d34 + m[5],
    ]
}

/// `A y` for a 4-vector `y`: 6 results.
#[inline(always)]
fn a4<X: Arith>(y: [X; 4]) -> [X; 6] {
    let (c2, c4, c8) = (X::k(2.0), X::k(4.0), X::k(8.0));
    let [a0, a1, a2, a3] = y;
    let (e, od) = (a0 + a2, a1 + a3);
    let (e2, od2) = (a0 + c4 * a2, c2 * a1 + c8 * a3);
    [a0, e + od, e - od, e2 + od2, e2 - od2, a3]
}

/// [`bt6`] elementwise over the slices.
#[inline(always)]
fn apply_bt<T: Elem>(d: [&[T]; 6], o: [&mut [T]; 6]) {
    let n = o[0].len();
    let d: [&[T]; 6] = d.map(|s| &s[..n]);
    let [o0, o1, o2, o3, o4, o5] = o;
    let (o1, o2, o3, o4, o5) = (
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for k in 0..n {
        let r = bt6(std::array::from_fn(|i| d[i][k]));
        (o0[k], o1[k], o2[k], o3[k], o4[k], o5[k]) = (r[0], r[1], r[2], r[3], r[4], r[5]);
    }
}

/// [`at6`] elementwise over the slices.
#[inline(always)]
fn apply_at<T: Elem>(m: [&[T]; 6], o: [&mut [T]; 4]) {
    let n = o[0].len();
    let m: [&[T]; 6] = m.map(|s| &s[..n]);
    let [o0, o1, o2, o3] = o;
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for k in 0..n {
        let r = at6(std::array::from_fn(|i| m[i][k]));
        (o0[k], o1[k], o2[k], o3[k]) = (r[0], r[1], r[2], r[3]);
    }
}

/// [`a4`] elementwise over the slices.
#[inline(always)]
fn apply_a<T: Elem>(y: [&[T]; 4], o: [&mut [T]; 6]) {
    let n = o[0].len();
    let y: [&[T]; 4] = y.map(|s| &s[..n]);
    let [o0, o1, o2, o3, o4, o5] = o;
    let (o1, o2, o3, o4, o5) = (
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for k in 0..n {
        let r = a4(std::array::from_fn(|i| y[i][k]));
        (o0[k], o1[k], o2[k], o3[k], o4[k], o5[k]) = (r[0], r[1], r[2], r[3], r[4], r[5]);
    }
}

/// `G g` for 3-vectors: 6 results.
#[inline(always)]
fn g_col<X: Arith>(a: X, b: X, cc: X) -> [X; 6] {
    let (q, s, t) = (X::k(0.25), X::k(1.0 / 6.0), X::k(1.0 / 24.0));
    let tw = X::k(1.0 / 12.0);
    [
        q * a,
        -s * (a + b + cc),
        -s * (a - b + cc),
        t * a + tw * b + s * cc,
        t * a - tw * b + s * cc,
        cc,
    ]
}

/// `G^T u` for 6-vectors: 3 results.
#[inline(always)]
fn gt_col<X: Arith>(u: [X; 6]) -> [X; 3] {
    let (q, s, t) = (X::k(0.25), X::k(1.0 / 6.0), X::k(1.0 / 24.0));
    let tw = X::k(1.0 / 12.0);
    [
        q * u[0] - s * (u[1] + u[2]) + t * (u[3] + u[4]),
        s * (u[2] - u[1]) + tw * (u[3] - u[4]),
        s * (u[3] + u[4] - u[1] - u[2]) + u[5],
    ]
}

impl KernelForms<P> for F4 {
    #[inline(always)]
    fn u<X: Arith>(g: [X; 9]) -> [X; P] {
        // Columns, then rows: t = G g (6x3), u = t G^T (6x6).
        let mut cols = [[X::k(0.0); 6]; 3];
        for s in 0..3 {
            cols[s] = g_col(g[s], g[3 + s], g[6 + s]);
        }
        let mut u = [X::k(0.0); P];
        for r in 0..6 {
            let row = g_col(cols[0][r], cols[1][r], cols[2][r]);
            u[r * 6..r * 6 + 6].copy_from_slice(&row);
        }
        u
    }

    #[inline(always)]
    fn dg<X: Arith>(du: [X; P]) -> [X; 9] {
        // Rows first: t[r] = G^T applied to row r of dU (6x3), then down the columns.
        let mut t = [[X::k(0.0); 3]; 6];
        for r in 0..6 {
            let row = [
                du[r * 6],
                du[r * 6 + 1],
                du[r * 6 + 2],
                du[r * 6 + 3],
                du[r * 6 + 4],
                du[r * 6 + 5],
            ];
            t[r] = gt_col(row);
        }
        let mut out = [X::k(0.0); 9];
        for s in 0..3 {
            let col = gt_col([t[0][s], t[1][s], t[2][s], t[3][s], t[4][s], t[5][s]]);
            for r in 0..3 {
                out[r * 3 + s] = col[r];
            }
        }
        out
    }
}

/// `U[k][co][ci] = (G g G^T)[k]` for `w` `[cout, cin, 3, 3]`; 36 planes `[cout, cin]`.
fn kernel_transform<T: Elem>(w: &[T], cout: usize, cin: usize) -> Vec<T> {
    kernel_planes::<T, F4, P>(w, cout * cin)
}

/// `dg = G^T dU G` for 36 planes `[cout, cin]`; returns `[cout, cin, 3, 3]`.
fn kernel_grad_transform<T: Elem>(du: &[T], cout: usize, cin: usize) -> Vec<T> {
    kernel_grads::<T, F4, P>(du, cout * cin)
}

/// `n` disjoint mutable windows of `len` values of `v` at increasing offsets.
#[inline(always)]
fn windows_mut<T, const N: usize>(v: &mut [T], o: [usize; N], len: usize) -> [&mut [T]; N] {
    let mut rest = v;
    let mut base = 0;
    let mut out: [Option<&mut [T]>; N] = std::array::from_fn(|_| None);
    for (i, &off) in o.iter().enumerate() {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - base);
        let (win, tail) = tail.split_at_mut(len);
        out[i] = Some(win);
        rest = tail;
        base = off + len;
    }
    out.map(|w| w.expect("every window set"))
}

/// Gathers each tile's `S x S` input patch from channel `ci` of `src` (`[b, c, h, w]`) into
/// `d[(r * S + p) * ld + j]` (`j`: the tile's index in the block, `ld` = `d.len() / S^2`).
/// Patches start at pixel `(4 ty - off, 4 tx - off)`. Each example's plane is first copied into
/// `pad`, zero-padded (`off` zero rows/columns before, enough after), so the gather itself has
/// no bounds tests.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gather<T: Elem, const S: usize>(
    src: &[T],
    c: usize,
    ci: usize,
    tl: &Tiles,
    runs: &[(usize, usize, usize)],
    blk0: usize,
    off: usize,
    pad: &mut Vec<T>,
    d: &mut [T],
) {
    let ld = d.len() / (S * S);
    let (ph, pw) = (4 * tl.th + 2, 4 * tl.tw + 2);
    pad.resize(ph * pw, T::ZERO);
    for &(e, t0, t1) in runs {
        let img = &src[(e * c + ci) * tl.h * tl.w..(e * c + ci + 1) * tl.h * tl.w];
        pad[..off * pw].fill(T::ZERO);
        for y in 0..tl.h {
            let row = &mut pad[(y + off) * pw..(y + off + 1) * pw];
            row[..off].fill(T::ZERO);
            row[off..off + tl.w].copy_from_slice(&img[y * tl.w..(y + 1) * tl.w]);
            row[off + tl.w..].fill(T::ZERO);
        }
        pad[(tl.h + off) * pw..].fill(T::ZERO);
        for tt in t0..t1 {
            let (j, r0) = (tt - blk0, tt - e * tl.per);
            let base = 4 * (r0 / tl.tw) * pw + 4 * (r0 % tl.tw);
            for r in 0..S {
                let patch = &pad[base + r * pw..base + r * pw + S];
                for (p, &val) in patch.iter().enumerate() {
                    d[(r * S + p) * ld + j] = val;
                }
            }
        }
    }
}

/// `V = B^T d B` of the block's tiles of `x` (`[b, c, h, w]`) into 36 planes `[c, ld]`.
#[inline(always)]
fn input_scalar<T: Elem>(x: &[T], c: usize, tl: &Tiles, blk: (usize, usize), v: &mut [T]) {
    let ld = blk.1 - blk.0;
    let plane = c * ld;
    let mut pad = Vec::new();
    let mut d = vec![T::ZERO; P * ld];
    let mut t = vec![T::ZERO; P * ld];
    let runs = tl.example_runs(blk);
    for ci in 0..c {
        // d[r * 6 + p][j] = tile j's input (r, p), from one zero row/column before the image.
        gather::<T, 6>(x, c, ci, tl, &runs, blk.0, 1, &mut pad, &mut d);
        // Down the columns: t[p][i] = (B^T d)[i][p], stored as [p * 6 + i].
        for p in 0..6 {
            let ins: [&[T]; 6] =
                std::array::from_fn(|r| &d[(r * 6 + p) * ld..(r * 6 + p + 1) * ld]);
            let outs = windows_mut(&mut t, std::array::from_fn(|i| (p * 6 + i) * ld), ld);
            apply_bt(ins, outs);
        }
        // Along the rows, into the planes: V[i * 6 + q] = sum_p t[p][i] B[p][q].
        for i in 0..6 {
            let ins: [&[T]; 6] =
                std::array::from_fn(|p| &t[(p * 6 + i) * ld..(p * 6 + i + 1) * ld]);
            let outs = windows_mut(
                v,
                std::array::from_fn(|q| (i * 6 + q) * plane + ci * ld),
                ld,
            );
            apply_bt(ins, outs);
        }
    }
}

/// `dM = A dY A^T` of the block's tiles of `dy` (`[b, c, h, w]`) into 36 planes `[c, ld]`.
#[inline(always)]
fn grad_output_scalar<T: Elem>(dy: &[T], c: usize, tl: &Tiles, blk: (usize, usize), dm: &mut [T]) {
    let ld = blk.1 - blk.0;
    let plane = c * ld;
    let mut pad = Vec::new();
    let mut d = vec![T::ZERO; 16 * ld];
    let mut t = vec![T::ZERO; 24 * ld];
    let runs = tl.example_runs(blk);
    for ci in 0..c {
        // d[r * 4 + s][j] = tile j's output gradient (r, s), zero beyond the image.
        gather::<T, 4>(dy, c, ci, tl, &runs, blk.0, 0, &mut pad, &mut d);
        // Down the columns: t[s][i] = (A dY)[i][s], stored as [s * 6 + i].
        for s in 0..4 {
            let ins: [&[T]; 4] =
                std::array::from_fn(|r| &d[(r * 4 + s) * ld..(r * 4 + s + 1) * ld]);
            let outs = windows_mut(&mut t, std::array::from_fn(|i| (s * 6 + i) * ld), ld);
            apply_a(ins, outs);
        }
        // Along the rows: dM[i * 6 + q] = sum_s t[s][i] A[q][s].
        for i in 0..6 {
            let ins: [&[T]; 4] =
                std::array::from_fn(|s| &t[(s * 6 + i) * ld..(s * 6 + i + 1) * ld]);
            let outs = windows_mut(
                dm,
                std::array::from_fn(|q| (i * 6 + q) * plane + ci * ld),
                ld,
            );
            apply_a(ins, outs);
        }
    }
}

/// `y = A^T M A (+ bias)` for the block's tiles from 36 planes `[c, ld]`, written into `y`
/// (`[b, c, h, w]`; each pixel belongs to one tile, so blocks write disjoint pixels).
#[inline(always)]
fn output_scalar<T: Elem>(
    m: &[T],
    c: usize,
    tl: &Tiles,
    blk: (usize, usize),
    y: SharedOut<T>,
    bias: Option<(&[T], usize)>,
) {
    let ld = blk.1 - blk.0;
    let plane = c * ld;
    let mut t = vec![T::ZERO; 24 * ld];
    let mut o = vec![T::ZERO; 16 * ld];
    let runs = tl.example_runs(blk);
    for co in 0..c {
        // Down the columns: t[q][r] = (A^T M)[r][q], stored as [q * 4 + r].
        for q in 0..6 {
            let ins: [&[T]; 6] = std::array::from_fn(|i| {
                let off = (i * 6 + q) * plane + co * ld;
                &m[off..off + ld]
            });
            let outs = windows_mut(&mut t, std::array::from_fn(|r| (q * 4 + r) * ld), ld);
            apply_at(ins, outs);
        }
        // Along the rows: o[r * 4 + s] = sum_q t[q][r] A[q][s].
        for r in 0..4 {
            let ins: [&[T]; 6] =
                std::array::from_fn(|q| &t[(q * 4 + r) * ld..(q * 4 + r + 1) * ld]);
            let outs = windows_mut(&mut o, std::array::from_fn(|s| (r * 4 + s) * ld), ld);
            apply_at(ins, outs);
        }
        for &(e, t0, t1) in &runs {
            let b = bias.map_or(T::ZERO, |(b, stride)| b[e * stride + co]);
            let base = (e * c + co) * tl.h * tl.w;
            for tt in t0..t1 {
                let (j, r0) = (tt - blk.0, tt - e * tl.per);
                let (y0, x0) = (4 * (r0 / tl.tw), 4 * (r0 % tl.tw));
                let (rows, cols) = ((tl.h - y0).min(4), (tl.w - x0).min(4));
                for r in 0..rows {
                    // SAFETY: row y0 + r < h, columns x0..x0 + cols <= w of the output plane;
                    // only this tile writes them.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(y.0.add(base + (y0 + r) * tl.w + x0), cols)
                    };
                    for (s, out) in dst.iter_mut().enumerate() {
                        *out = o[(r * 4 + s) * ld + j] + b;
                    }
                }
            }
        }
    }
}

/// The tile transforms' formulas, for the gathered transforms ([`super::gathered`]).
impl TileForms<6, 4> for F4 {
    #[inline(always)]
    fn bt<X: Arith>(d: [X; 6]) -> [X; 6] {
        bt6(d)
    }
    #[inline(always)]
    fn at<X: Arith>(m: [X; 6]) -> [X; 4] {
        at6(m)
    }
    /// Down the columns first, as [`grad_output_scalar`].
    #[inline(always)]
    fn grad<X: Arith>(d: [[X; 4]; 4]) -> [[X; 6]; 6] {
        let t = [a4(d[0]), a4(d[1]), a4(d[2]), a4(d[3])];
        let mut o = [[X::k(0.0); 6]; 6];
        for (i, oi) in o.iter_mut().enumerate() {
            *oi = a4([t[0][i], t[1][i], t[2][i], t[3][i]]);
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::super::gathered::{self, check};
    use super::*;

    /// Every gathered F(4x4) transform gives bitwise the scalar one's results, on every
    /// instruction set this CPU has.
    #[test]
    fn gathered_transforms_match_the_scalar_ones_bitwise() {
        check::gathered_match_scalar(&check::Variant {
            m: 4,
            planes: P,
            input: (input_scalar::<f32>, gathered::input::<f32, F4, 6, 4>),
            grad_output: (
                grad_output_scalar::<f32>,
                gathered::grad_output::<f32, F4, 6, 4>,
            ),
            output: (output_scalar::<f32>, gathered::output::<f32, F4, 6, 4>),
        });
    }

    /// The vector kernel transforms match the scalar ones bitwise.
    #[test]
    fn vector_kernel_transforms_match_the_scalar_ones_bitwise() {
        check::kernel_forms_match::<F4, P>();
    }
}
