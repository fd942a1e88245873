//! Winograd F(2x2, 3x3): 4x4 input tiles, 16 planes. Per output pixel and input channel 4
//! multiply-adds instead of 9 (direct); the transformed input is 4x the input.
//!
//! The transforms are vectorised over the tiles of a tile row: each input row is split into its
//! even and odd (padded) columns, so that tile `k` reads columns `2k .. 2k + 3` as `even[k],
//! odd[k], even[k + 1], odd[k + 1]`.

use super::gathered::TileForms;
use super::lanes::Arith;
use super::{kernel_grads, kernel_planes, KernelForms, SharedOut, Tiles};
use crate::elem::Elem;

/// F(2x2, 3x3).
pub(crate) struct F2;

impl_variant!(F2 {
    M: 2,
    PLANES: 16,
    BLOCK_BYTES: 1 << 20,
    MIN_BLOCK: 32
});

/// `G g` for 3-vectors: 4 results.
#[inline(always)]
fn g_col<X: Arith>(a: X, b: X, c: X) -> [X; 4] {
    let half = X::k(0.5);
    [a, half * (a + b + c), half * (a - b + c), c]
}

/// `G^T u` for 4-vectors: 3 results.
#[inline(always)]
fn gt_col<X: Arith>(u: [X; 4]) -> [X; 3] {
    let half = X::k(0.5);
    [
        u[0] + half * (u[1] + u[2]),
        half * (u[1] - u[2]),
        half * (u[1] + u[2]) + u[3],
    ]
}

impl KernelForms<16> for F2 {
    #[inline(always)]
    fn u<X: Arith>(g: [X; 9]) -> [X; 16] {
        // Columns, then rows: t = G g (4x3), u = t G^T (4x4).
        let mut cols = [[X::k(0.0); 4]; 3];
        for s in 0..3 {
            cols[s] = g_col(g[s], g[3 + s], g[6 + s]);
        }
        let mut u = [X::k(0.0); 16];
        for r in 0..4 {
            u[r * 4..r * 4 + 4].copy_from_slice(&g_col(cols[0][r], cols[1][r], cols[2][r]));
        }
        u
    }

    #[inline(always)]
    fn dg<X: Arith>(du: [X; 16]) -> [X; 9] {
        // Rows first: t[r] = G^T applied to row r of dU (4x3), then down the columns.
        let mut t = [[X::k(0.0); 3]; 4];
        for r in 0..4 {
            t[r] = gt_col([du[r * 4], du[r * 4 + 1], du[r * 4 + 2], du[r * 4 + 3]]);
        }
        let mut out = [X::k(0.0); 9];
        for s in 0..3 {
            let col = gt_col([t[0][s], t[1][s], t[2][s], t[3][s]]);
            for r in 0..3 {
                out[r * 3 + s] = col[r];
            }
        }
        out
    }
}

/// `U[k][co][ci] = (G g G^T)[k]` for `w` `[cout, cin, 3, 3]`; 16 planes `[cout, cin]`.
fn kernel_transform<T: Elem>(w: &[T], cout: usize, cin: usize) -> Vec<T> {
    kernel_planes::<T, F2, 16>(w, cout * cin)
}

/// `dg = G^T dU G` for 16 planes `[cout, cin]`; returns `[cout, cin, 3, 3]`.
fn kernel_grad_transform<T: Elem>(du: &[T], cout: usize, cin: usize) -> Vec<T> {
    kernel_grads::<T, F2, 16>(du, cout * cin)
}

