//! Winograd convolution for the U-Net's 3x3, stride-1, padding-1 convolutions (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016), in two variants:
//! [`F2`] = F(2x2, 3x3) (4x4 input tiles, 16 planes) and [`F4`] = F(4x4, 3x3) (6x6 input tiles,
//! 36 planes).
//!
//! Each `m x m` output tile is `A^T [(G g G^T) * (B^T d B)] A` for its input tile `d`; summed
//! over input channels the per-plane products are independent GEMMs `M[k] = U[k] . V[k]`
//! (`U[k]`: `[cout, cin]`, `V[k]`: `[cin, tiles]`). This module is the part both variants share:
//!
//! - forward: `V = B^T d B`, `M = U V`, `y = A^T M A (+ bias)`;
//! - input gradient: the same convolution of `dY` with the kernel flipped and its channels
//!   transposed (the adjoint of a "same" 3x3 correlation);
//! - weight gradient: with `dM = A dY A^T` per tile, `dU[k] = sum over tiles dM[k] V[k]^T`
//!   (GEMMs reducing over every tile of the batch) and `dg = G^T dU G`.
//!
//! Tiles of all examples are numbered together and processed in blocks of a few MiB of
//! transformed data; blocks run on different threads (forward, input gradient) or are split
//! into one fixed range per thread whose weight-gradient sums are added in order (deterministic
//! for a thread count). The variants supply the transforms.

use rayon::prelude::*;

use crate::elem::{Elem, Uninit};
use crate::gemm::{gemm, Mat};
use crate::im2col::Geom;
use crate::runtime::num_threads;
use lanes::{Arith, Isa};

pub(crate) use f2::F2;
pub(crate) use f4::F4;

/// Whether a conv takes a Winograd path (3x3, stride 1, padding 1, and not switched off).
pub(crate) fn applies(g: &Geom) -> bool {
    crate::runtime::winograd_enabled() && g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1
}

/// Whether a Winograd conv with `cout` outputs takes [`F4`]: F(4x4) not switched off, a feature
/// map of at least 8 pixels a side (below that most of a 4x4 tile is padding) and 16+ channels in
/// or out. With the gathered transforms the thin convs (the U-Net's first and last, 1 or 3
/// channels on one side) are faster in F(4x4) too, its transformed data being 2.25x the image
/// instead of 4x: 1->32 and 32->1 at 28x28 took 30-60% less time in each direction
/// (bench/RESULTS.md, session 10). With the scalar transforms they had been ~20% slower.
pub(crate) fn use_f4(g: &Geom, cout: usize) -> bool {
    crate::runtime::winograd4_enabled() && g.h.min(g.w) >= 8 && g.cin.max(cout) >= 16
}

/// One Winograd variant: its tile size and its transforms.
pub(crate) trait Variant {
    /// Output tile side.
    const M: usize;
    /// Transformed planes, `(M + 2)^2`.
    const PLANES: usize;
    /// Bytes of transformed data one block aims for (its V and M planes).
    const BLOCK_BYTES: usize;
    /// Fewest tiles in a block.
    const MIN_BLOCK: usize;
    /// `U = G g G^T` for `w` `[cout, cin, 3, 3]`: `PLANES` planes `[cout, cin]`.
    fn kernel_transform<T: Elem>(w: &[T], cout: usize, cin: usize) -> Vec<T>;
    /// `dg = G^T dU G` for `PLANES` planes `[cout, cin]`; returns `[cout, cin, 3, 3]`.
    fn kernel_grad_transform<T: Elem>(du: &[T], cout: usize, cin: usize) -> Vec<T>;
    /// `V = B^T d B` of the block's tiles of `x` (`[b, c, h, w]`) into planes `[c, ld]`. Each
    /// tile transform runs gathered with `isa` (f32 only), else as scalar loops: the same values.
    fn input_transform<T: Elem>(
        isa: Option<Isa>,
        x: &[T],
        c: usize,
        tl: &Tiles,
        blk: (usize, usize),
        v: &mut [T],
    );
    /// `y = A^T M A (+ bias)` of the block's tiles from planes `[c, ld]`, into `y`.
    fn output_transform<T: Elem>(
        isa: Option<Isa>,
        m: &[T],
        c: usize,
        tl: &Tiles,
        blk: (usize, usize),
        y: SharedOut<T>,
        bias: Option<(&[T], usize)>,
    );
    /// `dM = A dY A^T` of the block's tiles of `dy` (`[b, c, h, w]`) into planes `[c, ld]`.
    fn grad_output_transform<T: Elem>(
        isa: Option<Isa>,
        dy: &[T],
        c: usize,
        tl: &Tiles,
        blk: (usize, usize),
        dm: &mut [T],
    );
}

