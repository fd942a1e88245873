//! Which examples each rank reads, in which order, and which it flips.
//!
//! Everything here is a pure function of its arguments, computed by every rank on its own: no rank
//! ever sends another an index list, and a resumed run recomputes exactly the plan the interrupted one
//! was following.
//!
//! # Epoch permutation
//! The order of epoch `e` is a Fisher-Yates shuffle of `0..N` driven by the ddpm-rng sequence
//! `StreamKey::new(seed, Stream::Shuffle, e, 0)`:
//!
//! ```text
//! perm = [0, 1, ..., N-1]
//! for s in 0..N-1:                       # s-th swap
//!     i = N - 1 - s
//!     u = (word(2s) << 32) | word(2s+1)   # 64 random bits
//!     j = (u * (i + 1)) >> 64             # uniform in 0..=i, bias < N / 2^64
//!     swap(perm[i], perm[j])
//! ```
//!
//! # Sharding
//! The permutation is consumed in global batches of `G = world * batch` examples; `N mod G` trailing
//! examples are dropped for that epoch (a different set each epoch). Global batch `g` is
//! `perm[g*G .. (g+1)*G]`, and rank `r` takes the `r`-th block of `batch` in it. So the concatenation,
//! in rank order, of what `world` ranks read with batch `B` is exactly what one rank reads with batch
//! `world * B`, and no two ranks ever read the same example in an epoch.
//!
//! # Flips
//! Example `i` is mirrored left-right in epoch `e` when the top bit of word 0 of
//! `StreamKey::new(seed, Stream::Flip, e, i)` is set. Keying by the dataset index (not the position in a
//! batch) makes the decision independent of world size, batch size and resume point.

use ddpm_rng::{Stream, StreamKey};

/// The shuffled order of `0..n` for one epoch.
pub fn epoch_permutation(n: u64, seed: u64, epoch: u64) -> Vec<u64> {
    let mut perm: Vec<u64> = (0..n).collect();
    if n < 2 {
        return perm;
    }
    let key = StreamKey::new(seed, Stream::Shuffle, epoch, 0);
    let swaps = n - 1;
    let mut s = 0u64;
    let mut block = 0u32;
    while s < swaps {
        let w = key.block(block);
        block = block.wrapping_add(1);
        for pair in [(w[0], w[1]), (w[2], w[3])] {
            if s >= swaps {
                break;
            }
            let i = n - 1 - s;
            let u = ((pair.0 as u64) << 32) | pair.1 as u64;
            let j = ((u as u128 * (i as u128 + 1)) >> 64) as u64;
            perm.swap(i as usize, j as usize);
            s += 1;
        }
    }
    perm
}

/// Full global batches per epoch: `n / (world * batch)`.
pub fn batches_per_epoch(n: u64, world: usize, batch: usize) -> u64 {
    n.checked_div((world as u64).saturating_mul(batch as u64))
        .unwrap_or(0)
}

/// Checks the sharding arguments; the error text names the offending one.
pub fn check_shard_args(n: u64, world: usize, rank: usize, batch: usize) -> Result<(), String> {
    if world == 0 {
        return Err("world size must be at least 1".into());
    }
    if rank >= world {
        return Err(format!("rank {rank} is not below the world size {world}"));
    }
    if batch == 0 {
        return Err("batch size must be at least 1".into());
    }
    let global = (world as u64).saturating_mul(batch as u64);
    if n < global {
        return Err(format!(
            "N = {n} examples is smaller than one global batch (world size {world} x batch {batch} = {}), \
             so some rank would get no data",
            (world as u128) * (batch as u128)
        ));
    }
    Ok(())
}

/// Rank `rank`'s slice of global batch `g` of an epoch permutation.
pub fn rank_block(perm: &[u64], world: usize, rank: usize, batch: usize, g: u64) -> &[u64] {
    let gsize = world * batch;
    let start = g as usize * gsize + rank * batch;
    &perm[start..start + batch]
}

/// The example indices rank `rank` reads in epoch `epoch`, in reading order: exactly what
/// [`crate::Loader`] delivers, batch after batch. Empty when `n < world * batch`.
///
/// # Panics
/// When `world == 0`, `batch == 0` or `rank >= world` (see [`check_shard_args`] to validate input).
pub fn shard_plan(
    n: u64,
    world: usize,
    rank: usize,
    batch: usize,
    epoch: u64,
    seed: u64,
) -> Vec<u64> {
    assert!(
        world > 0 && batch > 0 && rank < world,
        "shard_plan: bad world {world} / rank {rank} / batch {batch}"
    );
    let perm = epoch_permutation(n, seed, epoch);
    (0..batches_per_epoch(n, world, batch))
        .flat_map(|g| rank_block(&perm, world, rank, batch, g).iter().copied())
        .collect()
}

/// Whether example `index` is flipped left-right in `epoch` (when flipping is enabled).
pub fn flip_decision(seed: u64, epoch: u64, index: u64) -> bool {
    StreamKey::new(seed, Stream::Flip, epoch, index).word(0) >> 31 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation() {
        for n in [0u64, 1, 2, 3, 10, 1001] {
            let mut p = epoch_permutation(n, 7, 3);
            p.sort_unstable();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn shard_args_are_checked() {
        assert!(check_shard_args(10, 0, 0, 1).unwrap_err().contains("world"));
        assert!(check_shard_args(10, 2, 2, 1).unwrap_err().contains("rank"));
        assert!(check_shard_args(10, 2, 0, 0).unwrap_err().contains("batch"));
        assert!(check_shard_args(3, 4, 0, 1)
            .unwrap_err()
            .contains("world size 4"));
        assert!(check_shard_args(8, 4, 3, 2).is_ok());
    }
}
