//! Mutation fuzzing of every data reader: the HDF5 dataset reader (plus the loader, `inspect` and
//! the fingerprint on whatever it accepts), IDX (plain and gzip), CIFAR-10 binary batches and the
//! image-folder decoder.
//!
//! Each reader gets `DDPM_FUZZ_ITERS` inputs (default [`DEFAULT_ITERS`]) made from small valid
//! fixtures by the workspace's mutation engine (`ddpm_io::mutate`, aimed at each format's size
//! fields) and by format-aware mutations (HDF5 shapes and attributes, PNG/JPEG header sizes). Every
//! input must give `Ok` or an error naming the file: a panic fails the test with the seed and
//! iteration, and the capped allocator (common/alloc_cap.rs) aborts the binary on any single
//! allocation above 1 GiB. `DDPM_FUZZ_SEED` changes the seed.
//!
//! Longer run: `DDPM_FUZZ_ITERS=200000 cargo test --release -p ddpm-data --test fuzz`.

#[path = "common/alloc_cap.rs"]
mod alloc_cap;
mod common;

#[global_allocator]
static ALLOC: alloc_cap::CapAlloc = alloc_cap::CapAlloc;

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use ddpm_data::convert::{load_image, probe_image, read_cifar10_batch};
use ddpm_data::idx::read_idx;
use ddpm_data::{BatchAssembler, Hdf5Dataset, LoaderConfig, LoaderOptions, LoaderPosition};

use ddpm_io::mutate::{iterations, Mutator as Rng};

const DEFAULT_ITERS: usize = 1500;
/// Inputs of the any-byte pass in `cargo test` (a process each).
const ANY_BYTE_ITERS: usize = 200;

fn iters() -> usize {
    iterations(DEFAULT_ITERS)
}

fn seed(reader: u64) -> u64 {
    ddpm_io::mutate::seed(0x5eed_d00d) ^ reader.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Runs `f` on the file `path`; a panic or an error that does not name the file fails the test.
fn check<T>(
    reader: &str,
    it: usize,
    path: &Path,
    f: impl FnOnce() -> ddpm_data::Result<T>,
) -> Option<T> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    if std::env::var_os("DDPM_FUZZ_TRACE").is_some() {
        // A crash (not a panic) kills the process: keep each input before running it.
        let _ = std::fs::copy(
            path,
            std::env::temp_dir().join(format!("ddpm-fuzz-last-{reader}")),
        );
        eprintln!("{reader}: input {it}");
    }
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let keep = std::env::temp_dir().join(format!("ddpm-fuzz-{reader}-{it}"));
            let _ = std::fs::copy(path, &keep);
            panic!(
                "{reader}: input {it} panicked ({msg}); input kept at {}",
                keep.display()
            )
        }
        Ok(Err(e)) => {
            let text = e.to_string();
            assert!(
                text.contains(&name),
                "{reader}: input {it}: the error does not name the file {name}: {text}"
            );
            // The HDF5 check runs in a child (this test binary): its panics and refused
            // allocations come back as text and fail the test as they would here.
            for bug in ["(a bug)", "memory allocation of"] {
                assert!(!text.contains(bug), "{reader}: input {it}: {text}");
            }
            None
        }
        Ok(Ok(v)) => Some(v),
    }
}

fn write(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

// ---------------------------------------------------------------------------------------------- IDX

fn idx_fixture(dims: &[u32]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    let count: u32 = dims.iter().product();
    b.extend((0..count).map(|i| (i * 37 % 256) as u8));
    b
}

#[test]
fn fuzz_idx_plain_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let bases = [
        idx_fixture(&[3, 4, 5]),
        idx_fixture(&[2, 3, 3, 3]),
        idx_fixture(&[7]),
    ];
    let hot: Vec<usize> = (2..20).collect();
    let mut rng = Rng::new(seed(1));
    let (mut ok, mut rejected) = (0, 0);
    for it in 0..iters() {
        let base = rng.pick(&bases).clone();
        let mut bytes = rng.mutate_aimed(&base, &hot);
        let kind = rng.below(3);
        if kind == 1 {
            bytes = gz(&bytes); // a valid gzip of a mutated IDX
        } else if kind == 2 {
            bytes = rng.mutate_aimed(&gz(&base), &[0, 1, 2, 3, 8, 9]); // a mutated gzip
        }
        let path = dir.path().join(format!("idx-{}.ubyte", it % 16));
        write(&path, &bytes);
        alloc_cap::reset_peak();
        match check("idx", it, &path, || read_idx(&path)) {
            Some(a) => {
                ok += 1;
                assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
            }
            None => rejected += 1,
        }
        // The data held is at most what the (small) fixture could declare after mutation, or a
        // few buffers of the decompressor; never sized by an unchecked header.
        assert!(
            alloc_cap::peak() < 4 << 20,
            "idx input {it}: peak {}",
            alloc_cap::peak()
        );
    }
    eprintln!("idx: {ok} accepted, {rejected} rejected");
    assert!(ok > 0 && rejected > 0);
}

