//! The CIFAR-10, folder and generic IDX converters on small hand-made inputs with known content, and
//! `inspect` on a file with known statistics.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use ddpm_data::Hdf5Dataset;

fn ddpm_data(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm-data"))
        .args(args)
        .output()
        .expect("run ddpm-data")
}

/// `ddpm-data convert --from FROM SRC [EXTRA...] --out OUT`.
fn convert(from: &str, src: &Path, out: &Path, extra: &[&str]) -> Output {
    let (src, out) = (src.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["convert", "--from", from, src];
    args.extend_from_slice(extra);
    ddpm_data(&[&args[..], &["--out", out]].concat())
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "ddpm-data failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn images_of(path: &Path) -> (Vec<usize>, Vec<u8>) {
    let f = hdf5::File::open(path).unwrap();
    let d = f.dataset("images").unwrap();
    (d.shape(), d.read_raw().unwrap())
}

fn cifar_record(r: usize) -> Vec<u8> {
    let mut rec = vec![(r % 10) as u8];
    for ch in 0..3 {
        rec.extend((0..1024).map(|p| ((p * (ch + 1) + r) % 256) as u8));
    }
    rec
}

#[test]
fn cifar10_records_are_transposed_to_hwc() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&bin).unwrap();
    let mut r = 0;
    for name in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        let recs: Vec<u8> = (0..3)
            .flat_map(|_| {
                r += 1;
                cifar_record(r - 1)
            })
            .collect();
        std::fs::write(bin.join(name), recs).unwrap();
    }
    let out = dir.path().join("train.h5");
    ok(convert("cifar10", dir.path(), &out, &["--split", "train"]));
    let (shape, data) = images_of(&out);
    assert_eq!(shape, vec![15, 32, 32, 3]);
    for r in 0..15 {
        for p in 0..1024 {
            for ch in 0..3 {
                assert_eq!(
                    data[r * 3072 + p * 3 + ch],
                    ((p * (ch + 1) + r) % 256) as u8,
                    "record {r} pixel {p} ch {ch}"
                );
            }
        }
    }
    let ds = Hdf5Dataset::open(&out).unwrap();
    assert_eq!(
        ds.labels().unwrap(),
        (0..15).map(|r| (r % 10) as i64).collect::<Vec<_>>()
    );
    assert_eq!(ds.class_names()[0], "airplane");
    let test = dir.path().join("test.h5");
    ok(convert("cifar10", &bin, &test, &["--split", "test"]));
    let (shape, data) = images_of(&test);
    assert_eq!(shape, vec![3, 32, 32, 3]);
    assert_eq!(data[0], 15); // first test record is r = 15: pixel 0 red = (0 * 1 + 15) % 256

    // A batch file that is not a whole number of records is rejected by name.
    std::fs::write(bin.join("test_batch.bin"), vec![0u8; 3073 * 2 + 5]).unwrap();
    let bad = convert("cifar10", &bin, &test, &["--split", "test"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("test_batch.bin") && err.contains("3073"),
        "{err}"
    );
    // The earlier good output is untouched (atomic writes).
    assert_eq!(images_of(&test).0, vec![3, 32, 32, 3]);
}

