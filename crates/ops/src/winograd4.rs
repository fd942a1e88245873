//! Winograd F(4x4, 3x3) for 3x3, stride-1, padding-1 convolutions (Lavin & Gray, 2016, with
//! the interpolation points 0, +-1, +-2, infinity).
//!
//! The same scheme as [`crate::winograd`]'s F(2x2, 3x3), with 4x4 output tiles read from 6x6
//! input tiles: `y = A^T [(G g G^T) * (B^T d B)] A`, i.e. 36 GEMMs `M[k] = U[k] . V[k]` per
//! block of tiles instead of 16. Per output pixel that is 36/16 = 2.25 multiply-adds per input
//! channel instead of 4 (F(2x2)) or 9 (direct), and the transformed input is 2.25x the input
//! instead of 4x. The price is larger rounding error (the transforms have entries up to 8, and
//! 1/24 in G), still ~1e-6 relative in f32 at the U-Net's sizes, and heavier transforms.
//!
//! The transforms work on structure-of-arrays buffers `[36][tiles of the block]`, so every
//! arithmetic loop runs over a block's tiles (up to 512) and vectorises whatever the image
//! width; tiles are gathered from a zero-padded copy of each image plane, so there is no
//! bounds test per tile. Blocks and threading as in [`crate::winograd`].

use rayon::prelude::*;

use crate::elem::{Elem, Uninit};
use crate::gemm::{gemm, Mat};
use crate::im2col::Geom;
use crate::runtime::num_threads;

/// Whether a conv with `cout` outputs takes this path: one [`crate::winograd`] would take,
/// F(4x4) not switched off, a feature map of at least `MIN_SIDE` pixels a side (below that
/// most of a 4x4 tile is padding) and `MIN_CHANNELS` channels in and out (with fewer, the
/// 36 GEMMs are too thin to pay for the larger transforms: the U-Net's 3->64 and 64->3 convs
/// were ~20% slower than with F(2x2), bench/RESULTS.md).
pub(crate) fn applies(g: &Geom, cout: usize) -> bool {
    crate::winograd::applies(g)
        && crate::runtime::winograd4_enabled()
        && g.h.min(g.w) >= MIN_SIDE
        && g.cin.min(cout) >= MIN_CHANNELS
}

/// Smallest feature-map side for F(4x4, 3x3).
const MIN_SIDE: usize = 8;
/// Fewest input and output channels for F(4x4, 3x3).
const MIN_CHANNELS: usize = 16;

/// Planes of transformed data: 6x6 per tile.
const P: usize = 36;

/// Bytes of transformed data one block aims for (its V and M planes). Larger than L2: the
/// GEMMs pack their operands anyway, and fewer, longer GEMMs measured ~10% faster over the
/// U-Net's convolutions at 1 thread than 1 MiB blocks (bench/RESULTS.md).
const BLOCK_BYTES: usize = 1 << 22;

/// The tile grid of a batch: `th x tw` tiles of 4x4 outputs per example.
#[derive(Clone, Copy)]
struct Grid {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    per: usize,
    total: usize,
}

impl Grid {
    fn new(b: usize, h: usize, w: usize) -> Self {
        let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
        Self {
            h,
            w,
            th,
            tw,
            per: th * tw,
            total: b * th * tw,
        }
    }

    /// Tiles per block for `channels` input + output channels of transformed data: about
    /// `BLOCK_BYTES` of it, in a number of blocks that is a multiple of the thread count (when
    /// there are more blocks than threads), so that no thread runs one block more than another.
    fn block<T>(&self, channels: usize) -> usize {
        let per_tile = P * channels * std::mem::size_of::<T>();
        let target = (crate::runtime::winograd_block_bytes(BLOCK_BYTES) / per_tile)
            .clamp(16, 512)
            .min(self.total)
            .max(1);
        let threads = num_threads();
        let mut count = self.total.div_ceil(target);
        if count > threads {
            count = count.next_multiple_of(threads).min(self.total);
        }
        self.total.div_ceil(count).max(1)
    }