// ------------------------------------------------------------------------------------------ CIFAR-10

#[test]
fn fuzz_cifar10_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = Vec::new();
    for i in 0..3u8 {
        base.push(i * 3);
        base.extend((0..3072).map(|j| (j as u8).wrapping_mul(i + 1)));
    }
    let hot = [0usize, 3073, 2 * 3073, 3 * 3073 - 1];
    let mut rng = Rng::new(seed(2));
    let (mut ok, mut rejected) = (0, 0);
    for it in 0..iters() {
        let bytes = rng.mutate_aimed(&base, &hot);
        let path = dir.path().join(format!("data_batch_{}.bin", it % 16));
        write(&path, &bytes);
        alloc_cap::reset_peak();
        let mut seen = 0;
        let got = check("cifar10", it, &path, || {
            read_cifar10_batch(&path, 10, |hwc, labels| {
                assert_eq!(hwc.len(), labels.len() * 3072);
                seen += labels.len();
                Ok(())
            })
        });
        match got {
            Some(n) => {
                ok += 1;
                assert_eq!(n, seen);
            }
            None => rejected += 1,
        }
        assert!(
            alloc_cap::peak() < 8 << 20,
            "cifar input {it}: peak {}",
            alloc_cap::peak()
        );
    }
    eprintln!("cifar10: {ok} accepted, {rejected} rejected");
    assert!(ok > 0 && rejected > 0);
}

// ------------------------------------------------------------------------------------- image folder

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Sets a PNG's IHDR width and height and fixes the chunk CRC, so the decoder believes them.
fn png_with_dims(png: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut b = png.to_vec();
    if b.len() >= 33 && &b[12..16] == b"IHDR" {
        b[16..20].copy_from_slice(&w.to_be_bytes());
        b[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&b[12..29]);
        b[29..33].copy_from_slice(&crc.to_be_bytes());
    }
    b
}

/// Sets a baseline JPEG's SOF0 height and width.
fn jpeg_with_dims(jpg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut b = jpg.to_vec();
    if let Some(i) = b.windows(2).position(|x| x == [0xff, 0xc0]) {
        if b.len() > i + 9 {
            b[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
            b[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
        }
    }
    b
}

fn encoded(img: image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).unwrap();
    out.into_inner()
}

#[test]
fn fuzz_image_folder_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let rgb = image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 99]));
    let grey = image::GrayImage::from_fn(6, 9, |x, y| image::Luma([(x * y) as u8 * 5]));
    let png_rgb = encoded(rgb.clone().into(), image::ImageFormat::Png);
    let png_grey = encoded(grey.into(), image::ImageFormat::Png);
    let jpg = encoded(rgb.into(), image::ImageFormat::Jpeg);
    let dims = [0u32, 1, 2, 7, 64, 1000, 65535, 1 << 16, 1 << 20, u32::MAX];
    let mut rng = Rng::new(seed(3));
    let (mut ok, mut rejected) = (0, 0);
    for it in 0..iters() {
        let (bytes, ext) = match rng.below(5) {
            0 => (rng.mutate_aimed(&png_rgb, &[16, 17, 20, 21, 24, 25]), "png"),
            1 => (
                rng.mutate_aimed(&png_grey, &[16, 17, 20, 21, 24, 25]),
                "png",
            ),
            2 => (rng.mutate_aimed(&jpg, &[]), "jpg"),
            3 => {
                let base = if rng.below(2) == 0 {
                    &png_rgb
                } else {
                    &png_grey
                };
                (
                    png_with_dims(base, *rng.pick(&dims), *rng.pick(&dims)),
                    "png",
                )
            }
            _ => {
                let (w, h) = (*rng.pick(&dims) as u16, *rng.pick(&dims) as u16);
                (jpeg_with_dims(&jpg, w, h), "jpg")
            }
        };
        let path = dir.path().join(format!("img-{}.{ext}", it % 16));
        write(&path, &bytes);
        let r = *rng.pick(&[1u32, 8, 32]);
        let grey = rng.below(2) == 0;
        alloc_cap::reset_peak();
        let probed = check("image", it, &path, || probe_image(&path, r));
        match check("image", it, &path, || load_image(&path, r, grey)) {
            Some(px) => {
                ok += 1;
                assert!(
                    probed.is_some(),
                    "image input {it}: decoded but the probe failed"
                );
                assert_eq!(px.len(), (r * r) as usize * if grey { 1 } else { 3 });
            }
            None => rejected += 1,
        }
        assert!(
            alloc_cap::peak() as u64 <= ddpm_data::limits::MAX_IMAGE_WORK_BYTES,
            "image input {it}: peak {}",
            alloc_cap::peak()
        );
    }
    eprintln!("image: {ok} accepted, {rejected} rejected");
    assert!(ok > 0 && rejected > 0);
}

