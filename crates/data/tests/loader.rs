//! The real Loader: content, split equivalence, resume, flips, labels, error propagation.

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::{expected_decoded, synthetic_label, write_synthetic};
use ddpm_data::{flip_decision, shard_plan, Batch, Loader, LoaderConfig, LoaderPosition};

const HWC: [usize; 3] = [5, 4, 3];

fn cfg(path: &Path, world: usize, rank: usize, batch: usize, flip: bool) -> LoaderConfig {
    LoaderConfig {
        path: path.to_path_buf(),
        world,
        rank,
        batch,
        seed: 2024,
        flip,
        prefetch: 3,
    }
}

fn take(loader: &mut Loader, k: usize) -> Vec<Batch> {
    (0..k)
        .map(|_| loader.next_batch().expect("batch"))
        .collect()
}

#[test]
fn batches_hold_the_planned_examples_decoded_and_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_synthetic(&dir.path().join("d.h5"), 103, HWC, Some(4), 7);
    let mut l = Loader::new(cfg(&f, 1, 0, 8, false), LoaderPosition::default()).unwrap();
    assert_eq!(l.batches_per_epoch(), 12);
    let plan0 = shard_plan(103, 1, 0, 8, 0, 2024);
    let plan1 = shard_plan(103, 1, 0, 8, 1, 2024);
    let batches = take(&mut l, 13);
    let got: Vec<u64> = batches[..12]
        .iter()
        .flat_map(|b| b.indices.clone())
        .collect();
    assert_eq!(got, plan0);
    assert_eq!(
        batches[12].indices,
        plan1[..8].to_vec(),
        "loader must roll into epoch 1"
    );
    assert_eq!((batches[12].epoch, batches[12].batch_index), (1, 0));
    let [h, w, c] = HWC;
    for b in &batches {
        assert_eq!(b.shape, [8, c, h, w]);
        let labels = b.labels.as_ref().expect("labelled file");
        for (j, &i) in b.indices.iter().enumerate() {
            let img = &b.images[j * h * w * c..(j + 1) * h * w * c];
            assert_eq!(
                img,
                &expected_decoded(i as usize, h, w, c, false)[..],
                "example {i}"
            );
            assert_eq!(labels[j] as i64, synthetic_label(i as usize, 4));
        }
        assert!(b.images.iter().all(|&x| (-1.0..=1.0).contains(&x)));
    }
}

#[test]
fn w_ranks_with_batch_b_equal_one_rank_with_batch_wb() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_synthetic(&dir.path().join("d.h5"), 211, HWC, Some(3), 9);
    let batch = 3;
    for world in [1usize, 2, 3, 4, 7] {
        let mut single = Loader::new(
            cfg(&f, 1, 0, world * batch, true),
            LoaderPosition::default(),
        )
        .unwrap();
        let mut ranks: Vec<Loader> = (0..world)
            .map(|r| {
                Loader::new(cfg(&f, world, r, batch, true), LoaderPosition::default()).unwrap()
            })
            .collect();
        let steps = single.batches_per_epoch() as usize * 2 + 1; // crosses two epoch boundaries
        for ranks_l in &ranks {
            assert_eq!(ranks_l.batches_per_epoch(), single.batches_per_epoch());
        }
        for step in 0..steps {
            let s = single.next_batch().unwrap();
            let parts: Vec<Batch> = ranks.iter_mut().map(|l| l.next_batch().unwrap()).collect();
            let cat_images: Vec<f32> = parts.iter().flat_map(|b| b.images.clone()).collect();
            let cat_idx: Vec<u64> = parts.iter().flat_map(|b| b.indices.clone()).collect();
            let cat_labels: Vec<u32> = parts
                .iter()
                .flat_map(|b| b.labels.clone().unwrap())
                .collect();
            assert_eq!(cat_idx, s.indices, "world {world} step {step}");
            assert_eq!(
                cat_images, s.images,
                "world {world} step {step}: pixels differ"
            );
            assert_eq!(cat_labels, s.labels.clone().unwrap());
            for p in &parts {
                assert_eq!((p.epoch, p.batch_index), (s.epoch, s.batch_index));
            }
        }
    }
}

#[test]
fn resume_continues_with_exactly_the_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_synthetic(&dir.path().join("d.h5"), 100, HWC, None, 6);
    let c = cfg(&f, 2, 1, 7, true);
    let mut full = Loader::new(c.clone(), LoaderPosition::default()).unwrap();
    let bpe = full.batches_per_epoch();
    assert_eq!(bpe, 7);
    let reference = take(&mut full, 3 * bpe as usize);
    // Stop after k batches (including right at and just before an epoch boundary), save, resume.
    for k in [1usize, 5, 6, 7, 8, 13, 15] {
        let mut l = Loader::new(c.clone(), LoaderPosition::default()).unwrap();
        take(&mut l, k);
        let pos = l.position();
        assert_eq!(
            pos,
            LoaderPosition {
                epoch: k as u64 / bpe,
                batch_index: k as u64 % bpe
            }
        );
        let saved = serde_json::to_string(&pos).unwrap();
        drop(l);
        let restored: LoaderPosition = serde_json::from_str(&saved).unwrap();
        let mut resumed = Loader::new(c.clone(), restored).unwrap();
        let next = take(&mut resumed, 4);
        assert_eq!(next[..], reference[k..k + 4], "resume after {k} batches");
        assert_eq!(
            resumed.position(),
            LoaderPosition {
                epoch: (k as u64 + 4) / bpe,
                batch_index: (k as u64 + 4) % bpe
            }
        );
    }
}

