//! The Winograd transforms on vectors of tiles, for both variants: the input transform
//! ([`input`]), the output-gradient transform ([`grad_output`]), the output transform
//! ([`output`]), the kernel transforms ([`kernels_to_planes`], [`planes_to_kernels`]), each
//! written once for any [`Lanes`] and run with the instruction set the CPU has ([`run_with`]).
//!
//! The scalar transforms copy every tile element into scratch planes one value at a time (36
//! scattered stores per tile for F(4x4)); with tile rows 2-7 tiles long on the U-Net's small
//! maps, vectorising along a tile row does not pay. These take `N` consecutive tiles of the
//! block, wherever they lie (across rows and examples), fetch one tile element of all of them
//! with one gather (from a zero-bordered copy of the channel for the input, [`Padded`]; with
//! masks from the tensor itself for the output gradient), transform in registers with the
//! variant's formulas ([`TileForms`]) and store whole vectors into the planes; the output is
//! scattered with masks. Neighbouring pixels go in pairs where that is exact (64-bit elements).

use std::cell::RefCell;
use std::marker::PhantomData;

use super::lanes::{as_f32, as_f32_mut, Arith, Isa, Lanes};
use super::{KernelForms, SharedOut, Tiles, Variant};
use crate::elem::Elem;

/// Tiles of one block, padded to whole vectors: each tile's top-left pixel `(y, x)` (its output
/// tile's corner plus the variant's offset) and the index of that pixel in a `[b, c, h, w]`
/// tensor relative to the start of channel `ci`'s plane in example 0. Padding lanes lie far
/// above the image, so every row mask excludes them.
pub(crate) struct Grid {
    pub y: Vec<i32>,
    pub x: Vec<i32>,
    pub idx: Vec<i32>,
    /// Each tile's example.
    pub e: Vec<i32>,
}

/// Lanes the grid is padded to (the widest vector).
const PAD: usize = 16;

impl Grid {
    /// The grid of tiles `blk` with `m x m` output tiles, `off` pixels above and left of each
    /// tile's corner, in a tensor of `c` channels; `None` when an index would not fit in i32.
    pub fn new(tl: &Tiles, m: usize, off: i32, blk: (usize, usize), c: usize) -> Option<Grid> {
        let examples = tl.total / tl.per.max(1);
        let elems = examples
            .checked_mul(c)?
            .checked_mul(tl.h)?
            .checked_mul(tl.w)?;
        if elems >= (i32::MAX / 2) as usize {
            return None;
        }
        let chw = (c * tl.h * tl.w) as i32;
        let len = (blk.1 - blk.0).next_multiple_of(PAD);
        let mut g = Grid {
            y: vec![i32::MIN / 2; len],
            x: vec![0; len],
            idx: vec![0; len],
            e: vec![0; len],
        };
        for (j, t) in (blk.0..blk.1).enumerate() {
            let (e, ty, tx) = tl.locate(t);
            let (y, x) = ((m * ty) as i32 - off, (m * tx) as i32 - off);
            g.y[j] = y;
            g.x[j] = x;
            g.idx[j] = e as i32 * chw + y * tl.w as i32 + x;
            g.e[j] = e as i32;
        }
        Some(g)
    }

    /// Lanes `g..g + N`: tile indices, and which of the `S` rows and columns from each tile's
    /// top-left pixel lie inside the image.
    ///
    /// # Safety
    /// `L`'s instruction set must be present (see [`Lanes`]).
    #[inline(always)]
    pub unsafe fn masks<L: Lanes, const S: usize>(
        &self,
        g: usize,
        tl: &Tiles,
    ) -> (L::I, [L::M; S], [L::M; S]) {
        let idx = L::load_i(self.idx[g..].as_ptr());
        let (y, x) = (
            L::load_i(self.y[g..].as_ptr()),
            L::load_i(self.x[g..].as_ptr()),
        );
        let (mut rows, mut cols) = ([L::first(0); S], [L::first(0); S]);
        for k in 0..S {
            rows[k] = L::within(L::add_i(y, k as i32), tl.h as i32);
            cols[k] = L::within(L::add_i(x, k as i32), tl.w as i32);
        }
        (idx, rows, cols)
    }
}

