//! Helpers shared by the integration tests: synthetic dataset files whose every image is distinct and
//! recomputable from its index, and raw HDF5 writers for deliberately broken files.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ddpm_data::{DatasetMeta, DatasetWriter, WriteOptions};
use hdf5::types::VarLenUnicode;

/// Pixel bytes of synthetic image `i`: the first three bytes spell `i` (so every image differs), the
/// rest is a pattern that varies along x (so flips are visible).
pub fn synthetic_image(i: usize, h: usize, w: usize, c: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..h * w * c)
        .map(|p| ((i * 31 + p * 7 + (p % (w * c)) * 13) % 251) as u8)
        .collect();
    v[0] = (i & 0xff) as u8;
    v[1] = ((i >> 8) & 0xff) as u8;
    v[2] = ((i >> 16) & 0xff) as u8;
    v
}

pub fn synthetic_label(i: usize, classes: usize) -> i64 {
    ((i * 7 + 3) % classes) as i64
}

/// Writes an `n`-image synthetic dataset through the library writer.
pub fn write_synthetic(
    path: &Path,
    n: usize,
    hwc: [usize; 3],
    classes: Option<usize>,
    chunk: usize,
) -> PathBuf {
    let [h, w, c] = hwc;
    let opts = WriteOptions {
        chunk_images: Some(chunk),
        deflate: Some(1),
    };
    let mut wr = DatasetWriter::create(path, n, hwc, &opts).expect("create synthetic");
    for i in 0..n {
        wr.push_images(&synthetic_image(i, h, w, c)).unwrap();
    }
    let class_names = classes.map(|k| {
        wr.push_labels(&(0..n).map(|i| synthetic_label(i, k)).collect::<Vec<_>>());
        (0..k).map(|j| format!("class{j}")).collect()
    });
    wr.finish(&DatasetMeta {
        source: "synthetic test data".into(),
        class_names,
    })
    .expect("finish synthetic");
    path.to_path_buf()
}

/// Adds the root attributes a valid labelled file has (`num_classes` classes).
pub fn add_valid_attrs(f: &hdf5::File, num_classes: Option<usize>) {
    f.new_attr::<i64>()
        .create("format_version")
        .unwrap()
        .write_scalar(&1i64)
        .unwrap();
    let s: VarLenUnicode = "hand-made".parse().unwrap();
    f.new_attr::<VarLenUnicode>()
        .create("source")
        .unwrap()
        .write_scalar(&s)
        .unwrap();
    if let Some(k) = num_classes {
        f.new_attr::<i64>()
            .create("num_classes")
            .unwrap()
            .write_scalar(&(k as i64))
            .unwrap();
        let names: Vec<VarLenUnicode> = (0..k).map(|j| format!("c{j}").parse().unwrap()).collect();
        f.new_attr::<VarLenUnicode>()
            .shape(k)
            .create("class_names")
            .unwrap()
            .write_raw(&names)
            .unwrap();
    }
}

/// FNV-1a over the bits of a decoded image: a content fingerprint.
pub fn fingerprint(x: &[f32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in x {
        for b in v.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The expected decoded (f32 CHW, [-1, 1]) synthetic image `i`, flipped or not.
pub fn expected_decoded(i: usize, h: usize, w: usize, c: usize, flip: bool) -> Vec<f32> {
    let img = synthetic_image(i, h, w, c);
    let mut out = vec![0f32; h * w * c];
    for y in 0..h {
        for x in 0..w {
            let sx = if flip { w - 1 - x } else { x };
            for ch in 0..c {
                out[ch * h * w + y * w + x] = img[(y * w + sx) * c + ch] as f32 / 127.5 - 1.0;
            }
        }
    }
    out
}

/// `ddpm-data shard-plan` arguments for `file` (rank 0, epoch 0, seed 0); `world` and `batch` are
/// strings so tests can pass values no `usize` holds.
pub fn shard_plan_args<'a>(file: &'a Path, world: &'a str, batch: &'a str) -> Vec<&'a str> {
    vec![
        "shard-plan",
        file.to_str().unwrap(),
        "--world",
        world,
        "--rank",
        "0",
        "--batch",
        batch,
        "--epoch",
        "0",
        "--seed",
        "0",
    ]
}

/// Creates an HDF5 file with the strong close degree: `close()` closes every object of the file at
/// once, so its write lock is gone before a reader opens it (with the default weak degree a
/// still-referenced object kept the file open and the reader's lock failed with EAGAIN).
pub fn create_strong(path: &Path) -> hdf5::File {
    hdf5::FileBuilder::new()
        .with_fapl(|p| p.fclose_degree(hdf5::file::FileCloseDegree::Strong))
        .create(path)
        .unwrap()
}

/// Runs the `ddpm-data` binary (through `sh`, so `prefix` can be e.g. `ulimit -v N &&`); returns its
/// exit code (`None` when killed by a signal, e.g. an aborted allocation) and stderr.
pub fn run_ddpm_data(bin: &str, prefix: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{prefix} exec \"$0\" \"$@\""))
        .arg(bin)
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
