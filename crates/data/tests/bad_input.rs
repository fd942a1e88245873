//! Every kind of bad input is rejected with an error naming the file and the dataset or attribute.

mod common;

use std::path::{Path, PathBuf};

use common::{add_valid_attrs, write_synthetic};
use ddpm_data::{Hdf5Dataset, Loader, LoaderConfig, LoaderPosition};

fn open_err(path: &Path) -> String {
    Hdf5Dataset::open(path)
        .err()
        .unwrap_or_else(|| panic!("{} opened but should not", path.display()))
        .to_string()
}

fn assert_names(msg: &str, path: &Path, parts: &[&str]) {
    let file = path.file_name().unwrap().to_str().unwrap();
    assert!(
        msg.contains(file),
        "error does not name the file {file}: {msg}"
    );
    for p in parts {
        assert!(msg.contains(p), "error does not mention {p:?}: {msg}");
    }
}

/// A raw HDF5 file with `images` built by `make`, plus valid attributes.
fn raw_file(
    dir: &Path,
    name: &str,
    make: impl FnOnce(&hdf5::File),
    classes: Option<usize>,
) -> PathBuf {
    let path = dir.join(name);
    let f = common::create_strong(&path);
    make(&f);
    add_valid_attrs(&f, classes);
    f.close().unwrap();
    path
}

fn good_images(f: &hdf5::File, n: usize) {
    images(f, &[n, 4, 4, 3], Some(&[2, 4, 4, 3]));
    let ds = f.dataset("images").unwrap();
    ds.write_raw(&vec![7u8; n * 4 * 4 * 3]).unwrap();
}

/// An unwritten `images` dataset of `T` with `shape`, chunked by `chunk` (contiguous when `None`).
fn images_of<T: hdf5::H5Type>(f: &hdf5::File, shape: &[usize], chunk: Option<&[usize]>) {
    let b = f.new_dataset::<T>().shape(shape);
    match chunk {
        Some(c) => b.chunk(c).create("images"),
        None => b.create("images"),
    }
    .unwrap();
}

fn images(f: &hdf5::File, shape: &[usize], chunk: Option<&[usize]>) {
    images_of::<u8>(f, shape, chunk)
}

/// A 1-D `labels` dataset holding `values`.
fn labels<T: hdf5::H5Type>(f: &hdf5::File, values: &[T]) {
    let ds = f.new_dataset::<T>().shape(values.len()).create("labels");
    ds.unwrap().write_raw(values).unwrap();
}

/// `format_version` written as the scalar `v` of its own type, onto a file with only images.
fn file_with_version<T: hdf5::H5Type>(path: &Path, v: T) {
    let f = hdf5::File::create(path).unwrap();
    good_images(&f, 2);
    let a = f.new_attr::<T>().create("format_version").unwrap();
    a.write_scalar(&v).unwrap();
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.h5");
    assert_names(&open_err(&p), &p, &["no such file"]);
}

#[test]
fn not_hdf5() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("text.h5");
    std::fs::write(&p, "this is a text file, not HDF5\n".repeat(100)).unwrap();
    assert_names(&open_err(&p), &p, &["not an HDF5 file"]);
    let empty = dir.path().join("empty.h5");
    std::fs::write(&empty, b"").unwrap();
    assert_names(&open_err(&empty), &empty, &["empty"]);
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_synthetic(&dir.path().join("good.h5"), 300, [8, 8, 3], Some(2), 10);
    let bytes = std::fs::read(&good).unwrap();
    for (name, keep) in [
        ("half.h5", bytes.len() / 2),
        ("almost.h5", bytes.len() - 1),
        ("head.h5", 40),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes[..keep]).unwrap();
        assert_names(&open_err(&p), &p, &["truncated"]);
    }
}

#[test]
fn missing_images() {
    let dir = tempfile::tempdir().unwrap();
    let p = raw_file(
        dir.path(),
        "noimages.h5",
        |f| labels(f, &[0i64, 1, 0]),
        Some(2),
    );
    assert_names(&open_err(&p), &p, &["dataset `images`", "missing"]);
}

#[test]
fn wrong_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let float = |f: &hdf5::File| images_of::<f32>(f, &[4, 4, 4, 3], Some(&[1, 4, 4, 3]));
    let p = raw_file(dir.path(), "float.h5", float, None);
    assert_names(&open_err(&p), &p, &["dataset `images`", "float32", "uint8"]);
    let float_labels = |f: &hdf5::File| {
        good_images(f, 4);
        f.new_dataset::<f64>().shape(4).create("labels").unwrap();
    };
    let p = raw_file(dir.path(), "floatlabels.h5", float_labels, Some(2));
    assert_names(&open_err(&p), &p, &["dataset `labels`", "float64"]);
}

#[test]
fn wrong_rank_and_shape() {
    let dir = tempfile::tempdir().unwrap();
    type Case<'a> = (&'a str, &'a [usize], Option<&'a [usize]>, &'a str);
    let cases: [Case; 4] = [
        ("rank3.h5", &[4, 28, 28], Some(&[1, 28, 28]), "rank 3"),
        (
            "channels.h5",
            &[4, 4, 4, 2],
            Some(&[1, 4, 4, 2]),
            "2 channels",
        ),
        ("contiguous.h5", &[4, 4, 4, 3], None, "not chunked"),
        (
            "halfchunk.h5",
            &[4, 4, 4, 3],
            Some(&[2, 2, 4, 3]),
            "whole images",
        ),
    ];
    for (name, shape, chunk, why) in cases {
        let p = raw_file(dir.path(), name, |f| images(f, shape, chunk), None);
        assert_names(&open_err(&p), &p, &["dataset `images`", why]);
    }
}

