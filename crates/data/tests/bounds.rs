//! Sizes declared by a dataset file are bounded before anything is allocated from them: a tiny file
//! that claims a huge shape is rejected with an error naming the file and the field, by the library
//! and by every `ddpm-data` command, never by an aborted allocation.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{add_valid_attrs, write_synthetic};
use ddpm_data::{Hdf5Dataset, Loader, LoaderConfig, LoaderPosition};

fn assert_names(msg: &str, path: &Path, parts: &[&str]) {
    let file = path.file_name().unwrap().to_str().unwrap();
    assert!(msg.contains(file), "error does not name {file}: {msg}");
    for p in parts {
        assert!(msg.contains(p), "error does not mention {p:?}: {msg}");
    }
}

/// An HDF5 file whose `images` has `shape` and `chunk` but where only the images `0..written` were
/// written: every other chunk is unallocated, so the file stays a few KB whatever `shape` says.
fn sparse_file(
    dir: &Path,
    name: &str,
    shape: [usize; 4],
    chunk: [usize; 4],
    written: usize,
    labels: bool,
) -> PathBuf {
    let path = dir.join(name);
    let f = hdf5::FileBuilder::new()
        .with_fapl(|p| p.fclose_degree(hdf5::file::FileCloseDegree::Strong))
        .create(&path)
        .unwrap();
    let ds = f
        .new_dataset::<u8>()
        .shape(shape)
        .chunk(chunk)
        .create("images")
        .unwrap();
    if written > 0 {
        let data = vec![9u8; written * shape[1] * shape[2] * shape[3]];
        let arr =
            ndarray::Array4::from_shape_vec((written, shape[1], shape[2], shape[3]), data).unwrap();
        ds.write_slice(&arr, (0..written, .., .., ..)).unwrap();
    }
    if labels {
        // Labels declared with the same N, also never written (chunked, so nothing is allocated).
        f.new_dataset::<i64>()
            .shape(shape[0])
            .chunk(1024)
            .create("labels")
            .unwrap();
    }
    add_valid_attrs(&f, labels.then_some(2));
    f.close().unwrap();
    path
}

fn run_cli(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ddpm-data"))
        .args(args)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn shard_plan_args(p: &Path) -> Vec<&str> {
    vec![
        "shard-plan",
        p.to_str().unwrap(),
        "--world",
        "1",
        "--rank",
        "0",
        "--batch",
        "1",
        "--epoch",
        "0",
        "--seed",
        "0",
    ]
}

/// The reproduction: ~8 KB on disk, `images` declares N = 2^40. Before the bound,
/// `shard-plan` aborted with "memory allocation of 8796093022208 bytes failed".
#[test]
fn a_tiny_file_declaring_2_pow_40_images_is_rejected_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let n = 1usize << 40;
    for labels in [false, true] {
        let p = sparse_file(
            dir.path(),
            &format!("huge-n-{labels}.h5"),
            [n, 1, 1, 1],
            [1024, 1, 1, 1],
            0,
            labels,
        );
        assert!(std::fs::metadata(&p).unwrap().len() < 64 * 1024);
        let err = Hdf5Dataset::open(&p)
            .err()
            .expect("must be rejected")
            .to_string();
        assert_names(&err, &p, &["dataset `images`", "1099511627776"]);

        let cfg = LoaderConfig {
            path: p.clone(),
            world: 1,
            rank: 0,
            batch: 1,
            seed: 0,
            flip: false,
            prefetch: 1,
        };
        let err = Loader::new(cfg, LoaderPosition::default())
            .err()
            .unwrap()
            .to_string();
        assert_names(&err, &p, &["dataset `images`"]);

        for args in [shard_plan_args(&p), vec!["inspect", p.to_str().unwrap()]] {
            let (code, stderr) = run_cli(&args);
            assert_eq!(code, Some(1), "{args:?} must exit 1 (not abort): {stderr}");
            assert_names(&stderr, &p, &["dataset `images`"]);
            assert!(!stderr.contains("memory allocation"), "{stderr}");
        }
    }
}

/// Within the N bound but mostly unwritten: the chunks the shape promises are not in the file.
#[test]
fn images_whose_chunks_are_not_stored_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse_file(
        dir.path(),
        "sparse.h5",
        [1000, 2, 2, 1],
        [10, 2, 2, 1],
        10,
        false,
    );
    let err = Hdf5Dataset::open(&p)
        .err()
        .expect("must be rejected")
        .to_string();
    assert_names(&err, &p, &["dataset `images`", "1 of 100 chunks"]);
    // The same shape fully written opens.
    let ok = sparse_file(
        dir.path(),
        "full.h5",
        [1000, 2, 2, 1],
        [10, 2, 2, 1],
        1000,
        false,
    );
    Hdf5Dataset::open(&ok).unwrap();
}

#[test]
fn image_sides_and_chunk_bytes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let tall = sparse_file(
        dir.path(),
        "tall.h5",
        [1, 5000, 1, 1],
        [1, 5000, 1, 1],
        0,
        false,
    );
    let err = Hdf5Dataset::open(&tall).err().unwrap().to_string();
    assert_names(&err, &tall, &["dataset `images`", "H = 5000", "4096"]);
    let wide = sparse_file(
        dir.path(),
        "wide.h5",
        [1, 1, 70000, 3],
        [1, 1, 70000, 3],
        0,
        false,
    );
    let err = Hdf5Dataset::open(&wide).err().unwrap().to_string();
    assert_names(&err, &wide, &["dataset `images`", "W = 70000"]);
    // 4 images of 4096 x 4096 x 3 per chunk = 192 MiB, above the 64 MiB chunk bound.
    let big = sparse_file(
        dir.path(),
        "bigchunk.h5",
        [8, 4096, 4096, 3],
        [4, 4096, 4096, 3],
        0,
        false,
    );
    let err = Hdf5Dataset::open(&big).err().unwrap().to_string();
    assert_names(
        &err,
        &big,
        &["dataset `images`", "chunk", "201326592 bytes"],
    );
}

#[test]
fn class_counts_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_synthetic(&dir.path().join("ok.h5"), 4, [2, 2, 1], Some(2), 2);
    {
        let f = hdf5::File::open_rw(&p).unwrap();
        f.attr("num_classes")
            .unwrap()
            .write_scalar(&(1i64 << 40))
            .unwrap();
    }
    let err = Hdf5Dataset::open(&p).err().unwrap().to_string();
    assert_names(&err, &p, &["attribute `num_classes`", "1099511627776"]);
}

#[test]
fn shard_plan_arguments_cannot_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_synthetic(&dir.path().join("small.h5"), 4, [2, 2, 1], None, 2);
    let big = (u64::MAX / 2).to_string();
    let mut args = shard_plan_args(&p);
    args[3] = &big; // --world
    args[7] = &big; // --batch
    let (code, stderr) = run_cli(&args);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
