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

use rayon::prelude::*;

use super::lanes::{Arith, Isa};
use super::{kernel_planes, SharedOut, Tiles};
use crate::elem::Elem;

/// Planes of transformed data: 6x6 per tile.
const P: usize = 36;

/// F(4x4, 3x3).
pub(crate) struct F4;

// 4 MiB blocks, larger than L2: the GEMMs pack their operands anyway, and fewer, longer GEMMs
// measured ~10% faster over the U-Net's convolutions at 1 thread than 1 MiB blocks
// (bench/RESULTS.md).
impl_variant!(F4 {
    M: 4,
    PLANES: P,
    BLOCK_BYTES: 1 << 22,
    MIN_BLOCK: 16
});

#[inline(always)]
fn c<T: Elem>(v: f64) -> T {
    T::from_f64(v)
}

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
fn g_col<T: Elem>(a: T, b: T, cc: T) -> [T; 6] {
    let (q, s, t) = (c::<T>(0.25), c::<T>(1.0 / 6.0), c::<T>(1.0 / 24.0));
    let tw = c::<T>(1.0 / 12.0);
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
fn gt_col<T: Elem>(u: [T; 6]) -> [T; 3] {
    let (q, s, t) = (c::<T>(0.25), c::<T>(1.0 / 6.0), c::<T>(1.0 / 24.0));
    let tw = c::<T>(1.0 / 12.0);
    [
        q * u[0] - s * (u[1] + u[2]) + t * (u[3] + u[4]),
        s * (u[2] - u[1]) + tw * (u[3] - u[4]),
        s * (u[3] + u[4] - u[1] - u[2]) + u[5],
    ]
}

/// `U[k][co][ci] = (G g G^T)[k]` for `w` `[cout, cin, 3, 3]`; 36 planes `[cout, cin]`.
fn kernel_transform<T: Elem>(w: &[T], cout: usize, cin: usize) -> Vec<T> {
    kernel_planes::<T, P>(w, cout * cin, |g| {
        let cols: [[T; 6]; 3] = std::array::from_fn(|s| g_col(g[s], g[3 + s], g[6 + s]));
        let mut u = [T::ZERO; P];
        for r in 0..6 {
            u[r * 6..r * 6 + 6].copy_from_slice(&g_col(cols[0][r], cols[1][r], cols[2][r]));
        }
        u
    })
}

/// `dg = G^T dU G` for 36 planes `[cout, cin]`; returns `[cout, cin, 3, 3]`.
fn kernel_grad_transform<T: Elem>(du: &[T], cout: usize, cin: usize) -> Vec<T> {
    let plane = cout * cin;
    let mut dg = vec![T::ZERO; 9 * plane];
    dg.par_chunks_exact_mut(9)
        .with_min_len(512)
        .enumerate()
        .for_each(|(o, out)| {
            let at = |r: usize, s: usize| du[(r * 6 + s) * plane + o];
            let t: [[T; 3]; 6] = std::array::from_fn(|r| gt_col(std::array::from_fn(|s| at(r, s))));
            for s in 0..3 {
                let col = gt_col(std::array::from_fn(|r| t[r][s]));
                for r in 0..3 {
                    out[r * 3 + s] = col[r];
                }
            }
        });
    dg
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
fn input_transform<T: Elem>(x: &[T], c: usize, tl: &Tiles, blk: (usize, usize), v: &mut [T]) {
    if !vector::input(Isa::detect(), x, c, tl, blk, v) {
        input_scalar(x, c, tl, blk, v);
    }
}

/// [`input_transform`] one tile element at a time.
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
fn grad_output_transform<T: Elem>(
    dy: &[T],
    c: usize,
    tl: &Tiles,
    blk: (usize, usize),
    dm: &mut [T],
) {
    if !vector::grad_output(Isa::detect(), dy, c, tl, blk, dm) {
        grad_output_scalar(dy, c, tl, blk, dm);
    }
}

/// [`grad_output_transform`] one tile element at a time.
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
fn output_transform<T: Elem>(
    m: &[T],
    c: usize,
    tl: &Tiles,
    blk: (usize, usize),
    y: SharedOut<T>,
    bias: Option<(&[T], usize)>,
) {
    if !vector::output(Isa::detect(), m, c, tl, blk, y, bias) {
        output_scalar(m, c, tl, blk, y, bias);
    }
}

/// [`output_transform`] one tile element at a time.
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

/// The gathered vector transforms ([`super::gathered`]): the same arithmetic in the same order
/// as the scalar ones above, `N` tiles per vector. Each returns false, having done nothing,
/// when it cannot run: no vector set (`isa`), not f32, or indices beyond i32.
// Tile coordinates index both the register arrays and the addresses: plain index loops.
#[allow(clippy::needless_range_loop)]
mod vector {
    use super::super::gathered::{self, Grid, Kernel};
    use super::super::lanes::{as_f32, as_f32_mut, Isa, Lanes};
    use super::super::{SharedOut, Tiles};
    use super::{a4, at6, bt6, P};
    use crate::elem::Elem;

    /// Elements of a `[b, c, h, w]` tensor of the batch `tl` tiles.
    fn elems(tl: &Tiles, c: usize) -> usize {
        tl.total / tl.per * c * tl.h * tl.w
    }

    /// `V = B^T d B` ([`super::input_transform`]).
    pub(super) fn input<T: Elem>(
        isa: Option<Isa>,
        x: &[T],
        c: usize,
        tl: &Tiles,
        blk: (usize, usize),
        v: &mut [T],
    ) -> bool {
        let (Some(isa), Some(x), Some(v)) = (isa, as_f32(x), as_f32_mut(v)) else {
            return false;
        };
        let Some(grid) = Grid::new(tl, 4, 1, blk, c) else {
            return false;
        };
        let ld = blk.1 - blk.0;
        assert!(x.len() >= elems(tl, c) && v.len() >= P * c * ld);
        let k = Input {
            x: x.as_ptr(),
            c,
            tl,
            grid: &grid,
            ld,
            v: v.as_mut_ptr(),
        };
        gathered::run(&k, isa);
        true
    }

    /// Arguments of [`input`]'s kernel (the slices checked long enough).
    struct Input<'a> {
        x: *const f32,
        c: usize,
        tl: &'a Tiles,
        grid: &'a Grid,
        ld: usize,
        v: *mut f32,
    }

    impl Kernel for Input<'_> {
        #[inline(always)]
        unsafe fn run<L: Lanes>(&self) {
            let w = self.tl.w as i32;
            let (ld, plane) = (self.ld, self.c * self.ld);
            for g in (0..ld).step_by(L::N) {
                let n = (ld - g).min(L::N);
                let (idx, rows, cols) = masks::<L, 6>(self.grid, g, self.tl);
                for ci in 0..self.c {
                    let src = self.x.add(ci * self.tl.h * self.tl.w);
                    // t[p] = B^T down column p of the tiles.
                    let mut t = [[L::k(0.0); 6]; 6];
                    for (p, tp) in t.iter_mut().enumerate() {
                        let mut d = [L::k(0.0); 6];
                        for (r, dr) in d.iter_mut().enumerate() {
                            let at = L::add_i(idx, r as i32 * w + p as i32);
                            *dr = L::gather(src, at, L::and(rows[r], cols[p]));
                        }
                        *tp = bt6(d);
                    }
                    let out = self.v.add(ci * ld + g);
                    for i in 0..6 {
                        let o = bt6([t[0][i], t[1][i], t[2][i], t[3][i], t[4][i], t[5][i]]);
                        for (q, val) in o.into_iter().enumerate() {
                            val.store(out.add((i * 6 + q) * plane), n);
                        }
                    }
                }
            }
        }
    }

    /// Lanes `g..g + N` of the grid: tile indices, and which of the `S` rows and columns from
    /// each tile's corner lie inside the image.
    #[inline(always)]
    unsafe fn masks<L: Lanes, const S: usize>(
        grid: &Grid,
        g: usize,
        tl: &Tiles,
    ) -> (L::I, [L::M; S], [L::M; S]) {
        let idx = L::load_i(grid.idx[g..].as_ptr());
        let (y, x) = (
            L::load_i(grid.y[g..].as_ptr()),
            L::load_i(grid.x[g..].as_ptr()),
        );
        let (mut rows, mut cols) = ([L::first(0); S], [L::first(0); S]);
        for k in 0..S {
            rows[k] = L::within(L::add_i(y, k as i32), tl.h as i32);
            cols[k] = L::within(L::add_i(x, k as i32), tl.w as i32);
        }
        (idx, rows, cols)
    }

    /// `dM = A dY A^T` ([`super::grad_output_transform`]).
    pub(super) fn grad_output<T: Elem>(
        isa: Option<Isa>,
        dy: &[T],
        c: usize,
        tl: &Tiles,
        blk: (usize, usize),
        dm: &mut [T],
    ) -> bool {
        let (Some(isa), Some(dy), Some(dm)) = (isa, as_f32(dy), as_f32_mut(dm)) else {
            return false;
        };
        let Some(grid) = Grid::new(tl, 4, 0, blk, c) else {
            return false;
        };
        let ld = blk.1 - blk.0;
        assert!(dy.len() >= elems(tl, c) && dm.len() >= P * c * ld);
        let k = GradOutput {
            dy: dy.as_ptr(),
            c,
            tl,
            grid: &grid,
            ld,
            dm: dm.as_mut_ptr(),
        };
        gathered::run(&k, isa);
        true
    }

    /// Arguments of [`grad_output`]'s kernel.
    struct GradOutput<'a> {
        dy: *const f32,
        c: usize,
        tl: &'a Tiles,
        grid: &'a Grid,
        ld: usize,
        dm: *mut f32,
    }

    impl Kernel for GradOutput<'_> {
        #[inline(always)]
        unsafe fn run<L: Lanes>(&self) {
            let w = self.tl.w as i32;
            let (ld, plane) = (self.ld, self.c * self.ld);
            for g in (0..ld).step_by(L::N) {
                let n = (ld - g).min(L::N);
                let (idx, rows, cols) = masks::<L, 4>(self.grid, g, self.tl);
                for ci in 0..self.c {
                    let src = self.dy.add(ci * self.tl.h * self.tl.w);
                    // t[s] = A down column s of the tiles' output gradients.
                    let mut t = [[L::k(0.0); 6]; 4];
                    for (s, ts) in t.iter_mut().enumerate() {
                        let mut d = [L::k(0.0); 4];
                        for (r, dr) in d.iter_mut().enumerate() {
                            let at = L::add_i(idx, r as i32 * w + s as i32);
                            *dr = L::gather(src, at, L::and(rows[r], cols[s]));
                        }
                        *ts = a4(d);
                    }
                    let out = self.dm.add(ci * ld + g);
                    for i in 0..6 {
                        let o = a4([t[0][i], t[1][i], t[2][i], t[3][i]]);
                        for (q, val) in o.into_iter().enumerate() {
                            val.store(out.add((i * 6 + q) * plane), n);
                        }
                    }
                }
            }
        }
    }

    /// `y = A^T M A (+ bias)` ([`super::output_transform`]).
    pub(super) fn output<T: Elem>(
        isa: Option<Isa>,
        m: &[T],
        c: usize,
        tl: &Tiles,
        blk: (usize, usize),
        y: SharedOut<T>,
        bias: Option<(&[T], usize)>,
    ) -> bool {
        let (Some(isa), Some(m)) = (isa, as_f32(m)) else {
            return false;
        };
        let bias = match bias {
            Some((b, stride)) => match as_f32(b) {
                Some(b) => Some((b, stride)),
                None => return false,
            },
            None => None,
        };
        let Some(grid) = Grid::new(tl, 4, 0, blk, c) else {
            return false;
        };
        let ld = blk.1 - blk.0;
        assert!(m.len() >= P * c * ld);
        // Each tile's bias offset (its example's row of `bias`); without bias, lanes of zeros.
        let zeros = [0f32; 1];
        let (b, bidx) = match bias {
            Some((b, stride)) => {
                let examples = tl.total / tl.per;
                assert!(b.len() >= (examples - 1) * stride + c);
                let bidx: Vec<i32> = grid.e.iter().map(|&e| e * stride as i32).collect();
                (b.as_ptr(), bidx)
            }
            None => (zeros.as_ptr(), vec![0; grid.e.len()]),
        };
        let k = Output {
            m: m.as_ptr(),
            c,
            tl,
            grid: &grid,
            ld,
            y: y.0 as *mut f32,
            bias: (b, bias.is_some(), &bidx),
        };
        gathered::run(&k, isa);
        true
    }

    /// Arguments of [`output`]'s kernel: `bias` is (its values, whether per channel, each
    /// lane's offset).
    struct Output<'a> {
        m: *const f32,
        c: usize,
        tl: &'a Tiles,
        grid: &'a Grid,
        ld: usize,
        y: *mut f32,
        bias: (*const f32, bool, &'a [i32]),
    }

    impl Kernel for Output<'_> {
        #[inline(always)]
        unsafe fn run<L: Lanes>(&self) {
            let w = self.tl.w as i32;
            let (ld, plane) = (self.ld, self.c * self.ld);
            let (bias, per_channel, bidx) = self.bias;
            for g in (0..ld).step_by(L::N) {
                let n = (ld - g).min(L::N);
                let (idx, rows, cols) = masks::<L, 4>(self.grid, g, self.tl);
                let bi = L::load_i(bidx[g..].as_ptr());
                for co in 0..self.c {
                    let src = self.m.add(co * ld + g);
                    // t[q] = A^T down column q of the tiles' M.
                    let mut t = [[L::k(0.0); 4]; 6];
                    for (q, tq) in t.iter_mut().enumerate() {
                        let mut d = [L::k(0.0); 6];
                        for (i, di) in d.iter_mut().enumerate() {
                            *di = L::load(src.add((i * 6 + q) * plane), n);
                        }
                        *tq = at6(d);
                    }
                    let b = L::gather(bias.add(co * per_channel as usize), bi, L::first(n));
                    let dst = self.y.add(co * self.tl.h * self.tl.w);
                    for r in 0..4 {
                        let o = at6([t[0][r], t[1][r], t[2][r], t[3][r], t[4][r], t[5][r]]);
                        for (s, val) in o.into_iter().enumerate() {
                            let at = L::add_i(idx, r as i32 * w + s as i32);
                            (val + b).scatter(dst, at, L::and(rows[r], cols[s]));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::lanes::Isa;
    use super::*;

    /// The instruction sets this CPU can run the gathered kernels with.
    fn isas() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
            if crate::simd::has_avx2_fma() {
                v.push(Isa::Avx2);
            }
        }
        v
    }

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Shapes with partial tiles at the bottom and right, tile rows shorter and longer than a
    /// vector, and blocks that start and end inside tile rows and examples.
    /// Batch, channels, height, width, block of tiles.
    type Case = (usize, usize, usize, usize, (usize, usize));

    const CASES: [Case; 5] = [
        (3, 5, 8, 8, (0, 12)),
        (2, 3, 7, 9, (1, 11)),
        (4, 2, 13, 6, (3, 29)),
        (2, 4, 28, 28, (5, 98)),
        (1, 17, 10, 33, (0, 27)),
    ];

    /// Every gathered transform gives bitwise the scalar one's results, on every instruction
    /// set the CPU has (it fails when a mask, an index or the order of the arithmetic is off).
    #[test]
    fn gathered_transforms_match_the_scalar_ones_bitwise() {
        let isas = isas();
        for (b, c, h, w, blk) in CASES {
            let tl = Tiles::new(b, h, w, 4);
            assert!(blk.1 <= tl.total);
            let x = noise(b * c * h * w, (b * 100 + h) as u32);
            let ld = blk.1 - blk.0;
            let mut want = vec![f32::NAN; P * c * ld];
            input_scalar(&x, c, &tl, blk, &mut want);
            let mut want_dm = vec![f32::NAN; P * c * ld];
            grad_output_scalar(&x, c, &tl, blk, &mut want_dm);
            let m = noise(P * c * ld, 7 + c as u32);
            let bias = noise(b * c + 3, 11);
            for bias in [None, Some((&bias[..], c + 1))] {
                let mut want_y = vec![f32::NAN; b * c * h * w];
                output_scalar(&m, c, &tl, blk, SharedOut(want_y.as_mut_ptr()), bias);
                for &isa in &isas {
                    let mut got = vec![f32::NAN; P * c * ld];
                    assert!(vector::input(Some(isa), &x, c, &tl, blk, &mut got));
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "input {isa:?} {b}x{c}x{h}x{w} {blk:?}"
                    );
                    let mut got = vec![f32::NAN; P * c * ld];
                    assert!(vector::grad_output(Some(isa), &x, c, &tl, blk, &mut got));
                    assert_eq!(bits(&got), bits(&want_dm), "dM {isa:?} {b}x{c}x{h}x{w}");
                    let mut got = vec![f32::NAN; b * c * h * w];
                    let y = SharedOut(got.as_mut_ptr());
                    assert!(vector::output(Some(isa), &m, c, &tl, blk, y, bias));
                    // NaN outside the block's tiles in both: compared as bits.
                    assert_eq!(
                        bits(&got),
                        bits(&want_y),
                        "y {isa:?} {b}x{c}x{h}x{w} {blk:?}"
                    );
                }
            }
        }
        eprintln!("gathered transforms checked on {isas:?}");
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