#[test]
fn a_position_past_the_epoch_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_synthetic(&dir.path().join("d.h5"), 50, HWC, None, 6);
    let err = Loader::new(
        cfg(&f, 1, 0, 10, false),
        LoaderPosition {
            epoch: 0,
            batch_index: 5,
        },
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("past the 5 batches per epoch"),
        "{err}"
    );
}

#[test]
fn flips_are_seeded_per_example_and_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_synthetic(&dir.path().join("d.h5"), 120, HWC, None, 10);
    let [h, w, c] = HWC;
    let run = || {
        let mut l = Loader::new(cfg(&f, 1, 0, 12, true), LoaderPosition::default()).unwrap();
        take(&mut l, 20) // two epochs
    };
    let a = run();
    assert_eq!(a, run(), "same seed, different flips");
    let mut flipped = 0;
    let mut per_epoch: [HashSet<u64>; 2] = Default::default();
    for b in &a {
        for (j, &i) in b.indices.iter().enumerate() {
            let img = &b.images[j * h * w * c..(j + 1) * h * w * c];
            let flip = flip_decision(2024, b.epoch, i);
            assert_eq!(
                img,
                &expected_decoded(i as usize, h, w, c, flip)[..],
                "example {i} epoch {}",
                b.epoch
            );
            assert_ne!(img, &expected_decoded(i as usize, h, w, c, !flip)[..]);
            if flip {
                flipped += 1;
                per_epoch[b.epoch as usize].insert(i);
            }
        }
    }
    assert!((90..=150).contains(&flipped), "{flipped} of 240 flipped");
    assert_ne!(
        per_epoch[0], per_epoch[1],
        "flips must change between epochs"
    );
    // With flip off nothing is mirrored.
    let mut l = Loader::new(cfg(&f, 1, 0, 12, false), LoaderPosition::default()).unwrap();
    let b = l.next_batch().unwrap();
    for (j, &i) in b.indices.iter().enumerate() {
        assert_eq!(
            &b.images[j * h * w * c..(j + 1) * h * w * c],
            &expected_decoded(i as usize, h, w, c, false)[..]
        );
    }
}

#[test]
fn a_corrupt_chunk_is_reported_through_next_batch_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_synthetic(&dir.path().join("corrupt.h5"), 200, [8, 8, 3], None, 10);
    // Overwrite the middle of one compressed chunk so deflate fails when the loader reads it.
    let (offset, size) = {
        let file = hdf5::File::open(&f).unwrap();
        let ds = file.dataset("images").unwrap();
        let info = ds.chunk_info(7).expect("chunk info");
        (info.addr, info.size)
    };
    let mut bytes = std::fs::read(&f).unwrap();
    for b in &mut bytes[offset as usize + 2..(offset + size) as usize - 2] {
        *b = 0xA5;
    }
    std::fs::write(&f, &bytes).unwrap();
    let mut l = Loader::new(cfg(&f, 1, 0, 10, false), LoaderPosition::default())
        .expect("metadata is intact");
    let mut err = None;
    for _ in 0..l.batches_per_epoch() {
        match l.next_batch() {
            Ok(_) => {}
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err
        .expect("reading every chunk of an epoch must hit the corrupt one")
        .to_string();
    assert!(
        err.contains("corrupt.h5") && err.contains("`images`"),
        "{err}"
    );
    let again = l.next_batch().unwrap_err().to_string();
    assert!(
        again.contains("earlier error") && again.contains("corrupt.h5"),
        "{again}"
    );
}

#[test]
fn every_rank_gets_only_its_own_examples_over_an_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_synthetic(&dir.path().join("d.h5"), 157, HWC, None, 11);
    for world in 1..=8usize {
        let batch = 4;
        let mut seen = HashSet::new();
        let mut fingerprints = HashSet::new();
        let mut total = 0;
        for rank in 0..world {
            let mut l = Loader::new(
                cfg(&f, world, rank, batch, false),
                LoaderPosition::default(),
            )
            .unwrap();
            let bpe = l.batches_per_epoch() as usize;
            for b in take(&mut l, bpe) {
                assert_eq!(b.epoch, 0);
                for (j, &i) in b.indices.iter().enumerate() {
                    assert!(seen.insert(i), "world {world}: example {i} read twice");
                    let ib = 5 * 4 * 3;
                    assert!(
                        fingerprints.insert(common::fingerprint(&b.images[j * ib..(j + 1) * ib]))
                    );
                    total += 1;
                }
            }
        }
        assert_eq!(total, 157 - 157 % (world * batch), "world {world}");
    }
}

#[test]
fn prefetch_depth_does_not_change_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_synthetic(&dir.path().join("d.h5"), 64, HWC, Some(2), 4);
    let run = |prefetch| {
        let c = LoaderConfig {
            prefetch,
            ..cfg(&f, 2, 1, 5, true)
        };
        let mut l = Loader::new(c, LoaderPosition::default()).unwrap();
        take(&mut l, 15)
    };
    let zero = run(0);
    assert_eq!(zero, run(1));
    assert_eq!(zero, run(16));
    // Dropping a loader whose thread is blocked on a full queue returns promptly.
    let l = Loader::new(
        LoaderConfig {
            prefetch: 2,
            ..cfg(&f, 1, 0, 4, false)
        },
        LoaderPosition::default(),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(l);
}