// --------------------------------------------------------------------------------------------- HDF5

/// Everything a consumer does with an accepted file: every chunk, a loader batch, the fingerprint.
fn exercise(path: &Path) -> ddpm_data::Result<()> {
    let ds = Hdf5Dataset::open(path)?;
    for k in 0..ds.num_chunks() {
        let c = ds.read_chunk(k)?;
        assert!(c.len() <= ds.chunk_images() * ds.image_bytes());
    }
    ds.fingerprint()?;
    let cfg = LoaderConfig {
        path: path.to_path_buf(),
        world: 1,
        rank: 0,
        batch: 1,
        seed: 0,
        flip: true,
        prefetch: 0,
    };
    let mut asm = BatchAssembler::new(cfg, LoaderOptions::default())?;
    let b = asm.assemble(LoaderPosition::default())?;
    assert_eq!(b.images.len(), ds.image_bytes());
    Ok(())
}

/// Small valid files: labelled deflate, unlabelled uncompressed, RGB.
fn hdf5_fixtures(dir: &Path) -> Vec<Vec<u8>> {
    let mk = |name: &str,
              n: usize,
              hwc: [usize; 3],
              classes: Option<usize>,
              deflate: Option<u8>|
     -> Vec<u8> {
        let p = dir.join(name);
        let opts = ddpm_data::WriteOptions {
            chunk_images: Some(2),
            deflate,
        };
        let [h, w, c] = hwc;
        let mut wr = ddpm_data::DatasetWriter::create(&p, n, hwc, &opts).unwrap();
        for i in 0..n {
            wr.push_images(&common::synthetic_image(i, h, w, c))
                .unwrap();
        }
        let class_names = classes.map(|k| {
            wr.push_labels(
                &(0..n)
                    .map(|i| common::synthetic_label(i, k))
                    .collect::<Vec<_>>(),
            );
            (0..k).map(|j| format!("class{j}")).collect()
        });
        wr.finish(&ddpm_data::DatasetMeta {
            source: "fuzz fixture".into(),
            class_names,
        })
        .unwrap();
        std::fs::read(&p).unwrap()
    };
    vec![
        mk("a.h5", 5, [3, 3, 1], Some(3), Some(1)),
        mk("b.h5", 4, [2, 2, 3], None, None),
    ]
}

/// Byte ranges of a fixture that byte-level mutation may touch: the superblock (checked by
/// `check_container` before libhdf5 sees the file) and every stored chunk of `images` (compressed or
/// raw pixels, decoded by libhdf5's filter pipeline). Object headers, where libhdf5 1.10.8 crashes
/// or loops, are left to the any-byte pass below, which checks that the checking child
/// (`ddpm_data::probe`) turns every such input into an error naming the file.
fn mutable_ranges(path: &Path) -> Vec<std::ops::Range<usize>> {
    let f = hdf5::File::open(path).unwrap();
    let ds = f.dataset("images").unwrap();
    let mut r = Vec::new();
    r.push(0..48); // the superblock
    for i in 0..ds.num_chunks().unwrap() {
        let c = ds.chunk_info(i).unwrap();
        r.push(c.addr as usize..(c.addr + c.size) as usize);
    }
    r
}

/// A byte-level mutation inside `ranges` (flip, boundary value, size field), length unchanged.
fn mutate_in(base: &[u8], ranges: &[std::ops::Range<usize>], rng: &mut Rng) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let r = rng.pick(ranges).clone();
        let i = r.start + rng.below(r.len());
        rng.overwrite(&mut b[..r.end], i);
    }
    b
}

