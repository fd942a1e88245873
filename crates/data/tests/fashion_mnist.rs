//! The converted Debian Fashion-MNIST package matches its IDX bytes exactly (all 60000 training and
//! 10000 test images and labels). The IDX files are parsed here independently of the library's reader.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

const FM_DIR: &str = "/usr/share/datasets/fashion-mnist";

fn fm_dir() -> PathBuf {
    let dir = std::env::var("FASHION_MNIST_DIR").unwrap_or_else(|_| FM_DIR.to_string());
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("train-images-idx3-ubyte.gz").is_file() || dir.join("train-images-idx3-ubyte").is_file(),
        "Fashion-MNIST IDX files not found in {}: install the Debian package `dataset-fashion-mnist` \
         (scripts/setup.sh does) or set FASHION_MNIST_DIR",
        dir.display()
    );
    dir
}

/// Gunzips (if needed) and splits an IDX file into (dims, data) without using ddpm-data.
fn raw_idx(dir: &Path, stem: &str) -> (Vec<usize>, Vec<u8>) {
    let plain = dir.join(stem);
    let bytes = if plain.is_file() {
        std::fs::read(plain).unwrap()
    } else {
        let gz = std::fs::read(dir.join(format!("{stem}.gz"))).unwrap();
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    let ndim = bytes[3] as usize;
    let dims = (0..ndim)
        .map(|d| u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().unwrap()) as usize)
        .collect();
    (dims, bytes[4 + 4 * ndim..].to_vec())
}

fn check_split(split: &str, prefix: &str, n: usize) {
    let dir = fm_dir();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join(format!("fashion-{split}.h5"));
    let res = Command::new(env!("CARGO_BIN_EXE_ddpm-data"))
        .args([
            "convert",
            "--from",
            "fashion-mnist",
            dir.to_str().unwrap(),
            "--split",
            split,
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "convert failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "temp file left behind: {left:?}");

    let (idims, ibytes) = raw_idx(&dir, &format!("{prefix}-images-idx3-ubyte"));
    let (ldims, lbytes) = raw_idx(&dir, &format!("{prefix}-labels-idx1-ubyte"));
    assert_eq!(idims, vec![n, 28, 28]);
    assert_eq!(ldims, vec![n]);

    // Read back with the raw hdf5 crate, not the library reader.
    let f = hdf5::File::open(&out).unwrap();
    let images = f.dataset("images").unwrap();
    assert_eq!(images.shape(), vec![n, 28, 28, 1]);
    let stored: Vec<u8> = images.read_raw().unwrap();
    assert_eq!(stored.len(), ibytes.len());
    if let Some(i) =
        (0..n).find(|&i| stored[i * 784..(i + 1) * 784] != ibytes[i * 784..(i + 1) * 784])
    {
        panic!("image {i} differs from the IDX bytes");
    }
    let labels: Vec<i64> = f.dataset("labels").unwrap().read_raw().unwrap();
    assert_eq!(labels.len(), n);
    assert!(
        labels.iter().zip(&lbytes).all(|(&a, &b)| a == b as i64),
        "labels differ"
    );
    assert_eq!(
        f.attr("num_classes").unwrap().read_scalar::<i64>().unwrap(),
        10
    );
    assert_eq!(
        f.attr("format_version")
            .unwrap()
            .read_scalar::<i64>()
            .unwrap(),
        1
    );
    let names: Vec<hdf5::types::VarLenUnicode> = f.attr("class_names").unwrap().read_raw().unwrap();
    assert_eq!(names[0].as_str(), "T-shirt/top");
    assert_eq!(names[9].as_str(), "Ankle boot");

    // And the library's validating reader accepts it.
    let ds = ddpm_data::Hdf5Dataset::open(&out).unwrap();
    assert_eq!(
        (ds.len(), ds.height(), ds.width(), ds.channels()),
        (n, 28, 28, 1)
    );
    assert_eq!(
        ds.labels().unwrap().iter().filter(|&&y| y == 3).count(),
        n / 10,
        "classes are balanced"
    );
}

#[test]
fn converted_train_split_matches_the_idx_bytes() {
    check_split("train", "train", 60000);
}

#[test]
fn converted_test_split_matches_the_idx_bytes() {
    check_split("test", "t10k", 10000);
}