    fn blocks(&self, nb: usize) -> Vec<(usize, usize)> {
        let total = self.total;
        (0..total.div_ceil(nb))
            .map(|i| (i * nb, ((i + 1) * nb).min(total)))
            .collect()
    }

    /// The block's tiles split by example: `(example, first tile, end tile)` (global indices).
    fn example_runs(&self, (t0, t1): (usize, usize)) -> Vec<(usize, usize, usize)> {
        let mut runs = Vec::new();
        let mut t = t0;
        while t < t1 {
            let e = t / self.per;
            let end = ((e + 1) * self.per).min(t1);
            runs.push((e, t, end));
            t = end;
        }
        runs
    }
}

/// A raw output pointer shared by threads that write disjoint elements (see
/// `winograd::SharedOut`).
#[derive(Clone, Copy)]
struct SharedOut<T>(*mut T);
// SAFETY: only used for writes to disjoint elements, each by one thread.
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

#[inline(always)]
fn c<T: Elem>(v: f64) -> T {
    T::from_f64(v)
}

/// `B^T d` for 6-vectors `d`, elementwise over the slices.
#[inline(always)]
fn apply_bt<T: Elem>(d: [&[T]; 6], o: [&mut [T]; 6]) {
    let (c2, c4, c5) = (c::<T>(2.0), c::<T>(4.0), c::<T>(5.0));
    let [o0, o1, o2, o3, o4, o5] = o;
    let n = o0.len();
    let (d0, d1, d2, d3, d4, d5) = (
        &d[0][..n],
        &d[1][..n],
        &d[2][..n],
        &d[3][..n],
        &d[4][..n],
        &d[5][..n],
    );
    let (o1, o2, o3, o4, o5) = (
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for k in 0..n {
        let (a0, a1, a2, a3, a4, a5) = (d0[k], d1[k], d2[k], d3[k], d4[k], d5[k]);
        o0[k] = c4 * a0 - c5 * a2 + a4;
        o1[k] = a3 + a4 - c4 * (a1 + a2);
        o2[k] = c4 * (a1 - a2) - a3 + a4;
        o3[k] = c2 * (a3 - a1) - a2 + a4;
        o4[k] = c2 * (a1 - a3) - a2 + a4;
        o5[k] = c4 * a1 - c5 * a3 + a5;
    }
}

/// `A^T m` for 6-vectors `m` (4 results), elementwise over the slices.
#[inline(always)]
fn apply_at<T: Elem>(m: [&[T]; 6], o: [&mut [T]; 4]) {
    let (c2, c4, c8) = (c::<T>(2.0), c::<T>(4.0), c::<T>(8.0));
    let [o0, o1, o2, o3] = o;
    let n = o0.len();
    let (m0, m1, m2, m3, m4, m5) = (
        &m[0][..n],
        &m[1][..n],
        &m[2][..n],
        &m[3][..n],
        &m[4][..n],
        &m[5][..n],
    );
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for k in 0..n {
        let (s12, d12) = (m1[k] + m2[k], m1[k] - m2[k]);
        let (s34, d34) = (m3[k] + m4[k], m3[k] - m4[k]);
        o0[k] = m0[k] + s12 + s34;
        o1[k] = d12 + c2 * d34;
        o2[k] = s12 + c4 * s34;
        o3[k] = d12 + c8 * d34 + m5[k];
    }
}

/// `A y` for 4-vectors `y` (6 results), elementwise over the slices.
#[inline(always)]
fn apply_a<T: Elem>(y: [&[T]; 4], o: [&mut [T]; 6]) {
    let (c2, c4, c8) = (c::<T>(2.0), c::<T>(4.0), c::<T>(8.0));
    let [o0, o1, o2, o3, o4, o5] = o;
    let n = o0.len();
    let (y0, y1, y2, y3) = (&y[0][..n], &y[1][..n], &y[2][..n], &y[3][..n]);
    let (o1, o2, o3, o4, o5) = (
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for k in 0..n {
        let (a0, a1, a2, a3) = (y0[k], y1[k], y2[k], y3[k]);
        let (e, od) = (a0 + a2, a1 + a3);
        let (e2, od2) = (a0 + c4 * a2, c2 * a1 + c8 * a3);
        o0[k] = a0;
        o1[k] = e + od;
        o2[k] = e - od;
        o3[k] = e2 + od2;
        o4[k] = e2 - od2;
        o5[k] = a3;
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
    let plane = cout * cin;
    let per_kernel: Vec<[T; P]> = w
        .par_chunks_exact(9)
        .with_min_len(512)
        .map(|g| {
            let cols: [[T; 6]; 3] = std::array::from_fn(|s| g_col(g[s], g[3 + s], g[6 + s]));
            let mut u = [T::ZERO; P];
            for r in 0..6 {
                u[r * 6..r * 6 + 6].copy_from_slice(&g_col(cols[0][r], cols[1][r], cols[2][r]));
            }
            u
        })
        .collect();
    let mut u = Uninit::<T>::new(P * plane);
    u.slots()
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(k, dst)| {
            for (d, src) in dst.iter_mut().zip(&per_kernel) {
                d.write(src[k]);
            }
        });
    // SAFETY: 36 planes of `plane` values, each written by its task.
    unsafe { u.assume_init() }
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

/// Copies plane `img` (`h x w`) into `pad` (`ph x pw`) at row/column offset `off` (0 or 1),
/// zeros elsewhere.
#[inline(always)]
fn pad_plane<T: Elem>(img: &[T], g: &Grid, off: usize, pad: &mut [T], ph: usize, pw: usize) {
    pad[..off * pw].fill(T::ZERO);
    for y in 0..g.h {
        let row = &mut pad[(y + off) * pw..(y + off + 1) * pw];
        row[..off].fill(T::ZERO);
        row[off..off + g.w].copy_from_slice(&img[y * g.w..(y + 1) * g.w]);
        row[off + g.w..].fill(T::ZERO);
    }
    pad[(g.h + off) * pw..ph * pw].fill(T::ZERO);
}

/// `V = B^T d B` of the block's tiles of `x` (`[b, c, h, w]`) into 36 planes `[c, ld]`.
#[inline(always)]
fn input_transform<T: Elem>(x: &[T], c: usize, g: &Grid, blk: (usize, usize), v: &mut [T]) {
    let ld = blk.1 - blk.0;
    let plane = c * ld;
    // Padded plane: one zero row/column before, enough after for the last 6x6 tile.
    let (ph, pw) = (4 * g.th + 2, 4 * g.tw + 2);
    let mut pad = vec![T::ZERO; ph * pw];
    let mut d = vec![T::ZERO; P * ld];
    let mut t = vec![T::ZERO; P * ld];
    let runs = g.example_runs(blk);
    for ci in 0..c {
        // Gather d[r * 6 + p][j] = tile j's input (r, p).
        for &(e, t0, t1) in &runs {
            let img = &x[(e * c + ci) * g.h * g.w..(e * c + ci + 1) * g.h * g.w];
            pad_plane(img, g, 1, &mut pad, ph, pw);
            for tt in t0..t1 {
                let (j, r0) = (tt - blk.0, tt - e * g.per);
                let base = 4 * (r0 / g.tw) * pw + 4 * (r0 % g.tw);
                for r in 0..6 {
                    let src = &pad[base + r * pw..base + r * pw + 6];
                    for (p, &val) in src.iter().enumerate() {
                        d[(r * 6 + p) * ld + j] = val;
                    }
                }
            }
        }
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
fn grad_output_transform<T: Elem>(dy: &[T], c: usize, g: &Grid, blk: (usize, usize), dm: &mut [T]) {
    let ld = blk.1 - blk.0;
    let plane = c * ld;
    let (ph, pw) = (4 * g.th, 4 * g.tw);
    let mut pad = vec![T::ZERO; ph * pw];
    let mut d = vec![T::ZERO; 16 * ld];
    let mut t = vec![T::ZERO; 24 * ld];
    let runs = g.example_runs(blk);
    for ci in 0..c {
        for &(e, t0, t1) in &runs {
            let img = &dy[(e * c + ci) * g.h * g.w..(e * c + ci + 1) * g.h * g.w];
            pad_plane(img, g, 0, &mut pad, ph, pw);
            for tt in t0..t1 {
                let (j, r0) = (tt - blk.0, tt - e * g.per);
                let base = 4 * (r0 / g.tw) * pw + 4 * (r0 % g.tw);
                for r in 0..4 {
                    let src = &pad[base + r * pw..base + r * pw + 4];
                    for (s, &val) in src.iter().enumerate() {
                        d[(r * 4 + s) * ld + j] = val;
                    }
                }
            }
        }
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
    g: &Grid,
    blk: (usize, usize),
    y: SharedOut<T>,
    bias: Option<(&[T], usize)>,
) {
    let ld = blk.1 - blk.0;
    let plane = c * ld;
    let mut t = vec![T::ZERO; 24 * ld];
    let mut o = vec![T::ZERO; 16 * ld];
    let runs = g.example_runs(blk);
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
            let base = (e * c + co) * g.h * g.w;
            for tt in t0..t1 {
                let (j, r0) = (tt - blk.0, tt - e * g.per);
                let (y0, x0) = (4 * (r0 / g.tw), 4 * (r0 % g.tw));
                let (rows, cols) = ((g.h - y0).min(4), (g.w - x0).min(4));
                for r in 0..rows {
                    // SAFETY: row y0 + r < h, columns x0..x0 + cols <= w of the output plane;
                    // only this tile writes them.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(y.0.add(base + (y0 + r) * g.w + x0), cols)
                    };
                    for (s, out) in dst.iter_mut().enumerate() {
                        *out = o[(r * 4 + s) * ld + j] + b;
                    }
                }
            }
        }
    }
}

crate::simd::avx2_variant!(fn input_transform_simd<T>(
    x: &[T],
    c: usize,
    g: &Grid,
    blk: (usize, usize),
    v: &mut [T],
) -> () = input_transform);
crate::simd::avx2_variant!(fn output_transform_simd<T>(
    m: &[T],
    c: usize,
    g: &Grid,
    blk: (usize, usize),
    y: SharedOut<T>,
    bias: Option<(&[T], usize)>,
) -> () = output_transform);
crate::simd::avx2_variant!(fn grad_output_transform_simd<T>(
    dy: &[T],
    c: usize,
    g: &Grid,
    blk: (usize, usize),
    dm: &mut [T],
) -> () = grad_output_transform);

/// The 36 GEMMs `out[k] (+)= lhs[k] . rhs[k]` of a block.
#[allow(clippy::too_many_arguments)]
fn plane_gemms<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    out: *mut T,
    accumulate: bool,
    lhs: impl Fn(usize) -> Mat<T>,
    rhs: impl Fn(usize) -> Mat<T>,
    threads: usize,
) {
    for p in 0..P {
        // SAFETY: the callers size `out` as 36 planes of m x n and the operands as m x k, k x n.
        unsafe {
            gemm(
                m,
                n,
                k,
                out.add(p * m * n),
                n,
                accumulate,
                lhs(p),
                rhs(p),
                threads,
            )
        };
    }
}

/// Convolution of `x` (`[b, cin, h, w]`) with transformed kernel `u`, into `[b, cout, h, w]`.
#[allow(clippy::too_many_arguments)]
fn conv_transformed<T: Elem>(
    b: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    x: &[T],
    u: &[T],
    bias: Option<(&[T], usize)>,
) -> Vec<T> {
    let g = Grid::new(b, h, w);
    let blocks = g.blocks(g.block::<T>(cin + cout));
    let mut out = Uninit::<T>::new(b * cout * h * w);
    let y = SharedOut(out.slots().as_mut_ptr() as *mut T);
    let gemm_threads = if blocks.len() >= num_threads() {
        1
    } else {
        num_threads()
    };
    let run = |blk: (usize, usize)| {
        let ld = blk.1 - blk.0;
        T::with_scratch(P * (cin + cout) * ld, |buf| {
            let (v, m) = buf.split_at_mut(P * cin * ld);
            input_transform_simd(x, cin, &g, blk, v);
            plane_gemms(
                cout,
                ld,
                cin,
                m.as_mut_ptr(),
                false,
                |p| Mat::rows(&u[p * cout * cin..], cin),
                |p| Mat::rows(&v[p * cin * ld..], ld),
                gemm_threads,
            );
            output_transform_simd(m, cout, &g, blk, y, bias);
        });
    };
    if gemm_threads == 1 {
        blocks.into_par_iter().for_each(run);
    } else {
        blocks.into_iter().for_each(run);
    }
    // SAFETY: every output pixel belongs to exactly one tile, and every tile was written.
    unsafe { out.assume_init() }
}

/// Forward: `x [b, cin, h, w]`, `w [cout, cin, 3, 3]` -> `[b, cout, h, w]`.
pub(crate) fn forward<T: Elem>(
    b: usize,
    cin: usize,
    cout: usize,
    (h, w): (usize, usize),
    x: &[T],
    wt: &[T],
    bias: Option<(&[T], usize)>,
) -> Vec<T> {
    let u = kernel_transform(wt, cout, cin);
    conv_transformed(b, cin, cout, h, w, x, &u, bias)
}

/// Input gradient: `dy [b, cout, h, w]` convolved with the flipped, channel-transposed kernel.
pub(crate) fn input_grad<T: Elem>(
    b: usize,
    cin: usize,
    cout: usize,
    (h, w): (usize, usize),
    wt: &[T],
    dy: &[T],
) -> Vec<T> {
    let mut flipped = vec![T::ZERO; wt.len()];
    flipped
        .par_chunks_exact_mut(cout * 9)
        .enumerate()
        .for_each(|(ci, row)| {
            for co in 0..cout {
                for r in 0..9 {
                    row[co * 9 + r] = wt[(co * cin + ci) * 9 + (8 - r)];
                }
            }
        });
    let u = kernel_transform(&flipped, cin, cout);
    conv_transformed(b, cout, cin, h, w, dy, &u, None)
}

/// Weight gradient `[cout, cin, 3, 3]`: `dU = sum_tiles dM V^T`, `dg = G^T dU G`. Blocks are
/// split into one fixed range per thread, whose sums are added in order (deterministic for a
/// thread count).
pub(crate) fn weight_grad<T: Elem>(
    b: usize,
    cin: usize,
    cout: usize,
    (h, w): (usize, usize),
    x: &[T],
    dy: &[T],
) -> Vec<T> {
    let g = Grid::new(b, h, w);
    let blocks = g.blocks(g.block::<T>(cin + cout));
    let chunks = num_threads().min(blocks.len()).max(1);
    let gemm_threads = if chunks > 1 { 1 } else { num_threads() };
    let bounds: Vec<usize> = (0..=chunks).map(|i| i * blocks.len() / chunks).collect();
    let run_chunk = |i: usize| -> Vec<T> {
        let mut du = vec![T::ZERO; P * cout * cin];
        for &blk in &blocks[bounds[i]..bounds[i + 1]] {
            let ld = blk.1 - blk.0;
            T::with_scratch(P * (cin + cout) * ld, |buf| {
                let (v, dm) = buf.split_at_mut(P * cin * ld);
                input_transform_simd(x, cin, &g, blk, v);
                grad_output_transform_simd(dy, cout, &g, blk, dm);
                plane_gemms(
                    cout,
                    cin,
                    ld,
                    du.as_mut_ptr(),
                    true,
                    |p| Mat::rows(&dm[p * cout * ld..], ld),
                    |p| Mat::rows(&v[p * cin * ld..], ld).t(),
                    gemm_threads,
                );
            });
        }
        du
    };
    let mut partials: Vec<Vec<T>> = if chunks > 1 {
        (0..chunks).into_par_iter().map(run_chunk).collect()
    } else {
        vec![run_chunk(0)]
    };
    let rest = partials.split_off(1);
    let mut du = partials.pop().expect("at least one chunk");
    du.par_chunks_mut(4096).enumerate().for_each(|(j, dst)| {
        let (at, len) = (j * 4096, dst.len());
        for p in &rest {
            dst.iter_mut()
                .zip(&p[at..at + len])
                .for_each(|(a, v)| *a += *v);
        }
    });
    kernel_grad_transform(&du, cout, cin)
}