/// One channel of a block's examples copied into zero-bordered planes, so that tiles can be
/// gathered without masks (and in pairs of neighbouring pixels, see [`Lanes::gather_pairs`]).
/// Each example gets `ph x pw` values: the image at row and column offset 1, zeros around it
/// (written once: each channel's copy overwrites the same interior rows). Only the image rows
/// the block's tiles read are copied.
pub(crate) struct Padded {
    buf: Vec<f32>,
    /// (example, first image row, end image row) per example of the block, in order.
    runs: Vec<(usize, usize, usize)>,
    ph: usize,
    pw: usize,
    h: usize,
    w: usize,
    /// Per tile of the block (padded to whole vectors with 0): the index of its top-left input
    /// pixel, `off = 1` above and left of its output corner, in `buf`.
    pub idx: Vec<i32>,
}

impl Padded {
    /// The padded planes for tiles `blk` of `m x m` outputs read from `(m + 2) x (m + 2)`
    /// patches; `None` when the copy would not be indexable with i32.
    pub fn new(tl: &Tiles, m: usize, blk: (usize, usize)) -> Option<Padded> {
        let (ph, pw) = (m * tl.th + 2, m * tl.tw + 2);
        let runs: Vec<(usize, usize, usize)> = tl
            .example_runs(blk)
            .into_iter()
            .map(|(e, t0, t1)| {
                let (ty0, ty1) = ((t0 - e * tl.per) / tl.tw, (t1 - 1 - e * tl.per) / tl.tw);
                (e, (m * ty0).saturating_sub(1), (m * ty1 + m + 1).min(tl.h))
            })
            .collect();
        let len = runs.len().checked_mul(ph)?.checked_mul(pw)?;
        if len >= (i32::MAX / 2) as usize {
            return None;
        }
        let mut idx = vec![0i32; (blk.1 - blk.0).next_multiple_of(PAD)];
        let mut run = 0;
        for (j, t) in (blk.0..blk.1).enumerate() {
            let (e, ty, tx) = tl.locate(t);
            while runs[run].0 != e {
                run += 1;
            }
            idx[j] = (run * ph * pw + m * ty * pw + m * tx) as i32;
        }
        let buf = vec![0f32; len];
        Some(Padded {
            buf,
            runs,
            ph,
            pw,
            h: tl.h,
            w: tl.w,
            idx,
        })
    }

    /// Copies channel `ci` of `x` (`[b, c, h, w]`) in, a vector at a time (the rows are short:
    /// a `memcpy` call per row cost more than the copy).
    ///
    /// # Safety
    /// `L`'s instruction set must be present.
    #[inline(always)]
    pub unsafe fn fill<L: Lanes>(&mut self, x: &[f32], c: usize, ci: usize) {
        let (h, w, pw) = (self.h, self.w, self.pw);
        let plane = &x[ci * h * w..];
        let buf = self.buf.as_mut_ptr();
        for (r, &(e, y0, y1)) in self.runs.iter().enumerate() {
            assert!((e * c + 1) * h * w <= plane.len());
            let img = plane.as_ptr().add(e * c * h * w);
            let dst = buf.add(r * self.ph * pw);
            for y in y0..y1 {
                // SAFETY: row y < h of the image (asserted above); padded row y + 1 < ph,
                // columns 1..=w < pw of this example's padded plane.
                let (src, out) = (img.add(y * w), dst.add((y + 1) * pw + 1));
                for x0 in (0..w).step_by(L::N) {
                    let n = (w - x0).min(L::N);
                    L::load(src.add(x0), n).store(out.add(x0), n);
                }
            }
        }
    }

    pub fn ptr(&self) -> *const f32 {
        self.buf.as_ptr()
    }
}

