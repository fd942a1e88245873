//! Converter inputs are bounded before allocation: a gzip bomb behind an IDX header, IDX dimensions
//! beyond the format, a large CIFAR-10 batch file, an extreme-aspect PNG, a preview grid too large.
//! Each test here failed (or aborted the test process) before its fix.

#[path = "common/alloc_cap.rs"]
mod alloc_cap;
mod common;

#[global_allocator]
static ALLOC: alloc_cap::CapAlloc = alloc_cap::CapAlloc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use ddpm_data::convert::{convert_cifar10, convert_idx, IdxInput, Split};
use ddpm_data::idx::read_idx;
use ddpm_data::WriteOptions;
use flate2::{write::GzEncoder, Compression};

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A multi-member gzip: `head` then `mib` MiB of zeros, built from one compressed 1 MiB member
/// repeated (about 1 KB each), so the file is small and cheap to make while inflating past 1 GiB.
fn gzip_bomb(path: &Path, head: &[u8], mib: usize) -> PathBuf {
    let zeros = gz(&vec![0u8; 1 << 20]);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&gz(head)).unwrap();
    for _ in 0..mib {
        f.write_all(&zeros).unwrap();
    }
    f.flush().unwrap();
    path.to_path_buf()
}

fn err_text<T>(r: ddpm_data::Result<T>) -> String {
    match r {
        Ok(_) => panic!("must be rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn idx_gzip_is_inflated_only_up_to_the_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    // A valid header declaring 1 x 2 x 2 = 4 bytes, then 4 bytes, then 1.1 GiB of zeros.
    let p = gzip_bomb(
        &dir.path().join("bomb-idx3-ubyte.gz"),
        &[0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4],
        1100,
    );
    assert!(std::fs::metadata(&p).unwrap().len() < 4 << 20);
    alloc_cap::reset_peak();
    let err = err_text(read_idx(&p));
    assert!(
        err.contains("bomb-idx3-ubyte.gz") && err.contains("trailing bytes"),
        "{err}"
    );
    assert!(
        alloc_cap::peak() < 1 << 20,
        "peak allocation {}",
        alloc_cap::peak()
    );

    // The case: a gzip of nothing but zeros. Rejected at the header, after 4 bytes.
    let zeros = gzip_bomb(&dir.path().join("zeros.gz"), &[0u8; 16], 1100);
    alloc_cap::reset_peak();
    let err = err_text(read_idx(&zeros));
    assert!(
        err.contains("zeros.gz") && err.contains("element type"),
        "{err}"
    );
    assert!(
        alloc_cap::peak() < 1 << 20,
        "peak allocation {}",
        alloc_cap::peak()
    );
}

#[test]
fn idx_dimensions_are_bounded_like_the_format() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tall-idx3-ubyte");
    let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0x13, 0x88, 0, 0, 0, 1]; // [1, 5000, 1]
    bytes.extend(vec![7u8; 5000]);
    std::fs::write(&p, &bytes).unwrap();
    let input = IdxInput {
        images: p.clone(),
        labels: None,
        class_names: None,
        num_classes: None,
        source: "test".into(),
    };
    let pb = indicatif::ProgressBar::hidden();
    let out = dir.path().join("out.h5");
    let err = err_text(convert_idx(&input, &out, &WriteOptions::default(), &pb));
    assert!(
        err.contains("tall-idx3-ubyte") && err.contains("H = 5000"),
        "{err}"
    );
    // A header whose dimensions multiply past the data bound is rejected before reading the data.
    std::fs::write(
        &p,
        [
            0, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0xff, 0, 0, 0, 1,
        ],
    )
    .unwrap();
    let err = err_text(read_idx(&p));
    assert!(
        err.contains("tall-idx3-ubyte") && err.contains("limit"),
        "{err}"
    );
}

#[test]
fn cifar10_batches_are_streamed_not_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let records = 8000; // 24.6 MB
    let mut bytes = Vec::with_capacity(records * 3073);
    for i in 0..records {
        bytes.push((i % 10) as u8);
        bytes.extend((0..3072).map(|j| ((i + j) % 251) as u8));
    }
    std::fs::write(dir.path().join("test_batch.bin"), &bytes).unwrap();
    drop(bytes);
    let out = dir.path().join("c.h5");
    let pb = indicatif::ProgressBar::hidden();
    alloc_cap::reset_peak();
    convert_cifar10(dir.path(), Split::Test, &out, &WriteOptions::default(), &pb).unwrap();
    let peak = alloc_cap::peak();
    assert!(
        peak < 16 << 20,
        "a 24.6 MB batch file made a {peak}-byte allocation"
    );
    let ds = ddpm_data::Hdf5Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), records);
    assert_eq!(ds.labels_slice().unwrap()[7999], 9);
}

/// Runs the CLI with its address space limited to 4 GiB, so an unbounded allocation fails fast
/// (abort) instead of exhausting the machine.
fn run_limited(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4194304 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_ddpm-data"))
        .args(args)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_1x65535_png_at_resolution_256_is_rejected_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("imgs").join("a");
    std::fs::create_dir_all(&class).unwrap();
    let png = class.join("tall.png");
    image::GrayImage::from_pixel(1, 65535, image::Luma([200u8]))
        .save(&png)
        .unwrap();
    let out = dir.path().join("out.h5");
    let (code, stderr) = run_limited(&[
        "convert",
        "--from",
        "folder",
        dir.path().join("imgs").to_str().unwrap(),
        "--resolution",
        "256",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "must exit 1, not abort: {stderr}");
    assert!(
        stderr.contains("tall.png") && stderr.contains("aspect ratio"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn the_preview_grid_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write_synthetic(&dir.path().join("s.h5"), 6, [4, 4, 1], None, 2);
    let grid = dir.path().join("grid.png");
    let (code, stderr) = run_limited(&[
        "inspect",
        p.to_str().unwrap(),
        "--grid",
        grid.to_str().unwrap(),
        "--grid-cols",
        "100000",
    ]);
    assert_eq!(code, Some(1), "must exit 1, not abort: {stderr}");
    assert!(
        stderr.contains("grid.png") && stderr.contains("--grid-cols"),
        "{stderr}"
    );
    // A sensible grid still works.
    let (code, stderr) = run_limited(&[
        "inspect",
        p.to_str().unwrap(),
        "--grid",
        grid.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
}