/// `impl Variant for $ty` from the invoking module's functions, which both variants name
/// alike: `kernel_transform`, `kernel_grad_transform`, the scalar tile transforms
/// `input_scalar`, `output_scalar`, `grad_output_scalar` (called through AVX2+FMA builds of
/// themselves where the CPU has them) and the gathered ones ([`gathered`], with the variant's
/// [`gathered::TileForms`]), which run first and report whether they could (f32 on a CPU with
/// AVX2 or AVX-512).
macro_rules! impl_variant {
    ($ty:ident { M: $m:expr, PLANES: $planes:expr, BLOCK_BYTES: $bytes:expr, MIN_BLOCK: $min:expr }) => {
        const S: usize = $m + 2;
        const M: usize = $m;
        $crate::simd::simd_variant!(fn input_transform_simd<T>(
            x: &[T],
            c: usize,
            tl: &Tiles,
            t: (usize, usize),
            v: &mut [T],
        ) -> () = input_scalar);
        $crate::simd::simd_variant!(fn output_transform_simd<T>(
            m: &[T],
            c: usize,
            tl: &Tiles,
            t: (usize, usize),
            y: SharedOut<T>,
            bias: Option<(&[T], usize)>,
        ) -> () = output_scalar);
        $crate::simd::simd_variant!(fn grad_output_transform_simd<T>(
            dy: &[T],
            c: usize,
            tl: &Tiles,
            t: (usize, usize),
            dm: &mut [T],
        ) -> () = grad_output_scalar);

        impl $crate::winograd::Variant for $ty {
            const M: usize = $m;
            const PLANES: usize = $planes;
            const BLOCK_BYTES: usize = $bytes;
            const MIN_BLOCK: usize = $min;

            fn kernel_transform<T: Elem>(w: &[T], cout: usize, cin: usize) -> Vec<T> {
                kernel_transform(w, cout, cin)
            }
            fn kernel_grad_transform<T: Elem>(du: &[T], cout: usize, cin: usize) -> Vec<T> {
                kernel_grad_transform(du, cout, cin)
            }
            fn input_transform<T: Elem>(
                isa: Option<$crate::winograd::lanes::Isa>,
                x: &[T],
                c: usize,
                tl: &Tiles,
                blk: (usize, usize),
                v: &mut [T],
            ) {
                if !$crate::winograd::gathered::input::<T, $ty, S, M>(isa, x, c, tl, blk, v) {
                    input_transform_simd(x, c, tl, blk, v)
                }
            }
            fn output_transform<T: Elem>(
                isa: Option<$crate::winograd::lanes::Isa>,
                m: &[T],
                c: usize,
                tl: &Tiles,
                blk: (usize, usize),
                y: SharedOut<T>,
                bias: Option<(&[T], usize)>,
            ) {
                use $crate::winograd::gathered::output;
                if !output::<T, $ty, S, M>(isa, m, c, tl, blk, y, bias) {
                    output_transform_simd(m, c, tl, blk, y, bias)
                }
            }
            fn grad_output_transform<T: Elem>(
                isa: Option<$crate::winograd::lanes::Isa>,
                dy: &[T],
                c: usize,
                tl: &Tiles,
                blk: (usize, usize),
                dm: &mut [T],
            ) {
                use $crate::winograd::gathered::grad_output;
                if !grad_output::<T, $ty, S, M>(isa, dy, c, tl, blk, dm) {
                    grad_output_transform_simd(dy, c, tl, blk, dm)
                }
            }
        }
    };
}