/// A variant's tile transforms as formulas over scalars or vectors of tiles, for `M x M` output
/// tiles read from `S x S` input tiles (`S = M + 2`). Each is the scalar transform's arithmetic
/// in the scalar transform's order, so that the gathered transforms give its bits.
pub(crate) trait TileForms<const S: usize, const M: usize>: Variant {
    /// `B^T d` for one column `d` of a tile.
    fn bt<X: Arith>(d: [X; S]) -> [X; S];
    /// `A^T m` for one column `m` of a tile's `M` planes.
    fn at<X: Arith>(m: [X; S]) -> [X; M];
    /// `A dY A^T` of one tile of output gradients given by columns (`d[s][r]`: pixel `(r, s)`);
    /// `[i][q]` goes to plane `i * S + q`.
    fn grad<X: Arith>(d: [[X; M]; M]) -> [[X; S]; S];
}

/// `V` of the block's tiles of `x` (`[b, c, h, w]`) into `K::PLANES` planes `[c, ld]`, one
/// channel at a time through a [`Padded`] copy, the `S` pixels of a tile row fetched as `S / 2`
/// pairs; false, having done nothing, when it cannot run (no `isa`, not f32, indices beyond
/// i32).
pub(crate) fn input<T: Elem, K: TileForms<S, M>, const S: usize, const M: usize>(
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
    let Some(pad) = Padded::new(tl, K::M, blk) else {
        return false;
    };
    let ld = blk.1 - blk.0;
    assert!(S == K::M + 2 && S.is_multiple_of(2) && K::PLANES == S * S);
    assert!(x.len() >= elems(tl, c) && v.len() >= K::PLANES * c * ld);
    let pad = RefCell::new(pad);
    let job = FromPadded::<K, S, M> {
        x,
        c,
        pad,
        ld,
        v: v.as_mut_ptr(),
        k: PhantomData,
    };
    run_with(isa, &job);
    true
}

/// `dM = A dY A^T` of the block's tiles of `dy` (`[b, c, h, w]`) into `K::PLANES` planes
/// `[c, ld]`, gathered straight from `dy` with masks (pixel pairs where the width is even), as
/// [`input`].
pub(crate) fn grad_output<T: Elem, K: TileForms<S, M>, const S: usize, const M: usize>(
    isa: Option<Isa>,
    dy: &[T],
    c: usize,
    tl: &Tiles,
    blk: (usize, usize),
    dm: &mut [T],
) -> bool {
    let Some(job) = Job::to_planes(isa, dy, c, tl, blk, dm, (M, 0, K::PLANES)) else {
        return false;
    };
    run_with(job.isa, &GradOutput::<K, S, M>(&job, PhantomData));
    true
}

/// `y = A^T M A (+ bias)` of the block's tiles from `K::PLANES` planes `[c, ld]`, scattered into
/// `y` (pixel pairs where the width is even), as [`input`].
pub(crate) fn output<T: Elem, K: TileForms<S, M>, const S: usize, const M: usize>(
    isa: Option<Isa>,
    m: &[T],
    c: usize,
    tl: &Tiles,
    blk: (usize, usize),
    y: SharedOut<T>,
    bias: Option<(&[T], usize)>,
) -> bool {
    let Some(job) = Job::to_image(isa, m, c, tl, blk, y, bias, (M, K::PLANES)) else {
        return false;
    };
    run_with(job.isa, &Output::<K, S, M>(&job, PhantomData));
    true
}

struct GradOutput<'j, 'a, K, const S: usize, const M: usize>(&'j Job<'a>, PhantomData<K>);

