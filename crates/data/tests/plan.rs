//! The shard plan: disjoint, complete up to the dropped tail, epoch-dependent, identical across
//! processes, and equal to an independent re-implementation of the documented scheme.

mod common;

use std::collections::HashSet;
use std::process::Command;

use ddpm_data::{batches_per_epoch, epoch_permutation, shard_plan};
use ddpm_rng::{Stream, StreamKey};

#[test]
fn union_over_ranks_is_disjoint_and_has_the_expected_size() {
    let n = 1000u64;
    for batch in [1usize, 7, 16] {
        for world in 1..=8usize {
            let g = (world * batch) as u64;
            for epoch in [0u64, 1, 5] {
                let mut seen = HashSet::new();
                let mut total = 0usize;
                for rank in 0..world {
                    let plan = shard_plan(n, world, rank, batch, epoch, 1234);
                    assert_eq!(
                        plan.len() as u64,
                        batches_per_epoch(n, world, batch) * batch as u64
                    );
                    total += plan.len();
                    for i in plan {
                        assert!(i < n, "index {i} out of range");
                        assert!(
                            seen.insert(i),
                            "example {i} read twice (world {world}, batch {batch}, epoch {epoch})"
                        );
                    }
                }
                assert_eq!(total as u64, n - n % g, "world {world} batch {batch}");
                assert_eq!(seen.len(), total);
            }
        }
    }
}

#[test]
fn w_ranks_with_batch_b_read_what_one_rank_with_batch_wb_reads() {
    let (n, batch) = (997u64, 5usize);
    for world in 1..=8usize {
        let single = shard_plan(n, 1, 0, world * batch, 3, 99);
        let plans: Vec<Vec<u64>> = (0..world)
            .map(|r| shard_plan(n, world, r, batch, 3, 99))
            .collect();
        let mut interleaved = Vec::new();
        for g in 0..batches_per_epoch(n, world, batch) as usize {
            for p in &plans {
                interleaved.extend_from_slice(&p[g * batch..(g + 1) * batch]);
            }
        }
        assert_eq!(interleaved, single, "world {world}");
    }
}

#[test]
fn plans_differ_between_epochs_and_seeds() {
    let n = 500;
    for world in 1..=8usize {
        for rank in 0..world {
            let e0 = shard_plan(n, world, rank, 4, 0, 7);
            let e1 = shard_plan(n, world, rank, 4, 1, 7);
            assert_ne!(
                e0, e1,
                "world {world} rank {rank}: epochs 0 and 1 have the same plan"
            );
            assert_ne!(
                e0,
                shard_plan(n, world, rank, 4, 0, 8),
                "seed has no effect"
            );
        }
    }
    // Across epochs the dropped tail changes too (a different 500 mod 12 = 8 examples).
    let kept = |e| {
        shard_plan(n, 3, 0, 4, e, 7)
            .into_iter()
            .chain(shard_plan(n, 3, 1, 4, e, 7))
            .chain(shard_plan(n, 3, 2, 4, e, 7))
            .collect::<HashSet<_>>()
    };
    assert_ne!(kept(0), kept(1));
}

/// The documented Fisher-Yates scheme, written out again from the doc comment.
fn reference_permutation(n: u64, seed: u64, epoch: u64) -> Vec<u64> {
    let key = StreamKey::new(seed, Stream::Shuffle, epoch, 0);
    let mut perm: Vec<u64> = (0..n).collect();
    for s in 0..n.saturating_sub(1) {
        let i = n - 1 - s;
        let u = ((key.word(2 * s) as u64) << 32) | key.word(2 * s + 1) as u64;
        let j = ((u as u128 * (i as u128 + 1)) >> 64) as u64;
        perm.swap(i as usize, j as usize);
    }
    perm
}

#[test]
fn permutation_matches_the_documented_scheme() {
    for (n, seed, epoch) in [
        (1u64, 0u64, 0u64),
        (2, 1, 0),
        (10, 5, 3),
        (1001, 42, 17),
        (60000, 0, 0),
    ] {
        assert_eq!(
            epoch_permutation(n, seed, epoch),
            reference_permutation(n, seed, epoch),
            "n {n}"
        );
    }
    // A uniform shuffle moves almost everything.
    let p = epoch_permutation(10_000, 3, 0);
    let fixed = p
        .iter()
        .enumerate()
        .filter(|(i, &v)| *i as u64 == v)
        .count();
    assert!(fixed < 10, "{fixed} fixed points");
}

#[test]
fn shard_plan_binary_prints_the_library_plan_in_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let file = common::write_synthetic(&dir.path().join("plan.h5"), 203, [2, 2, 3], None, 8);
    let exe = env!("CARGO_BIN_EXE_ddpm-data");
    for (world, rank, batch, epoch, seed) in [
        (1usize, 0usize, 10usize, 0u64, 5u64),
        (4, 3, 6, 2, 5),
        (8, 5, 3, 1, 77),
    ] {
        let run = || {
            let out = Command::new(exe)
                .args(["shard-plan", file.to_str().unwrap()])
                .args([
                    "--world",
                    &world.to_string(),
                    "--rank",
                    &rank.to_string(),
                    "--batch",
                    &batch.to_string(),
                ])
                .args(["--epoch", &epoch.to_string(), "--seed", &seed.to_string()])
                .output()
                .expect("run ddpm-data");
            assert!(
                out.status.success(),
                "shard-plan failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let a = run();
        let b = run();
        assert_eq!(a, b, "two processes printed different plans");
        let parsed: Vec<u64> = a.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(parsed, shard_plan(203, world, rank, batch, epoch, seed));
        assert!(!parsed.is_empty());
    }
}

#[test]
fn shard_plan_binary_rejects_a_world_larger_than_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let file = common::write_synthetic(&dir.path().join("tiny.h5"), 5, [2, 2, 1], None, 2);
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm-data"))
        .args(common::shard_plan_args(&file, "8", "1"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tiny.h5") && err.contains("`images`") && err.contains("world size 8"),
        "{err}"
    );
}