/// The tile grid of a batch: `th x tw` tiles of `m x m` outputs per example.
#[derive(Clone, Copy)]
pub(crate) struct Tiles {
    pub h: usize,
    pub w: usize,
    pub th: usize,
    pub tw: usize,
    pub per: usize,
    pub total: usize,
}

impl Tiles {
    fn new(b: usize, h: usize, w: usize, m: usize) -> Self {
        let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
        Self {
            h,
            w,
            th,
            tw,
            per: th * tw,
            total: b * th * tw,
        }
    }

    /// (example, tile row, tile column) of global tile `t`.
    #[inline(always)]
    pub fn locate(&self, t: usize) -> (usize, usize, usize) {
        let (e, r) = (t / self.per, t % self.per);
        (e, r / self.tw, r % self.tw)
    }

    /// The blocks of `V`: transformed data for `channels` input + output channels that fits
    /// [`FIT_BYTES`] (the GEMMs then read `V` and write `M` in L2) unless that leaves fewer than
    /// [`WIDE_BLOCK`] tiles, too narrow for the GEMMs' 32-column register blocks; then up to
    /// `V::BLOCK_BYTES`. The number of blocks is a multiple of the thread count (when there are
    /// more blocks than threads), so that no thread runs one block more than another.
    fn blocks<V: Variant, T>(&self, channels: usize) -> Vec<(usize, usize)> {
        let per_tile = V::PLANES * channels * std::mem::size_of::<T>();
        let bytes = |b: usize| crate::runtime::winograd_block_bytes(b) / per_tile;
        let fit = bytes(FIT_BYTES.min(V::BLOCK_BYTES));
        let target = bytes(V::BLOCK_BYTES)
            .min(fit.max(WIDE_BLOCK))
            .clamp(V::MIN_BLOCK, 512)
            .min(self.total)
            .max(1);
        let threads = num_threads();
        let mut count = self.total.div_ceil(target);
        if count > threads {
            count = count.next_multiple_of(threads).min(self.total);
        }
        let nb = self.total.div_ceil(count).max(1);
        let total = self.total;
        (0..total.div_ceil(nb))
            .map(|i| (i * nb, ((i + 1) * nb).min(total)))
            .collect()
    }