#[test]
fn labels_of_the_wrong_length_or_range() {
    let dir = tempfile::tempdir().unwrap();
    let short = |f: &hdf5::File| {
        good_images(f, 6);
        labels(f, &[0u8, 1, 0, 1, 0]);
    };
    let p = raw_file(dir.path(), "shortlabels.h5", short, Some(2));
    let why = ["dataset `labels`", "5 entries", "N = 6"];
    assert_names(&open_err(&p), &p, &why);
    let bad = |f: &hdf5::File| {
        good_images(f, 3);
        labels(f, &[0i32, 5, 1]);
    };
    let p = raw_file(dir.path(), "badlabel.h5", bad, Some(2));
    let why = ["dataset `labels`", "label 5 of example 1"];
    assert_names(&open_err(&p), &p, &why);
    let two_d = |f: &hdf5::File| {
        good_images(f, 4);
        f.new_dataset::<u8>()
            .shape((4, 1))
            .create("labels")
            .unwrap();
    };
    let p = raw_file(dir.path(), "label2d.h5", two_d, Some(2));
    assert_names(&open_err(&p), &p, &["dataset `labels`", "rank 1"]);
}

#[test]
fn attributes() {
    let dir = tempfile::tempdir().unwrap();
    // No attributes at all.
    let p = dir.path().join("noattrs.h5");
    good_images(&hdf5::File::create(&p).unwrap(), 2);
    let why = ["attribute `format_version`", "missing"];
    assert_names(&open_err(&p), &p, &why);
    // Labels without num_classes.
    let two_labels = |f: &hdf5::File| {
        good_images(f, 2);
        labels(f, &[0u8, 1]);
    };
    let p = raw_file(dir.path(), "nonumclasses.h5", two_labels, None);
    assert_names(&open_err(&p), &p, &["attribute `num_classes`", "missing"]);
    // Wrong version, wrong type, no source, class_names of the wrong length.
    let p = dir.path().join("v2.h5");
    file_with_version(&p, 2i64);
    assert_names(&open_err(&p), &p, &["attribute `format_version`", "is 2"]);
    let p = dir.path().join("fversion.h5");
    file_with_version(&p, 1.0f64);
    let why = ["attribute `format_version`", "float64"];
    assert_names(&open_err(&p), &p, &why);
    let p = raw_file(dir.path(), "nosource.h5", |f| good_images(f, 2), None);
    hdf5::File::open_rw(&p)
        .unwrap()
        .delete_attr("source")
        .unwrap();
    assert_names(&open_err(&p), &p, &["attribute `source`", "missing"]);
    let p = raw_file(dir.path(), "names.h5", two_labels, Some(3));
    {
        let f = hdf5::File::open_rw(&p).unwrap();
        f.delete_attr("class_names").unwrap();
        let names: Vec<hdf5::types::VarLenUnicode> = vec!["a".parse().unwrap()];
        let a = f.new_attr::<hdf5::types::VarLenUnicode>().shape(1);
        a.create("class_names").unwrap().write_raw(&names).unwrap();
    }
    let why = ["attribute `class_names`", "1 names", "num_classes is 3"];
    assert_names(&open_err(&p), &p, &why);
}

#[test]
fn fewer_examples_than_the_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_synthetic(&dir.path().join("five.h5"), 5, [3, 3, 1], None, 2);
    let cfg = |world, batch| LoaderConfig {
        path: p.clone(),
        world,
        rank: 0,
        batch,
        seed: 0,
        flip: false,
        prefetch: 1,
    };
    let err = Loader::new(cfg(8, 1), LoaderPosition::default())
        .err()
        .expect("N < world must fail")
        .to_string();
    assert_names(&err, &p, &["dataset `images`", "N = 5", "world size 8"]);
    // A batch that makes the global batch larger than N fails the same way; one that fits works.
    assert!(Loader::new(cfg(2, 3), LoaderPosition::default()).is_err());
    assert!(Loader::new(cfg(5, 1), LoaderPosition::default()).is_ok());
    // Nonsense arguments are configuration errors, not panics.
    let bad_rank = LoaderConfig {
        rank: 3,
        ..cfg(2, 1)
    };
    assert!(Loader::new(bad_rank, LoaderPosition::default())
        .err()
        .unwrap()
        .to_string()
        .contains("rank 3"));
    assert!(Loader::new(cfg(0, 1), LoaderPosition::default()).is_err());
    assert!(Loader::new(cfg(1, 0), LoaderPosition::default()).is_err());
}

#[test]
fn the_cli_reports_bad_files_and_exits_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("garbage.h5");
    std::fs::write(&p, [1u8; 4096]).unwrap();
    for args in [
        vec!["inspect", p.to_str().unwrap()],
        common::shard_plan_args(&p, "1", "1"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpm-data"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_names(&err, &p, &["not an HDF5 file"]);
        assert!(!err.contains("panicked"), "{err}");
    }
}