// Tile coordinates index both the register arrays and the addresses: plain index loops.
#[allow(clippy::needless_range_loop)]
impl<K: TileForms<S, M>, const S: usize, const M: usize> Vectorised
    for GradOutput<'_, '_, K, S, M>
{
    #[inline(always)]
    unsafe fn run<L: Lanes>(&self) {
        let j = self.0;
        let w = j.tl.w as i32;
        // Tiles start at even columns: with an even width, pixel pairs never straddle it.
        let pairs = j.tl.w.is_multiple_of(2);
        for g in (0..j.ld).step_by(L::N) {
            let n = (j.ld - g).min(L::N);
            let (idx, rows, cols) = j.grid.masks::<L, M>(g, j.tl);
            for ci in 0..j.c {
                let src = j.src.add(ci * j.tl.h * j.tl.w);
                // d[s][r]: pixel (r, s) of the tiles' output gradients.
                let mut d = [[L::k(0.0); M]; M];
                for r in 0..M {
                    for s in (0..M).step_by(2) {
                        let at = L::add_i(idx, r as i32 * w + s as i32);
                        if pairs {
                            // Even width: a pair is inside exactly when its second pixel is.
                            let m = L::and(rows[r], cols[s + 1]);
                            (d[s][r], d[s + 1][r]) = L::gather_pairs(src, at, m);
                        } else {
                            d[s][r] = L::gather(src, at, L::and(rows[r], cols[s]));
                            let (at, m) = (L::add_i(at, 1), L::and(rows[r], cols[s + 1]));
                            d[s + 1][r] = L::gather(src, at, m);
                        }
                    }
                }
                let out = j.dst.add(ci * j.ld + g);
                for (i, row) in K::grad(d).into_iter().enumerate() {
                    for (q, val) in row.into_iter().enumerate() {
                        val.store(out.add((i * S + q) * j.plane()), n);
                    }
                }
            }
        }
    }
}

struct Output<'j, 'a, K, const S: usize, const M: usize>(&'j Job<'a>, PhantomData<K>);

// Tile coordinates index both the register arrays and the addresses: plain index loops.
#[allow(clippy::needless_range_loop)]
impl<K: TileForms<S, M>, const S: usize, const M: usize> Vectorised for Output<'_, '_, K, S, M> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(&self) {
        let j = self.0;
        let w = j.tl.w as i32;
        let (bias, ref offsets, per_channel) = j.bias;
        let pairs = j.tl.w.is_multiple_of(2);
        for g in (0..j.ld).step_by(L::N) {
            let n = (j.ld - g).min(L::N);
            let (idx, rows, cols) = j.grid.masks::<L, M>(g, j.tl);
            let bi = L::load_i(offsets[g..].as_ptr());
            for co in 0..j.c {
                let src = j.src.add(co * j.ld + g);
                // t[q] = A^T down column q of the tiles' planes.
                let mut t = [[L::k(0.0); M]; S];
                for q in 0..S {
                    let mut d = [L::k(0.0); S];
                    for i in 0..S {
                        d[i] = L::load(src.add((i * S + q) * j.plane()), n);
                    }
                    t[q] = K::at(d);
                }
                let b = L::gather(bias.add(co * per_channel as usize), bi, L::first(n));
                let dst = j.dst.add(co * j.tl.h * j.tl.w);
                for r in 0..M {
                    let mut row = [L::k(0.0); S];
                    for q in 0..S {
                        row[q] = t[q][r];
                    }
                    let mut o = K::at(row);
                    for v in o.iter_mut() {
                        *v = *v + b;
                    }
                    for s in (0..M).step_by(2) {
                        let at = L::add_i(idx, r as i32 * w + s as i32);
                        if pairs {
                            // Even width: a pair is inside exactly when its second pixel is.
                            let m = L::and(rows[r], cols[s + 1]);
                            L::scatter_pairs(o[s], o[s + 1], dst, at, m);
                        } else {
                            o[s].scatter(dst, at, L::and(rows[r], cols[s]));
                            let at = L::add_i(at, 1);
                            o[s + 1].scatter(dst, at, L::and(rows[r], cols[s + 1]));
                        }
                    }
                }
            }
        }
    }
}

struct FromPadded<'a, K, const S: usize, const M: usize> {
    x: &'a [f32],
    c: usize,
    pad: RefCell<Padded>,
    ld: usize,
    v: *mut f32,
    k: PhantomData<K>,
}