    /// The block's tiles split by example: `(example, first tile, end tile)` (global indices).
    pub fn example_runs(&self, (t0, t1): (usize, usize)) -> Vec<(usize, usize, usize)> {
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

/// Transformed data per block that stays in a core's L2 (1-2 MiB on the CPUs measured).
const FIT_BYTES: usize = 1 << 20;

/// Tiles a block should have at least, if its data fits `V::BLOCK_BYTES`: the 28x28 map of
/// 32 channels ran ~20% faster in 128-tile (1 MiB) blocks than in 455-tile (4 MiB) ones, while
/// 256 channels at 8x8 ran 20-35% slower in 16-tile blocks than in 56-tile ones
/// (bench/RESULTS.md, session 10).
const WIDE_BLOCK: usize = 128;

/// A raw output pointer shared by threads that write disjoint elements. Whoever creates one
/// promises that it addresses a whole `[b, c, h, w]` output and that each pixel is written by
/// one tile only.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<T>(pub *mut T);
// SAFETY: only used for writes to disjoint elements, each by one thread.
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The address of element `i` (a method, so that closures capture the whole `SharedOut`).
    ///
    /// # Safety
    /// `i` must lie within the output.
    #[inline(always)]
    pub unsafe fn at(self, i: usize) -> *mut T {
        self.0.add(i)
    }
}

/// Kernels per parallel task of the kernel transforms: they run once per conv and direction,
/// and done serially they were ~2% of a 2-thread training step, on one core.
pub(crate) const KERNEL_CHUNK: usize = 1024;

/// A variant's kernel transforms as formulas over scalars or vectors of kernels.
pub(crate) trait KernelForms<const P: usize> {
    /// `G g G^T` of a 3x3 kernel `g` (row-major): `P` values.
    fn u<X: Arith>(g: [X; 9]) -> [X; P];
    /// `G^T dU G`: the 3x3 kernel gradient from the `P` values of `dU`.
    fn dg<X: Arith>(du: [X; P]) -> [X; 9];
}

/// `U` as `P` planes `[plane]` of [`KernelForms::u`] of each kernel of `w`: chunks of kernels in
/// parallel, each writing its kernels' values straight into the planes (`P` sequential write
/// streams per task; f32 `N` kernels at a time with [`gathered`]'s vectors). Collecting
/// per-kernel arrays first and then filling each plane from them read the whole array once per
/// plane: for 256 x 256 kernels 36 passes over 9 MiB, 3x the time of the conv's GEMMs on an
/// 8x8 map.
///
/// `w` must hold exactly `plane` 3x3 kernels: every slot of `U` is then written once. Any other
/// length panics here, before an uninitialised slot could be read.
pub(crate) fn kernel_planes<T: Elem, K: KernelForms<P>, const P: usize>(
    w: &[T],
    plane: usize,
) -> Vec<T> {
    assert_eq!(
        Some(w.len()),
        plane.checked_mul(9),
        "winograd kernel transform: {} weights are not {plane} 3x3 kernels",
        w.len()
    );
    let mut u = Uninit::<T>::new(P * plane);
    let out = SharedOut(u.slots().as_mut_ptr() as *mut T);
    let isa = Isa::detect();
    w.par_chunks(9 * KERNEL_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let o0 = c * KERNEL_CHUNK;
            if gathered::kernels_to_planes::<T, K, P>(isa, chunk, o0, plane, out) {
                return;
            }
            for (i, g) in chunk.chunks_exact(9).enumerate() {
                let g: [T; 9] = std::array::from_fn(|r| g[r]);
                for (k, v) in K::u(g).into_iter().enumerate() {
                    // SAFETY: o0 + i < plane (w holds `plane` kernels), so slot k * plane + o0
                    // + i lies in `u`; each (k, kernel) is written by this kernel's task only.
                    unsafe { out.at(k * plane + o0 + i).write(v) };
                }
            }
        });
    // SAFETY: P planes of `plane` values: kernel o wrote slot k * plane + o for every k < P,
    // and `w` has `plane` kernels (checked above).
    unsafe { u.assume_init() }
}

/// `dg` (`[plane, 3, 3]`) = [`KernelForms::dg`] of each kernel's values in the `P` planes
/// `[plane]` of `du`; chunks of kernels in parallel as [`kernel_planes`].
pub(crate) fn kernel_grads<T: Elem, K: KernelForms<P>, const P: usize>(
    du: &[T],
    plane: usize,
) -> Vec<T> {
    assert_eq!(
        du.len(),
        P * plane,
        "winograd kernel gradient: planes of {plane}"
    );
    let mut dg = vec![T::ZERO; 9 * plane];
    let isa = Isa::detect();
    dg.par_chunks_mut(9 * KERNEL_CHUNK)
        .enumerate()
        .for_each(|(c, out)| {
            let o0 = c * KERNEL_CHUNK;
            if gathered::planes_to_kernels::<T, K, P>(isa, du, o0, plane, out) {
                return;
            }
            for (i, dst) in out.chunks_exact_mut(9).enumerate() {
                let d: [T; P] = std::array::from_fn(|k| du[k * plane + o0 + i]);
                dst.copy_from_slice(&K::dg(d));
            }
        });
    dg
}