/// `B^T d` for a 4-vector `d` (of scalars or of vectors of tiles).
#[inline(always)]
fn bt4<X: Arith>(d: [X; 4]) -> [X; 4] {
    let [d0, d1, d2, d3] = d;
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// `A^T m` for a 4-vector `m`: 2 results.
#[inline(always)]
fn at4<X: Arith>(m: [X; 4]) -> [X; 2] {
    [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
}

/// `A y` for a 2-vector `y`: 4 results.
#[inline(always)]
fn a2<X: Arith>(y: [X; 2]) -> [X; 4] {
    [y[0], y[0] + y[1], y[0] - y[1], -y[1]]
}

/// Splits tiles `t0..t1` into runs within one tile row: `(example, tile row, first tile
/// column, count, offset of the run in the block)`.
fn row_runs(
    tl: &Tiles,
    (t0, t1): (usize, usize),
) -> impl Iterator<Item = (usize, usize, usize, usize, usize)> + '_ {
    let mut t = t0;
    std::iter::from_fn(move || {
        (t < t1).then(|| {
            let (e, ty, tx0) = tl.locate(t);
            let n = (tl.tw - tx0).min(t1 - t);
            let run = (e, ty, tx0, n, t - t0);
            t += n;
            run
        })
    })
}

/// Four disjoint `len`-long windows of `v` at increasing offsets `o[0] < o[1] < o[2] < o[3]`.
#[inline(always)]
fn four_mut<T>(v: &mut [T], o: [usize; 4], len: usize) -> [&mut [T]; 4] {
    let (a, rest) = v[o[0]..].split_at_mut(o[1] - o[0]);
    let (b, rest) = rest.split_at_mut(o[2] - o[1]);
    let (c, d) = rest.split_at_mut(o[3] - o[2]);
    [&mut a[..len], &mut b[..len], &mut c[..len], &mut d[..len]]
}

/// `V = B^T d B` of tiles `t0..t1` of `x` (`[b, c, h, w]`) into 16 planes `[c, ld]`.
///
/// Vectorised over the tiles of a row: each of the 4 input rows is split into its even and odd
/// (padded) columns, the vertical transform combines those rows, and tile `k` of the horizontal
/// one reads even[k], odd[k], even[k+1], odd[k+1].
#[inline(always)]
fn input_scalar<T: Elem>(x: &[T], c: usize, tl: &Tiles, blk: (usize, usize), v: &mut [T]) {
    let ld = blk.1 - blk.0;
    let plane = c * ld;
    // Rows padded to whole 8-lane vectors: the vertical step runs over all of them (entries
    // past n + 1 are never read back), so it has no scalar remainder.
    let cap = (tl.tw + 1).next_multiple_of(8);
    // Even / odd padded columns of the 4 input rows, then of the 4 rows of B^T d.
    let mut re = vec![T::ZERO; 4 * cap];
    let mut ro = vec![T::ZERO; 4 * cap];
    let mut ev = vec![T::ZERO; 4 * cap];
    let mut od = vec![T::ZERO; 4 * cap];
    for (e, ty, tx0, n, j0) in row_runs(tl, blk) {
        // Padded column 2k + i of the run is image column 2 * tx0 - 1 + 2k + i, so image
        // columns (2(tx0 + k), 2(tx0 + k) + 1) are (odd[k], even[k + 1]).
        let x0 = 2 * tx0;
        let avail = (tl.w - x0).min(2 * n + 1);
        for ci in 0..c {
            let img = &x[(e * c + ci) * tl.h * tl.w..(e * c + ci + 1) * tl.h * tl.w];
            for r in 0..4 {
                let (re_r, ro_r) = (
                    &mut re[r * cap..r * cap + n + 1],
                    &mut ro[r * cap..r * cap + n + 1],
                );
                let yy = 2 * ty as isize - 1 + r as isize;
                if yy < 0 || yy >= tl.h as isize {
                    re_r.fill(T::ZERO);
                    ro_r.fill(T::ZERO);
                    continue;
                }
                let src = &img[yy as usize * tl.w..(yy as usize + 1) * tl.w];
                re_r[0] = if tx0 > 0 { src[x0 - 1] } else { T::ZERO };
                let run = &src[x0..x0 + avail];
                let pairs = run.chunks_exact(2);
                let tail = pairs.remainder();
                let full = avail / 2;
                for ((o, e1), pair) in ro_r.iter_mut().zip(re_r[1..].iter_mut()).zip(pairs) {
                    *o = pair[0];
                    *e1 = pair[1];
                }
                // The rest: one image column (odd[full]) or none, then zeros.
                if let Some(&last) = tail.first() {
                    ro_r[full] = last;
                    re_r[full + 1..].fill(T::ZERO);
                    ro_r[full + 1..].fill(T::ZERO);
                } else {
                    re_r[full + 1..].fill(T::ZERO);
                    ro_r[full..].fill(T::ZERO);
                }
            }
            // Vertical B^T: (d0 - d2, d1 + d2, d2 - d1, d1 - d3) on even and odd columns.
            for (src, dst) in [(&re, &mut ev), (&ro, &mut od)] {
                let (d0, rest) = src.split_at(cap);
                let (d1, rest) = rest.split_at(cap);
                let (d2, d3) = rest.split_at(cap);
                let len = (n + 1).next_multiple_of(8);
                let [q0, q1, q2, q3] = four_mut(dst, [0, cap, 2 * cap, 3 * cap], len);
                let (d0, d1, d2, d3) = (&d0[..len], &d1[..len], &d2[..len], &d3[..len]);
                for k in 0..len {
                    [q0[k], q1[k], q2[k], q3[k]] = bt4([d0[k], d1[k], d2[k], d3[k]]);
                }
            }
            // Horizontal B per row q: (E[k] - E[k+1], O[k] + E[k+1], E[k+1] - O[k], O[k] - O[k+1]).
            for q in 0..4 {
                let (e0, e1) = (&ev[q * cap..q * cap + n], &ev[q * cap + 1..q * cap + n + 1]);
                let (o0, o1) = (&od[q * cap..q * cap + n], &od[q * cap + 1..q * cap + n + 1]);
                let at = |p: usize| (q * 4 + p) * plane + ci * ld + j0;
                let [v0, v1, v2, v3] = four_mut(v, [at(0), at(1), at(2), at(3)], n);
                for k in 0..n {
                    [v0[k], v1[k], v2[k], v3[k]] = bt4([e0[k], o0[k], e1[k], o1[k]]);
                }
            }
        }
    }
}

/// `dM = A dY A^T` of tiles `t0..t1` of `dy` (`[b, c, h, w]`) into 16 planes `[c, ld]`.
/// With a tile's outputs `p = dY[2k]`, `q = dY[2k + 1]` in a row, `A (p, q) = (p, p + q,
/// p - q, -q)`; vectorised over the tiles of a row as [`input_transform`].
#[inline(always)]
fn grad_output_scalar<T: Elem>(dy: &[T], c: usize, tl: &Tiles, blk: (usize, usize), dm: &mut [T]) {
    let ld = blk.1 - blk.0;
    let plane = c * ld;
    let cap = tl.tw;
    // Even / odd columns of the tile's two output rows (zero beyond the image).
    let mut pe = vec![T::ZERO; 2 * cap];
    let mut po = vec![T::ZERO; 2 * cap];
    for (e, ty, tx0, n, j0) in row_runs(tl, blk) {
        for ci in 0..c {
            let img = &dy[(e * c + ci) * tl.h * tl.w..(e * c + ci + 1) * tl.h * tl.w];
            for r in 0..2 {
                let (er, or) = (&mut pe[r * cap..r * cap + n], &mut po[r * cap..r * cap + n]);
                let yy = 2 * ty + r;
                if yy >= tl.h {
                    er.fill(T::ZERO);
                    or.fill(T::ZERO);
                    continue;
                }
                let x0 = 2 * tx0;
                let avail = (tl.w - x0).min(2 * n);
                let row = &img[yy * tl.w + x0..yy * tl.w + x0 + avail];
                let pairs = avail / 2;
                for ((a, b), pair) in er.iter_mut().zip(or.iter_mut()).zip(row.chunks_exact(2)) {
                    *a = pair[0];
                    *b = pair[1];
                }
                if pairs < n {
                    // Odd width: the last tile has one column inside.
                    er[pairs] = row[2 * pairs];
                    or[pairs] = T::ZERO;
                }
            }
            // Along the columns: (p, p + q, p - q, -q) per row, then the same down the 2 rows.
            for s in 0..4 {
                let col = |r: usize, k: usize| a2([pe[r * cap + k], po[r * cap + k]])[s];
                let at = |r: usize| (r * 4 + s) * plane + ci * ld + j0;
                let [d0, d1, d2, d3] = four_mut(dm, [at(0), at(1), at(2), at(3)], n);
                for k in 0..n {
                    [d0[k], d1[k], d2[k], d3[k]] = a2([col(0, k), col(1, k)]);
                }
            }
        }
    }
}

/// `y = A^T M A (+ bias)` for tiles `t0..t1` from 16 planes `[c, ld]`, written into `y`
/// (`[b, c, h, w]`, see [`SharedOut`]); vectorised over the tiles of a row.
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
    let cap = tl.tw;
    // s[r][p][k]: row r of A^T M for tile k, column p.
    let mut sv = vec![T::ZERO; 2 * 4 * cap];
    let mut even = vec![T::ZERO; cap];
    let mut odd = vec![T::ZERO; cap];
    for (e, ty, tx0, n, j0) in row_runs(tl, blk) {
        for co in 0..c {
            let mm = |r: usize, p: usize| {
                let o = (r * 4 + p) * plane + co * ld + j0;
                &m[o..o + n]
            };
            for p in 0..4 {
                let (m0, m1, m2, m3) = (mm(0, p), mm(1, p), mm(2, p), mm(3, p));
                let (s0, s1) = sv.split_at_mut(4 * cap);
                let (s0, s1) = (&mut s0[p * cap..p * cap + n], &mut s1[p * cap..p * cap + n]);
                for k in 0..n {
                    [s0[k], s1[k]] = at4([m0[k], m1[k], m2[k], m3[k]]);
                }
            }
            let b = bias.map_or(T::ZERO, |(b, stride)| b[e * stride + co]);
            let base = (e * c + co) * tl.h * tl.w;
            for r in 0..2 {
                let yy = 2 * ty + r;
                if yy >= tl.h {
                    break;
                }
                let s = &sv[r * 4 * cap..(r + 1) * 4 * cap];
                let (s0, s1, s2, s3) = (
                    &s[..n],
                    &s[cap..cap + n],
                    &s[2 * cap..2 * cap + n],
                    &s[3 * cap..3 * cap + n],
                );
                let (ev, ov) = (&mut even[..n], &mut odd[..n]);
                for k in 0..n {
                    let [e, o] = at4([s0[k], s1[k], s2[k], s3[k]]);
                    (ev[k], ov[k]) = (e + b, o + b);
                }
                let x0 = 2 * tx0;
                let len = (tl.w - x0).min(2 * n);
                // SAFETY: row yy < h and columns x0..x0 + len <= w of the `[b, c, h, w]` buffer
                // `y` addresses; only this tile row's run writes them (SharedOut).
                let out =
                    unsafe { std::slice::from_raw_parts_mut(y.0.add(base + yy * tl.w + x0), len) };
                let pairs = len / 2;
                for ((pair, &a), &b2) in out.chunks_exact_mut(2).zip(ev.iter()).zip(ov.iter()) {
                    pair[0] = a;
                    pair[1] = b2;
                }
                if pairs < n {
                    out[2 * pairs] = ev[pairs];
                }
            }
        }
    }
}