// Tile coordinates index both the register arrays and the addresses: plain index loops.
#[allow(clippy::needless_range_loop)]
impl<K: TileForms<S, M>, const S: usize, const M: usize> Vectorised for FromPadded<'_, K, S, M> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(&self) {
        let mut pad = self.pad.borrow_mut();
        let (ld, plane, pw) = (self.ld, self.c * self.ld, pad.pw as i32);
        let all = L::first(L::N);
        for ci in 0..self.c {
            pad.fill::<L>(self.x, self.c, ci);
            for g in (0..ld).step_by(L::N) {
                let (n, idx) = ((ld - g).min(L::N), L::load_i(pad.idx[g..].as_ptr()));
                // d[p][r]: pixel (r, p) of the tiles.
                let mut d = [[L::k(0.0); S]; S];
                for r in 0..S {
                    for q in (0..S).step_by(2) {
                        let at = L::add_i(idx, r as i32 * pw + q as i32);
                        (d[q][r], d[q + 1][r]) = L::gather_pairs(pad.ptr(), at, all);
                    }
                }
                // t[p] = B^T down column p, then along the rows into the planes.
                let mut t = [[L::k(0.0); S]; S];
                for p in 0..S {
                    t[p] = K::bt(d[p]);
                }
                let out = self.v.add(ci * ld + g);
                for i in 0..S {
                    let mut row = [L::k(0.0); S];
                    for p in 0..S {
                        row[p] = t[p][i];
                    }
                    for (q, val) in K::bt(row).into_iter().enumerate() {
                        val.store(out.add((i * S + q) * plane), n);
                    }
                }
            }
        }
    }
}

/// One block's transform between a `[b, c, h, w]` tensor (the image side) and `planes` planes
/// `[c, ld]` (the tile side), its slices checked and turned into pointers.
pub(crate) struct Job<'a> {
    /// What the transform reads: the image, or the planes.
    pub src: *const f32,
    /// What it writes: the planes, or the image (each pixel by one tile only).
    pub dst: *mut f32,
    pub c: usize,
    pub tl: &'a Tiles,
    pub grid: Grid,
    /// Tiles in the block.
    pub ld: usize,
    /// Per-example bias of an output transform: its values from channel 0, each lane's offset
    /// to its example's row, and whether it is per channel (else one 0 for all).
    pub bias: (*const f32, Vec<i32>, bool),
    pub isa: Isa,
}

/// One zero, the bias of an output transform without one.
static ZERO: [f32; 1] = [0.0];

impl<'a> Job<'a> {
    /// Image `src` to planes `dst` for a variant with `m x m` output tiles read from `off`
    /// pixels above and left of each tile's corner; `None` if it cannot run (no `isa`, not f32,
    /// indices beyond i32). Panics if a slice is too short.
    #[allow(clippy::too_many_arguments)]
    pub fn to_planes<T: Elem>(
        isa: Option<Isa>,
        src: &[T],
        c: usize,
        tl: &'a Tiles,
        blk: (usize, usize),
        dst: &mut [T],
        (m, off, planes): (usize, i32, usize),
    ) -> Option<Job<'a>> {
        let (isa, src, dst) = (isa?, as_f32(src)?, as_f32_mut(dst)?);
        let grid = Grid::new(tl, m, off, blk, c)?;
        let ld = blk.1 - blk.0;
        assert!(src.len() >= elems(tl, c) && dst.len() >= planes * c * ld);
        let bias = (ZERO.as_ptr(), vec![0; grid.e.len()], false);
        let (src, dst) = (src.as_ptr(), dst.as_mut_ptr());
        Some(Job {
            src,
            dst,
            c,
            tl,
            grid,
            ld,
            bias,
            isa,
        })
    }

    /// Planes `src` to image `y` (+ bias `b[e * stride + channel]`), as [`Job::to_planes`].
    #[allow(clippy::too_many_arguments)]
    pub fn to_image<T: Elem>(
        isa: Option<Isa>,
        src: &[T],
        c: usize,
        tl: &'a Tiles,
        blk: (usize, usize),
        y: SharedOut<T>,
        bias: Option<(&[T], usize)>,
        (m, planes): (usize, usize),
    ) -> Option<Job<'a>> {
        let (isa, src) = (isa?, as_f32(src)?);
        let grid = Grid::new(tl, m, 0, blk, c)?;
        let ld = blk.1 - blk.0;
        assert!(src.len() >= planes * c * ld);
        let bias = match bias {
            Some((b, stride)) => {
                let b = as_f32(b)?;
                assert!(b.len() >= (tl.total / tl.per - 1) * stride + c);
                let offsets = grid.e.iter().map(|&e| e * stride as i32).collect();
                (b.as_ptr(), offsets, true)
            }
            None => (ZERO.as_ptr(), vec![0; grid.e.len()], false),
        };
        let dst = y.0 as *mut f32;
        Some(Job {
            src: src.as_ptr(),
            dst,
            c,
            tl,
            grid,
            ld,
            bias,
            isa,
        })
    }

    /// Elements in one plane: `c` channels of the block's tiles.
    pub fn plane(&self) -> usize {
        self.c * self.ld
    }
}