#[test]
fn folder_images_are_resized_and_center_cropped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    for class in ["cat", "dog"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
    }
    // cat/a.png: exactly 8x8 -> stored unchanged.
    let a = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 7]));
    a.save(root.join("cat/a.png")).unwrap();
    // cat/b.png: 16 wide, 8 high -> shorter side already 8, center crop takes columns 4..12.
    let b = image::RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 15, y as u8, 99]));
    b.save(root.join("cat/b.png")).unwrap();
    // dog/c.jpg: 32x64 solid colour -> resized to 8x16 and cropped; stays (nearly) that colour.
    let c = image::RgbImage::from_pixel(32, 64, image::Rgb([200, 100, 50]));
    c.save(root.join("dog/c.jpg")).unwrap();
    std::fs::write(root.join("dog/readme.txt"), "not an image").unwrap();

    let out = dir.path().join("folder.h5");
    ok(convert("folder", &root, &out, &["--resolution", "8"]));
    let ds = Hdf5Dataset::open(&out).unwrap();
    assert_eq!(
        (ds.len(), ds.height(), ds.width(), ds.channels()),
        (3, 8, 8, 3)
    );
    assert_eq!(ds.class_names(), ["cat".to_string(), "dog".to_string()]);
    assert_eq!(ds.labels().unwrap(), vec![0, 0, 1]);
    let data = ds.read_images(0, 3).unwrap();
    assert_eq!(&data[..192], a.as_raw().as_slice());
    for y in 0..8 {
        for x in 0..8 {
            let got = &data[192 + (y * 8 + x) * 3..192 + (y * 8 + x) * 3 + 3];
            assert_eq!(got, &b.get_pixel(x as u32 + 4, y as u32).0, "b at {x},{y}");
        }
    }
    for px in data[384..].chunks(3) {
        for (g, e) in px.iter().zip([200u8, 100, 50]) {
            assert!(
                (*g as i32 - e as i32).abs() <= 3,
                "solid colour drifted: {px:?}"
            );
        }
    }

    // Grey output.
    let grey = dir.path().join("grey.h5");
    ok(convert(
        "folder",
        &root,
        &grey,
        &["--resolution", "4", "--grayscale"],
    ));
    let g = Hdf5Dataset::open(&grey).unwrap();
    assert_eq!((g.height(), g.channels()), (4, 1));

    // An undecodable image is reported by file name, and no output is left behind.
    std::fs::write(root.join("dog/broken.png"), b"\x89PNG but not really").unwrap();
    let bad_out = dir.path().join("bad.h5");
    let bad = convert("folder", &root, &bad_out, &["--resolution", "8"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("broken.png"), "{err}");
    assert!(!bad_out.exists());
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

fn write_idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut b = vec![0u8, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn generic_idx_pairs_plain_and_unlabelled() {
    let dir = tempfile::tempdir().unwrap();
    let imgs: Vec<u8> = (0..5 * 3 * 2).map(|i| (i * 9) as u8).collect();
    write_idx(&dir.path().join("img.idx"), &[5, 3, 2], &imgs);
    write_idx(&dir.path().join("lab.idx"), &[5], &[6, 0, 2, 2, 1]);
    let out = dir.path().join("idx.h5");
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    ok(ddpm_data(&[
        "convert",
        "--from",
        "mnist-idx",
        "--images",
        &p("img.idx"),
        "--labels",
        &p("lab.idx"),
        "--out",
        out.to_str().unwrap(),
    ]));
    let ds = Hdf5Dataset::open(&out).unwrap();
    assert_eq!(
        (ds.len(), ds.height(), ds.width(), ds.channels()),
        (5, 3, 2, 1)
    );
    assert_eq!(ds.num_classes(), Some(7));
    assert_eq!(ds.labels().unwrap(), vec![6, 0, 2, 2, 1]);
    assert_eq!(ds.read_images(0, 5).unwrap(), imgs);

    let named = dir.path().join("named.h5");
    let names = "a,b,c,d,e,f,g,h";
    ok(ddpm_data(&[
        "convert",
        "--from",
        "mnist-idx",
        "--images",
        &p("img.idx"),
        "--labels",
        &p("lab.idx"),
        "--class-names",
        names,
        "--out",
        named.to_str().unwrap(),
    ]));
    assert_eq!(
        Hdf5Dataset::open(&named).unwrap().class_names().join(","),
        names
    );

    let unl = dir.path().join("unlabelled.h5");
    ok(ddpm_data(&[
        "convert",
        "--from",
        "mnist-idx",
        "--images",
        &p("img.idx"),
        "--out",
        unl.to_str().unwrap(),
        "--deflate",
        "0",
    ]));
    let ds = Hdf5Dataset::open(&unl).unwrap();
    assert!(ds.labels().is_none() && ds.num_classes().is_none());
    assert!(ds.filters().is_empty());

    // Label count mismatch names the label file.
    write_idx(&dir.path().join("short.idx"), &[4], &[0, 1, 2, 3]);
    let bad = ddpm_data(&[
        "convert",
        "--from",
        "mnist-idx",
        "--images",
        &p("img.idx"),
        "--labels",
        &p("short.idx"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("short.idx") && err.contains("[5]"), "{err}");
}

#[test]
fn inspect_prints_counts_and_exact_statistics_and_writes_a_grid() {
    let dir = tempfile::tempdir().unwrap();
    let (n, h, w, c) = (37, 6, 5, 3);
    let f = common::write_synthetic(&dir.path().join("s.h5"), n, [h, w, c], Some(4), 5);
    let grid = dir.path().join("grid.png");
    let text = ok(ddpm_data(&[
        "inspect",
        f.to_str().unwrap(),
        "--grid",
        grid.to_str().unwrap(),
        "--grid-cols",
        "6",
    ]));
    assert!(text.contains("N:         37"), "{text}");
    assert!(text.contains("[37, 6, 5, 3]"), "{text}");
    for k in 0..4 {
        let count = (0..n)
            .filter(|&i| common::synthetic_label(i, 4) == k as i64)
            .count();
        assert!(
            text.contains(&format!("class{k}"))
                && text.lines().any(|l| l.contains(&format!("class{k}"))
                    && l.trim_end().ends_with(&count.to_string())),
            "{text}"
        );
    }
    let all: Vec<f64> = (0..n)
        .flat_map(|i| common::synthetic_image(i, h, w, c))
        .map(|b| b as f64)
        .collect();
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let std = (all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / all.len() as f64).sqrt();
    assert!(
        text.contains(&format!("mean {mean:.4}  std {std:.4}")),
        "expected mean {mean:.4} std {std:.4} in\n{text}"
    );
    let png = image::open(&grid).unwrap();
    // 4 class rows of 6 columns, images upscaled 10x (64 / 6), 2-pixel gutters.
    assert_eq!(
        (png.width(), png.height()),
        (6 * (5 * 10 + 2) + 2, 4 * (6 * 10 + 2) + 2)
    );
}