/// The tile transforms' formulas, for the gathered transforms ([`super::gathered`]).
impl TileForms<4, 2> for F2 {
    #[inline(always)]
    fn bt<X: Arith>(d: [X; 4]) -> [X; 4] {
        bt4(d)
    }
    #[inline(always)]
    fn at<X: Arith>(m: [X; 4]) -> [X; 2] {
        at4(m)
    }
    /// Along the rows first, as [`grad_output_scalar`].
    #[inline(always)]
    fn grad<X: Arith>(d: [[X; 2]; 2]) -> [[X; 4]; 4] {
        let t = [a2([d[0][0], d[1][0]]), a2([d[0][1], d[1][1]])];
        let mut o = [[X::k(0.0); 4]; 4];
        for s in 0..4 {
            let col = a2([t[0][s], t[1][s]]);
            for (i, oi) in o.iter_mut().enumerate() {
                oi[s] = col[i];
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::super::gathered::{self, check};
    use super::*;

    /// Every gathered F(2x2) transform gives bitwise the scalar one's results, on every
    /// instruction set this CPU has.
    #[test]
    fn gathered_transforms_match_the_scalar_ones_bitwise() {
        check::gathered_match_scalar(&check::Variant {
            m: 2,
            planes: 16,
            input: (input_scalar::<f32>, gathered::input::<f32, F2, 4, 2>),
            grad_output: (
                grad_output_scalar::<f32>,
                gathered::grad_output::<f32, F2, 4, 2>,
            ),
            output: (output_scalar::<f32>, gathered::output::<f32, F2, 4, 2>),
        });
    }

    /// The vector kernel transforms match the scalar ones bitwise.
    #[test]
    fn vector_kernel_transforms_match_the_scalar_ones_bitwise() {
        check::kernel_forms_match::<F2, 16>();
    }
}