/// Work written once for any vector width.
pub(crate) trait Vectorised {
    /// # Safety
    /// Only called by [`run_with`], on a CPU with `L`'s instruction set.
    unsafe fn run<L: Lanes>(&self);
}

/// Runs `k` with `isa`'s vectors.
pub(crate) fn run_with(isa: Isa, k: &impl Vectorised) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn zmm<K: Vectorised>(k: &K) {
            k.run::<super::lanes::Z>()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn ymm<K: Vectorised>(k: &K) {
            k.run::<super::lanes::Y>()
        }
        // SAFETY: `isa` came from `Isa::detect` (or a test's check of the CPU's features).
        match isa {
            Isa::Avx512 => unsafe { zmm(k) },
            Isa::Avx2 => unsafe { ymm(k) },
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        unreachable!("no vector set is detected off x86-64: {isa:?}")
    }
}

/// Offsets of consecutive 3x3 kernels, one per lane.
static KERNEL_LANES: [i32; 16] = [
    0, 9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 99, 108, 117, 126, 135,
];

/// [`super::kernel_planes`]' work for the kernels in `w` (kernel `o0` first), `N` kernels per
/// vector: false, having done nothing, when it cannot run (no `isa`, not f32).
pub(crate) fn kernels_to_planes<T: Elem, K: KernelForms<P>, const P: usize>(
    isa: Option<Isa>,
    w: &[T],
    o0: usize,
    plane: usize,
    out: SharedOut<T>,
) -> bool {
    let (Some(isa), Some(w)) = (isa, as_f32(w)) else {
        return false;
    };
    assert!(o0 + w.len() / 9 <= plane);
    let out = SharedOut(out.0 as *mut f32);
    run_with(
        isa,
        &KernelsToPlanes::<K, P> {
            w,
            o0,
            plane,
            out,
            k: PhantomData,
        },
    );
    true
}

struct KernelsToPlanes<'a, K, const P: usize> {
    w: &'a [f32],
    o0: usize,
    plane: usize,
    out: SharedOut<f32>,
    k: PhantomData<K>,
}

impl<K: KernelForms<P>, const P: usize> Vectorised for KernelsToPlanes<'_, K, P> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(&self) {
        let kernels = self.w.len() / 9;
        let lanes = L::load_i(KERNEL_LANES.as_ptr());
        for g0 in (0..kernels).step_by(L::N) {
            let n = (kernels - g0).min(L::N);
            let src = self.w.as_ptr().add(g0 * 9);
            let mut g = [L::k(0.0); 9];
            for (r, gr) in g.iter_mut().enumerate() {
                *gr = L::gather(src, L::add_i(lanes, r as i32), L::first(n));
            }
            for (k, v) in K::u(g).into_iter().enumerate() {
                v.store(self.out.at(k * self.plane + self.o0 + g0), n);
            }
        }
    }
}

