//! What the variants' gathered (vector) transforms share: the block's tile grid as i32 lanes,
//! and running a kernel generic over [`Lanes`] with the instruction set the CPU has.
//!
//! The scalar transforms copy every tile element into scratch planes one value at a time (36
//! scattered stores per tile for F(4x4)); with tile rows 2-7 tiles long on the U-Net's small
//! maps, vectorising along a tile row does not pay. The gathered kernels instead take `N`
//! consecutive tiles of the block, wherever they lie (across rows and examples), fetch one
//! tile element of all of them with one masked gather, transform in registers and store whole
//! vectors into the planes: no scratch, no padded copy of the image.

use super::lanes::{Isa, Lanes};
use super::Tiles;

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
}

/// A transform written once for any vector width.
pub(crate) trait Kernel {
    /// # Safety
    /// Only called by [`run`], on a CPU with `L`'s instruction set.
    unsafe fn run<L: Lanes>(&self);
}

/// Runs `k` with `isa`'s vectors.
pub(crate) fn run(k: &impl Kernel, isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn zmm<K: Kernel>(k: &K) {
            k.run::<super::lanes::Z>()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn ymm<K: Kernel>(k: &K) {
            k.run::<super::lanes::Y>()
        }
        // SAFETY: `isa` came from `Isa::detect`, which checked the CPU's features.
        match isa {
            Isa::Avx512 => unsafe { zmm(k) },
            Isa::Avx2 => unsafe { ymm(k) },
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (k, isa);
        unreachable!("Isa::detect finds no vector set off x86-64")
    }
}