/// A structurally valid HDF5 file with fuzzed *content*: declared shapes, chunk shapes, element
/// types, how much of `images` was written, labels (length, type, rank, values) and every root
/// attribute (present or not, type, value, size), each drawn from boundary values.
fn semantic_mutant(path: &Path, rng: &mut Rng) -> hdf5::Result<()> {
    let f = hdf5::FileBuilder::new()
        .with_fapl(|p| p.fclose_degree(hdf5::file::FileCloseDegree::Strong))
        .create(path)?;
    let n = *rng.pick(&[1usize, 2, 5, 9, 1 << 20, (1 << 31) + 1, 1 << 40]);
    let side = |rng: &mut Rng| *rng.pick(&[1usize, 2, 3, 5, 4097]);
    let (h, w) = (side(rng), side(rng));
    let c = *rng.pick(&[1usize, 1, 3, 3, 2, 4]);
    let mut chunk = [*rng.pick(&[1usize, 2, 3, 1 << 22]), h, w, c];
    chunk[0] = chunk[0].min(n);
    if rng.below(6) == 0 {
        let d = 1 + rng.below(3);
        chunk[d] = (chunk[d] / 2).max(1);
    }
    let dims = [n, h, w, c];
    let written = match rng.below(3) {
        0 => n.min(12),
        1 => 0,
        _ => rng.below(n.min(12) + 1),
    };
    let ib = h * w * c;
    match rng.below(8) {
        0 => {
            f.new_dataset::<u16>()
                .shape(dims)
                .chunk(chunk)
                .create("images")?;
        }
        1 => {
            f.new_dataset::<u8>()
                .shape([n, h * w * c])
                .chunk([1, ib])
                .create("images")?;
        }
        _ => {
            let mut b = f.new_dataset::<u8>().shape(dims).chunk(chunk);
            if rng.below(2) == 0 {
                b = b.deflate(1);
            }
            let ds = b.create("images")?;
            if written > 0 && written * ib <= 1 << 20 {
                let data: Vec<u8> = (0..written * ib).map(|i| (i % 251) as u8).collect();
                let arr = ndarray::Array4::from_shape_vec((written, h, w, c), data).unwrap();
                ds.write_slice(&arr, (0..written, .., .., ..))?;
            }
        }
    }
    let k = *rng.pick(&[1i64, 3, 10, 0, -1, 1 << 40]);
    if rng.below(3) != 0 {
        let len = *rng.pick(&[n, n, n.saturating_sub(1), n + 1]);
        let vals: Vec<i64> = (0..len.min(64))
            .map(|i| *rng.pick(&[0i64, 1, 2, k - 1, k, -1, i as i64]))
            .collect();
        match rng.below(6) {
            0 => {
                f.new_dataset::<f32>().shape(len).create("labels")?;
            }
            1 => {
                f.new_dataset::<i64>()
                    .shape([len, 2])
                    .chunk([1, 2])
                    .create("labels")?;
            }
            _ if len <= 64 => {
                f.new_dataset_builder().with_data(&vals).create("labels")?;
            }
            _ => {
                f.new_dataset::<i64>()
                    .shape(len)
                    .chunk(1024)
                    .create("labels")?;
            }
        }
    }
    let int_attr = |f: &hdf5::File, name: &str, v: i64| -> hdf5::Result<()> {
        f.new_attr::<i64>().create(name)?.write_scalar(&v)
    };
    let str_attr = |f: &hdf5::File, name: &str, v: &str| -> hdf5::Result<()> {
        let s: hdf5::types::VarLenUnicode = v.parse().unwrap();
        f.new_attr::<hdf5::types::VarLenUnicode>()
            .create(name)?
            .write_scalar(&s)
    };
    match rng.below(6) {
        0 => {}
        1 => int_attr(&f, "format_version", 2)?,
        2 => str_attr(&f, "format_version", "1")?,
        _ => int_attr(&f, "format_version", 1)?,
    }
    match rng.below(6) {
        0 => {}
        1 => int_attr(&f, "source", 7)?,
        2 => str_attr(&f, "source", &"x".repeat(70_000))?,
        _ => str_attr(&f, "source", "fuzz")?,
    }
    if rng.below(4) != 0 {
        int_attr(&f, "num_classes", k)?;
    }
    if rng.below(4) != 0 {
        let count = (*rng.pick(&[k, k, k - 1, 0, 2])).clamp(0, 64) as usize;
        let long = rng.below(8) == 0;
        let names: Vec<hdf5::types::VarLenUnicode> = (0..count)
            .map(|j| {
                let s = if long {
                    "n".repeat(70_000)
                } else {
                    format!("c{j}")
                };
                s.parse().unwrap()
            })
            .collect();
        f.new_attr::<hdf5::types::VarLenUnicode>()
            .shape(count)
            .create("class_names")?
            .write_raw(&names)?;
    }
    f.close()
}