/// [`super::kernel_grads`]' work for kernels `o0..` (as many as `dg` holds), as
/// [`kernels_to_planes`].
pub(crate) fn planes_to_kernels<T: Elem, K: KernelForms<P>, const P: usize>(
    isa: Option<Isa>,
    du: &[T],
    o0: usize,
    plane: usize,
    dg: &mut [T],
) -> bool {
    let (Some(isa), Some(du), Some(dg)) = (isa, as_f32(du), as_f32_mut(dg)) else {
        return false;
    };
    assert!(du.len() >= P * plane && o0 + dg.len() / 9 <= plane);
    run_with(
        isa,
        &PlanesToKernels::<K, P> {
            du,
            o0,
            plane,
            dg: dg.as_mut_ptr(),
            n: dg.len() / 9,
            k: PhantomData,
        },
    );
    true
}

struct PlanesToKernels<'a, K, const P: usize> {
    du: &'a [f32],
    o0: usize,
    plane: usize,
    dg: *mut f32,
    n: usize,
    k: PhantomData<K>,
}

impl<K: KernelForms<P>, const P: usize> Vectorised for PlanesToKernels<'_, K, P> {
    #[inline(always)]
    unsafe fn run<L: Lanes>(&self) {
        let lanes = L::load_i(KERNEL_LANES.as_ptr());
        for g0 in (0..self.n).step_by(L::N) {
            let n = (self.n - g0).min(L::N);
            let mut d = [L::k(0.0); P];
            for (k, dk) in d.iter_mut().enumerate() {
                *dk = L::load(self.du.as_ptr().add(k * self.plane + self.o0 + g0), n);
            }
            for (r, v) in K::dg(d).into_iter().enumerate() {
                v.scatter(self.dg.add(g0 * 9), L::add_i(lanes, r as i32), L::first(n));
            }
        }
    }
}

/// Elements of a `[b, c, h, w]` tensor of the batch `tl` tiles.
fn elems(tl: &Tiles, c: usize) -> usize {
    tl.total / tl.per * c * tl.h * tl.w
}

/// The check both variants' gathered transforms pass: bitwise the scalar results.
#[cfg(test)]
pub(crate) mod check {
    use super::super::lanes::Isa;
    use super::super::{KernelForms, SharedOut, Tiles};