/// The `PLANES` GEMMs `out[k] (+)= lhs[k] . rhs[k]` of a block, with planes of the given shapes.
#[allow(clippy::too_many_arguments)]
fn plane_gemms<T: Elem>(
    planes: usize,
    m: usize,
    n: usize,
    k: usize,
    out: *mut T,
    accumulate: bool,
    lhs: impl Fn(usize) -> Mat<T>,
    rhs: impl Fn(usize) -> Mat<T>,
    threads: usize,
) {
    for p in 0..planes {
        // SAFETY: the callers size `out` as `planes` planes of m x n and the operands as m x k,
        // k x n.
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
fn conv_transformed<V: Variant, T: Elem>(
    b: usize,
    cin: usize,
    cout: usize,
    (h, w): (usize, usize),
    x: &[T],
    u: &[T],
    bias: Option<(&[T], usize)>,
) -> Vec<T> {
    let p = V::PLANES;
    let tl = Tiles::new(b, h, w, V::M);
    let blocks = tl.blocks::<V, T>(cin + cout);
    let mut out = Uninit::<T>::new(b * cout * h * w);
    let isa = Isa::detect();
    // The whole output; blocks cover disjoint tiles, hence disjoint output pixels.
    let y = SharedOut(out.slots().as_mut_ptr() as *mut T);
    let gemm_threads = if blocks.len() >= num_threads() {
        1
    } else {
        num_threads()
    };
    let run = |blk: (usize, usize)| {
        let ld = blk.1 - blk.0;
        T::with_scratch(p * (cin + cout) * ld, |buf| {
            let (v, m) = buf.split_at_mut(p * cin * ld);
            V::input_transform(isa, x, cin, &tl, blk, v);
            plane_gemms(
                p,
                cout,
                ld,
                cin,
                m.as_mut_ptr(),
                false,
                |k| Mat::rows(&u[k * cout * cin..], cin),
                |k| Mat::rows(&v[k * cin * ld..], ld),
                gemm_threads,
            );
            V::output_transform(isa, m, cout, &tl, blk, y, bias);
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
pub(crate) fn forward<V: Variant, T: Elem>(
    b: usize,
    cin: usize,
    cout: usize,
    hw: (usize, usize),
    x: &[T],
    w: &[T],
    bias: Option<(&[T], usize)>,
) -> Vec<T> {
    let u = V::kernel_transform(w, cout, cin);
    conv_transformed::<V, T>(b, cin, cout, hw, x, &u, bias)
}

/// Input gradient: `dy [b, cout, h, w]` convolved with the flipped, channel-transposed kernel.
pub(crate) fn input_grad<V: Variant, T: Elem>(
    b: usize,
    cin: usize,
    cout: usize,
    hw: (usize, usize),
    w: &[T],
    dy: &[T],
) -> Vec<T> {
    let mut flipped = vec![T::ZERO; w.len()];
    flipped
        .par_chunks_exact_mut(cout * 9)
        .enumerate()
        .for_each(|(ci, row)| {
            for co in 0..cout {
                for r in 0..9 {
                    row[co * 9 + r] = w[(co * cin + ci) * 9 + (8 - r)];
                }
            }
        });
    let u = V::kernel_transform(&flipped, cin, cout);
    conv_transformed::<V, T>(b, cout, cin, hw, dy, &u, None)
}

/// Weight gradient `[cout, cin, 3, 3]`: `dU = sum_tiles dM V^T`, `dg = G^T dU G`.
pub(crate) fn weight_grad<V: Variant, T: Elem>(
    b: usize,
    cin: usize,
    cout: usize,
    (h, w): (usize, usize),
    x: &[T],
    dy: &[T],
) -> Vec<T> {
    let p = V::PLANES;
    let tl = Tiles::new(b, h, w, V::M);
    let blocks = tl.blocks::<V, T>(cin + cout);
    let chunks = num_threads().min(blocks.len()).max(1);
    let gemm_threads = if chunks > 1 { 1 } else { num_threads() };
    let bounds: Vec<usize> = (0..=chunks).map(|i| i * blocks.len() / chunks).collect();
    let isa = Isa::detect();
    let run_chunk = |i: usize| -> Vec<T> {
        let mut du = vec![T::ZERO; p * cout * cin];
        for &blk in &blocks[bounds[i]..bounds[i + 1]] {
            let ld = blk.1 - blk.0;
            T::with_scratch(p * (cin + cout) * ld, |buf| {
                let (v, dm) = buf.split_at_mut(p * cin * ld);
                V::input_transform(isa, x, cin, &tl, blk, v);
                V::grad_output_transform(isa, dy, cout, &tl, blk, dm);
                plane_gemms(
                    p,
                    cout,
                    cin,
                    ld,
                    du.as_mut_ptr(),
                    true,
                    |k| Mat::rows(&dm[k * cout * ld..], ld),
                    |k| Mat::rows(&v[k * cin * ld..], ld).t(),
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
    // Added in chunk order for every element (deterministic), elements split over threads.
    du.par_chunks_mut(4096).enumerate().for_each(|(j, dst)| {
        let (at, len) = (j * 4096, dst.len());
        for part in &rest {
            dst.iter_mut()
                .zip(&part[at..at + len])
                .for_each(|(a, v)| *a += *v);
        }
    });
    V::kernel_grad_transform(&du, cout, cin)
}

mod calibrate;
mod f2;
mod f4;
mod gathered;
mod lanes;

pub(crate) use calibrate::gather_pays;

/// The vector instruction set the gathered transforms would use on this CPU.
pub(crate) fn cpu_isa() -> Option<Isa> {
    Isa::cpu()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel form that keeps the first weight (and minus the last).
    struct Probe;
    impl KernelForms<2> for Probe {
        fn u<X: Arith>(g: [X; 9]) -> [X; 2] {
            [g[0], -g[8]]
        }
        fn dg<X: Arith>(du: [X; 2]) -> [X; 9] {
            [
                du[0], du[1], du[0], du[1], du[0], du[1], du[0], du[1], du[0],
            ]
        }
    }

    /// Three planes' worth of slots but one kernel: before the length check, the second slot of
    /// each plane stayed uninitialised and `assume_init` returned it as a value.
    #[test]
    #[should_panic(expected = "are not 3 3x3 kernels")]
    fn kernel_planes_refuses_too_few_kernels() {
        let w = [1f32; 9];
        let _ = kernel_planes::<f32, Probe, 2>(&w, 3);
    }

    /// Every slot written, in f64 (scalar) and f32 (vector where the CPU has it), with more
    /// kernels than a chunk and than a vector, so that tails are covered.
    #[test]
    fn kernel_planes_and_grads_write_every_slot() {
        let n = KERNEL_CHUNK + 21;
        let w: Vec<f64> = (0..9 * n).map(|i| i as f64).collect();
        let want: Vec<f64> = (0..n)
            .map(|o| 9.0 * o as f64)
            .chain((0..n).map(|o| -(9.0 * o as f64 + 8.0)))
            .collect();
        assert_eq!(kernel_planes::<f64, Probe, 2>(&w, n), want);
        let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_eq!(kernel_planes::<f32, Probe, 2>(&w32, n), want32);
        let dg32 = kernel_grads::<f32, Probe, 2>(&want32, n);
        let dg64 = kernel_grads::<f64, Probe, 2>(&want, n);
        for o in 0..n {
            let (a, b) = (want[o], want[n + o]);
            let expect = [a, b, a, b, a, b, a, b, a];
            assert_eq!(&dg64[o * 9..o * 9 + 9], &expect);
            let got: Vec<f64> = dg32[o * 9..o * 9 + 9].iter().map(|&v| v as f64).collect();
            assert_eq!(got, expect.map(|v| v as f32 as f64));
        }
    }
}