#[test]
fn fuzz_hdf5_dataset_reader() {
    let dir = tempfile::tempdir().unwrap();
    let bases = hdf5_fixtures(dir.path());
    let mut ranges = Vec::new();
    for (i, b) in bases.iter().enumerate() {
        let p = dir.path().join(format!("base-{i}.h5"));
        write(&p, b);
        exercise(&p).expect("fixtures are valid");
        ranges.push(mutable_ranges(&p));
    }
    let mut rng = Rng::new(seed(4));
    let (mut ok, mut rejected, mut unbuildable) = (0, 0, 0);
    for it in 0..iters() {
        // A fresh name each time: libhdf5 identifies open files by name and inode, and must never
        // mistake a new input for one it still holds from an earlier error path.
        let path = dir.path().join(format!("f-{it}.h5"));
        if rng.below(2) == 0 {
            let which = rng.below(bases.len());
            write(&path, &mutate_in(&bases[which], &ranges[which], &mut rng));
        } else if !matches!(
            // The hdf5 crate itself overflows (debug assertion) on some shapes it is asked to write.
            catch_unwind(AssertUnwindSafe(|| semantic_mutant(&path, &mut rng))),
            Ok(Ok(()))
        ) {
            unbuildable += 1; // libhdf5 refused to write that combination (e.g. chunk > extent)
            let _ = std::fs::remove_file(&path);
            continue;
        }
        alloc_cap::reset_peak();
        match check("hdf5", it, &path, || exercise(&path)) {
            Some(()) => ok += 1,
            None => rejected += 1,
        }
        let _ = std::fs::remove_file(&path);
    }
    eprintln!("hdf5: {ok} accepted, {rejected} rejected, {unbuildable} not writable by libhdf5");
    assert!(ok > 0 && rejected > 0);
}

/// Byte mutations anywhere in the file, object headers included, each input read by
/// `ddpm-data inspect` (every chunk, statistics, fingerprint) in its own process under
/// `ulimit -v 4 GiB`. The process must end with status 0, or 1 and an error naming the file: a
/// Rust panic (101), an abort (a refused allocation), a signal or a hang fails the test. Inputs on
/// which libhdf5 crashes or loops are caught by the checking child (`ddpm_data::probe`) and counted.
/// In the suite at [`ANY_BYTE_ITERS`] inputs (a process each); longer:
/// `DDPM_FUZZ_ITERS=5000 cargo test -p ddpm-data --test fuzz any_byte`.
#[test]
fn fuzz_hdf5_any_byte_in_a_subprocess() {
    let dir = tempfile::tempdir().unwrap();
    let bases = hdf5_fixtures(dir.path());
    let mut rng = Rng::new(seed(5));
    let (mut fine, mut caught) = (0, 0);
    let n = iterations(ANY_BYTE_ITERS);
    for it in 0..n {
        let which = rng.below(bases.len());
        let path = dir.path().join(format!("raw-{it}.h5"));
        write(&path, &rng.mutate(&bases[which]));
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -v 4194304 && exec timeout -s KILL 300 \"$0\" inspect \"$1\"")
            .arg(env!("CARGO_BIN_EXE_ddpm-data"))
            .arg(&path)
            .env("HDF5_USE_FILE_LOCKING", "FALSE")
            .env("DDPM_HDF5_PROBE_TIMEOUT_S", "5")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let keep = std::env::temp_dir().join(format!("ddpm-fuzz-raw-{it}.h5"));
        let ok = match out.status.code() {
            Some(0) => true,
            Some(1) => stderr.contains(&format!("raw-{it}.h5")) && !stderr.contains("(a bug)"),
            _ => false,
        };
        if !ok {
            let _ = std::fs::copy(&path, &keep);
        }
        assert!(
            ok,
            "input {it} (kept at {}): {:?} {stderr}",
            keep.display(),
            out.status
        );
        if stderr.contains("libhdf5 crashed") || stderr.contains("did not finish within") {
            caught += 1;
            let _ = std::fs::copy(&path, &keep);
            eprintln!(
                "input {it} caught (kept at {}): {}",
                keep.display(),
                stderr.trim()
            );
        } else {
            fine += 1;
        }
        let _ = std::fs::remove_file(&path);
    }
    eprintln!("hdf5 any-byte: {n} inputs, {fine} read or rejected, {caught} crashes or hangs of libhdf5 caught");
}