    type Blk = (usize, usize);
    type Bias<'a> = Option<(&'a [f32], usize)>;
    pub(crate) type ToPlanes = fn(&[f32], usize, &Tiles, Blk, &mut [f32]);
    pub(crate) type ToPlanesV = fn(Option<Isa>, &[f32], usize, &Tiles, Blk, &mut [f32]) -> bool;
    pub(crate) type ToImage = fn(&[f32], usize, &Tiles, Blk, SharedOut<f32>, Bias);
    pub(crate) type ToImageV =
        fn(Option<Isa>, &[f32], usize, &Tiles, Blk, SharedOut<f32>, Bias) -> bool;

    /// A variant's output tile side, planes, and (scalar, vector) transforms.
    pub(crate) struct Variant {
        pub m: usize,
        pub planes: usize,
        pub input: (ToPlanes, ToPlanesV),
        pub grad_output: (ToPlanes, ToPlanesV),
        pub output: (ToImage, ToImageV),
    }

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
                // Some exact zeros: the sign of a negated zero is checked too.
                ((s % 2001) as f32 / 1000.0 - 1.0) * !s.is_multiple_of(7) as u8 as f32
            })
            .collect()
    }

    /// Panics naming `what` and the first slot whose bits differ.
    fn same_bits(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len());
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!(
                "{what}: slot {i} is {:e}, the scalar transform gives {:e}",
                got[i], want[i]
            );
        }
    }

    /// Batch, channels, height, width: partial tiles at the bottom and right, tile rows shorter
    /// and longer than a vector. Blocks start and end inside tile rows and examples.
    const SHAPES: [(usize, usize, usize, usize); 5] = [
        (3, 5, 8, 8),
        (2, 3, 7, 9),
        (4, 2, 13, 6),
        (2, 4, 28, 28),
        (1, 17, 10, 33),
    ];

    /// Runs every transform of `v` both ways on each shape and instruction set and asserts the
    /// same bits (NaN-filled outputs, so a slot one side leaves unwritten also differs). Fails
    /// when a mask, an index or the order of the arithmetic is off.
    pub(crate) fn gathered_match_scalar(v: &Variant) {
        let isas = isas();
        for (b, c, h, w) in SHAPES {
            let tl = Tiles::new(b, h, w, v.m);
            for blk in [
                (0, tl.total),
                (1, tl.total - 2),
                (tl.total / 3, tl.total / 3 + 19),
            ] {
                let blk = (blk.0, blk.1.min(tl.total));
                let ld = blk.1 - blk.0;
                let x = noise(b * c * h * w, (b * 100 + h) as u32);
                let m = noise(v.planes * c * ld, 7 + c as u32);
                let bias = noise(b * (c + 1), 11);
                for (i, (scalar, vector)) in [v.input, v.grad_output].into_iter().enumerate() {
                    let mut want = vec![f32::NAN; v.planes * c * ld];
                    scalar(&x, c, &tl, blk, &mut want);
                    for &isa in &isas {
                        let mut got = vec![f32::NAN; v.planes * c * ld];
                        assert!(vector(Some(isa), &x, c, &tl, blk, &mut got));
                        let what = ["input", "grad_output"][i];
                        same_bits(
                            &got,
                            &want,
                            &format!("{what} {isa:?} {b}x{c}x{h}x{w} {blk:?}"),
                        );
                    }
                }
                for bias in [None, Some((&bias[..], c + 1))] {
                    let mut want = vec![f32::NAN; b * c * h * w];
                    (v.output.0)(&m, c, &tl, blk, SharedOut(want.as_mut_ptr()), bias);
                    for &isa in &isas {
                        let mut got = vec![f32::NAN; b * c * h * w];
                        let y = SharedOut(got.as_mut_ptr());
                        assert!((v.output.1)(Some(isa), &m, c, &tl, blk, y, bias));
                        let with = bias.is_some();
                        let what = format!("output {isa:?} {b}x{c}x{h}x{w} {blk:?} bias {with}");
                        same_bits(&got, &want, &what);
                    }
                }
            }
        }
        eprintln!("gathered transforms (m = {}) checked on {isas:?}", v.m);
    }

    /// The vector kernel transforms of `K` give bitwise the scalar formulas' results, on every
    /// instruction set this CPU has, for a count of kernels that is no multiple of a vector.
    pub(crate) fn kernel_forms_match<K: KernelForms<P>, const P: usize>() {
        let n = 16 * 3 + 5;
        let w = noise(9 * n, 5);
        let du = noise(P * n, 6);
        let mut want_u = vec![f32::NAN; P * n];
        let mut want_dg = vec![f32::NAN; 9 * n];
        for o in 0..n {
            let g: [f32; 9] = std::array::from_fn(|r| w[o * 9 + r]);
            for (k, v) in K::u(g).into_iter().enumerate() {
                want_u[k * n + o] = v;
            }
            let d: [f32; P] = std::array::from_fn(|k| du[k * n + o]);
            want_dg[o * 9..o * 9 + 9].copy_from_slice(&K::dg(d));
        }
        for isa in isas() {
            let mut u = vec![f32::NAN; P * n];
            assert!(super::kernels_to_planes::<f32, K, P>(
                Some(isa),
                &w,
                0,
                n,
                SharedOut(u.as_mut_ptr())
            ));
            same_bits(&u, &want_u, &format!("kernel transform {isa:?}"));
            let mut dg = vec![f32::NAN; 9 * n];
            assert!(super::planes_to_kernels::<f32, K, P>(
                Some(isa),
                &du,
                0,
                n,
                &mut dg
            ));
            same_bits(&dg, &want_dg, &format!("kernel gradient {isa:?}"));
        }
    }
}
