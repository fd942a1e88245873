//! The dataset fingerprint identifies content: the same data stored differently agrees, one changed
//! pixel, label or class name does not, and `ddpm-data inspect` prints the same value as the API.

mod common;

use std::path::Path;

use common::{synthetic_image, synthetic_label};
use ddpm_data::{DatasetFingerprint, DatasetMeta, DatasetWriter, Hdf5Dataset, WriteOptions};

/// A 9-image 3x4x3 labelled dataset; `edit` may change pixels / labels / names before writing.
fn write(
    path: &Path,
    chunk: usize,
    deflate: Option<u8>,
    edit: impl FnOnce(&mut Vec<u8>, &mut Vec<i64>, &mut Vec<String>),
) -> DatasetFingerprint {
    let (n, h, w, c) = (9, 3, 4, 3);
    let mut px: Vec<u8> = (0..n).flat_map(|i| synthetic_image(i, h, w, c)).collect();
    let mut labels: Vec<i64> = (0..n).map(|i| synthetic_label(i, 4)).collect();
    let mut names: Vec<String> = (0..4).map(|k| format!("class{k}")).collect();
    edit(&mut px, &mut labels, &mut names);
    let opts = WriteOptions {
        chunk_images: Some(chunk),
        deflate,
    };
    let mut wr = DatasetWriter::create(path, n, [h, w, c], &opts).unwrap();
    wr.push_images(&px).unwrap();
    wr.push_labels(&labels);
    wr.finish(&DatasetMeta {
        source: format!("written with chunk {chunk}"),
        class_names: Some(names),
    })
    .unwrap();
    Hdf5Dataset::open(path).unwrap().fingerprint().unwrap()
}

#[test]
fn same_content_same_fingerprint_whatever_the_storage() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(&dir.path().join("a.h5"), 2, Some(4), |_, _, _| {});
    let b = write(&dir.path().join("b.h5"), 9, None, |_, _, _| {});
    assert_eq!(a, b, "chunking, compression and `source` must not matter");
    assert_eq!(
        (a.n, a.height, a.width, a.channels, a.num_classes),
        (9, 3, 4, 3, Some(4))
    );
    assert_eq!(a.sha256.len(), 64);
    // Deterministic: recomputing gives the same value.
    let again = Hdf5Dataset::open(dir.path().join("a.h5"))
        .unwrap()
        .fingerprint()
        .unwrap();
    assert_eq!(a, again);
    // serde round trip and Display.
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(
        serde_json::from_str::<DatasetFingerprint>(&json).unwrap(),
        a
    );
    let shown = a.to_string();
    assert!(
        shown.starts_with("N=9 shape=3x4x3 classes=4 sha256="),
        "{shown}"
    );
    assert!(shown.contains(&a.sha256));
}

#[test]
fn one_changed_pixel_label_or_name_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = write(&dir.path().join("base.h5"), 2, Some(1), |_, _, _| {});
    let pixel = write(&dir.path().join("px.h5"), 2, Some(1), |px, _, _| {
        px[200] ^= 1
    });
    let label = write(&dir.path().join("lab.h5"), 2, Some(1), |_, l, _| {
        l[8] = (l[8] + 1) % 4
    });
    let name = write(&dir.path().join("name.h5"), 2, Some(1), |_, _, n| {
        n[3] = "other".into()
    });
    for (what, fp) in [("pixel", &pixel), ("label", &label), ("class name", &name)] {
        assert_ne!(
            base.sha256, fp.sha256,
            "a changed {what} must change the digest"
        );
    }
}

#[test]
fn inspect_prints_the_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("i.h5");
    let fp = write(&p, 2, Some(1), |_, _, _| {});
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpm-data"))
        .args(["inspect", p.to_str().unwrap()])
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("fingerprint: {fp}")), "{text}");
}

/// The fingerprint is computed once per file version, by the child that checks the file before it
/// is opened (`ddpm_data::probe`), equal to an in-process pass, and cached beside the file: a
/// write in place (new ctime) or a copy (another inode) misses the cache and gets its own value.
#[test]
fn computed_once_per_file_version_and_never_stale() {
    use ddpm_data::fingerprint::{compute, known};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.h5");
    let sidecar = dir.path().join("c.h5.ddpm-check.json");
    let fp = write(&p, 2, Some(1), |_, _, _| {});
    assert!(
        !sidecar.exists(),
        "a file just written is not cached (timestamps are coarse)"
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let ds = Hdf5Dataset::open(&p).unwrap();
    assert!(sidecar.exists());
    assert_eq!(known(&p, ds.version()), Some(fp.clone()));
    assert_eq!(compute(&ds).unwrap(), fp);
    assert_eq!(ds.fingerprint().unwrap(), fp);
    drop(ds);

    let copy = dir.path().join("copy.h5");
    std::fs::copy(&p, &copy).unwrap();
    let v = ddpm_data::fingerprint::FileVersion::of(&copy).unwrap();
    assert_eq!(known(&copy, &v), None);
    assert_eq!(Hdf5Dataset::open(&copy).unwrap().fingerprint().unwrap(), fp);

    // One pixel rewritten in place: same path, inode and size.
    {
        let f = hdf5::File::open_rw(&p).unwrap();
        let img = f.dataset("images").unwrap();
        img.write_slice(&ndarray::arr1(&[77u8]), (4, 1, 1, 1..2))
            .unwrap();
    }
    let ds = Hdf5Dataset::open(&p).unwrap();
    assert_eq!(known(&p, ds.version()), None);
    let changed = ds.fingerprint().unwrap();
    assert_ne!(changed.sha256, fp.sha256);
    assert_eq!(changed, compute(&ds).unwrap());
}
