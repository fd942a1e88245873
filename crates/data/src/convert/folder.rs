//! A folder of class sub-folders of PNG/JPEG files (the ImageNet / `ImageFolder` layout).
//!
//! Class `i` is the `i`-th sub-folder in byte order of its name; within a class, files are taken in
//! byte order of their names. Files whose extension is not png/jpg/jpeg are skipped with a warning.
//! Each image is resized so its shorter side is `resolution` (Catmull-Rom, i.e. bicubic, with the
//! filter widened when shrinking so it also anti-aliases) and then center-cropped to a square, as
//! guided-diffusion's `center_crop_arr` does.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::ImageDecoder;
use indicatif::ProgressBar;
use rayon::prelude::*;

use super::ConvertSummary;
use crate::error::{DataError, Result};
use crate::limits;
use crate::writer::{DatasetMeta, DatasetWriter, WriteOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderOptions {
    /// Output images are `resolution x resolution`.
    pub resolution: usize,
    /// Store one grey channel instead of RGB.
    pub grayscale: bool,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::file(dir, "no such directory"),
        _ => DataError::io(dir, "cannot list directory", e),
    })?;
    let mut v = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, "cannot list directory", e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        v.push(entry.path());
    }
    v.sort();
    Ok(v)
}

/// Resizes so the shorter side is `r`, then crops the central `r x r` square.
pub fn center_crop_resize(img: &image::DynamicImage, r: u32, grayscale: bool) -> Vec<u8> {
    let (w, h) = (img.width(), img.height());
    let scale = r as f64 / w.min(h) as f64;
    let nw = ((w as f64 * scale).round() as u32).max(r);
    let nh = ((h as f64 * scale).round() as u32).max(r);
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        img.resize_exact(nw, nh, FilterType::CatmullRom)
    };
    let cropped = resized.crop_imm((nw - r) / 2, (nh - r) / 2, r, r);
    if grayscale {
        cropped.to_luma8().into_raw()
    } else {
        cropped.to_rgb8().into_raw()
    }
}

/// The sizes `center_crop_resize` resizes a `w x h` image to before cropping.
fn resized_dims(w: u32, h: u32, r: u32) -> (u64, u64) {
    let scale = r as f64 / w.min(h) as f64;
    let nw = ((w as f64 * scale).round() as u64).max(r as u64);
    let nh = ((h as f64 * scale).round() as u64).max(r as u64);
    (nw, nh)
}

/// Checks an image's header (size, aspect ratio, decoded type) against [`crate::limits`] and returns
/// the bytes decoding, resizing and cropping it will hold at once: the decoded image, the resize's
/// RGBA f32 intermediate (`w x nh`) and result (`nw x nh`), and the crop.
fn check_header(path: &Path, (w, h): (u32, u32), bpp: u64, r: u32) -> Result<u64> {
    let bad = |what: String| Err(DataError::file(path, format!("image is {w}x{h}: {what}")));
    if w == 0 || h == 0 {
        return bad("zero size".into());
    }
    let (short, long) = (w.min(h) as u64, w.max(h) as u64);
    if (w as u64) * (h as u64) > limits::MAX_INPUT_PIXELS {
        return bad(format!(
            "more than the limit of {} pixels per input image",
            limits::MAX_INPUT_PIXELS
        ));
    }
    if long > short * limits::MAX_ASPECT_RATIO {
        return bad(format!(
            "aspect ratio {:.1}:1 is above the limit of {}:1 (resizing its shorter side to {r} would \
             make it {r}x{})",
            long as f64 / short as f64,
            limits::MAX_ASPECT_RATIO,
            (long * r as u64).div_ceil(short)
        ));
    }
    let decoded = w as u64 * h as u64 * bpp;
    let (nw, nh) = resized_dims(w, h, r);
    let resize = if (nw, nh) == (w as u64, h as u64) {
        decoded
    } else {
        w as u64 * nh * 16 + nw * nh * bpp
    };
    let work = decoded + resize + (r as u64 * r as u64 * 4);
    if work > limits::MAX_IMAGE_WORK_BYTES {
        return bad(format!(
            "decoding and resizing it to {r} px would take about {work} bytes, above the limit of {} \
             bytes per image",
            limits::MAX_IMAGE_WORK_BYTES
        ));
    }
    Ok(work)
}

/// A decoder for `path` whose header passed [`check_header`], and the work estimate.
fn open_checked(path: &Path, r: u32) -> Result<(impl image::ImageDecoder, u64)> {
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, "cannot open image", e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, "cannot read image", e))?;
    let mut lim = image::Limits::default();
    lim.max_alloc = Some(limits::MAX_IMAGE_WORK_BYTES);
    reader.limits(lim);
    let decoder = reader
        .into_decoder()
        .map_err(|e| DataError::file(path, format!("cannot decode image: {e}")))?;
    let bpp = decoder.color_type().bytes_per_pixel() as u64;
    let work = check_header(path, decoder.dimensions(), bpp, r)?;
    Ok((decoder, work))
}

/// Bytes [`load_image`] of `path` will hold at once, from the image's header alone (nothing is
/// decoded); an error names the file when the header is unreadable or above a bound.
pub fn probe_image(path: &Path, r: u32) -> Result<u64> {
    open_checked(path, r).map(|(_, work)| work)
}

/// Decodes `path` (after the header checks of [`probe_image`]) and resizes and crops it to `r x r`.
pub fn load_image(path: &Path, r: u32, grayscale: bool) -> Result<Vec<u8>> {
    let (decoder, _) = open_checked(path, r)?;
    let img = image::DynamicImage::from_decoder(decoder)
        .map_err(|e| DataError::file(path, format!("cannot decode image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(DataError::file(path, "image has zero size"));
    }
    Ok(center_crop_resize(&img, r, grayscale))
}

/// Splits `items` into blocks decoded in parallel: consecutive, at most 256 images, and the sum of
/// their work estimates (plus outputs) at most [`limits::MAX_DECODE_BLOCK_BYTES`] unless one image
/// alone is the block.
fn decode_blocks(work: &[u64], out_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut blocks = Vec::new();
    let (mut start, mut sum) = (0, 0u64);
    for (i, &wk) in work.iter().enumerate() {
        let cost = wk + out_bytes;
        if i > start && (i - start == 256 || sum + cost > limits::MAX_DECODE_BLOCK_BYTES) {
            blocks.push(start..i);
            (start, sum) = (i, 0);
        }
        sum += cost;
    }
    if start < work.len() {
        blocks.push(start..work.len());
    }
    blocks
}

pub fn convert_folder(
    dir: &Path,
    fo: &FolderOptions,
    out: &Path,
    opts: &WriteOptions,
    pb: &ProgressBar,
) -> Result<ConvertSummary> {
    let _span = tracing::info_span!("convert_folder", dir = %dir.display()).entered();
    if fo.resolution == 0 || fo.resolution as u64 > limits::MAX_SIDE {
        return Err(DataError::Config(format!(
            "resolution {} is outside 1..={}",
            fo.resolution,
            limits::MAX_SIDE
        )));
    }
    let classes: Vec<PathBuf> = sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    if classes.is_empty() {
        return Err(DataError::file(
            dir,
            "has no class sub-folders (expected DIR/<class>/<image>.png|jpg)",
        ));
    }
    let mut items: Vec<(PathBuf, i64)> = Vec::new();
    let mut skipped = 0usize;
    for (k, class_dir) in classes.iter().enumerate() {
        for p in sorted_entries(class_dir)? {
            if p.is_file() && is_image(&p) {
                items.push((p, k as i64));
            } else {
                skipped += 1;
                tracing::warn!(path = %p.display(), "skipping: not a .png/.jpg/.jpeg file");
            }
        }
    }
    if items.is_empty() {
        return Err(DataError::file(
            dir,
            "has class sub-folders but no .png/.jpg/.jpeg files in them",
        ));
    }
    if skipped > 0 {
        tracing::warn!(skipped, "entries that are not images were skipped");
    }
    let names: Vec<String> = classes
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let r = fo.resolution;
    let c = if fo.grayscale { 1 } else { 3 };
    let n = items.len();
    let mut writer = DatasetWriter::create(out, n, [r, r, c], opts)?;
    pb.set_length(n as u64);
    // Headers first (nothing decoded): every size and aspect ratio is checked before any decode, and
    // the estimates size the parallel blocks.
    let work: Vec<u64> = items
        .par_iter()
        .map(|(p, _)| probe_image(p, r as u32))
        .collect::<Result<_>>()?;
    // Decode in parallel, write in order: byte-budgeted blocks keep memory bounded, and the output is
    // deterministic.
    for block in decode_blocks(&work, (r * r * c) as u64) {
        let block = &items[block];
        let decoded: Vec<Vec<u8>> = block
            .par_iter()
            .map(|(p, _)| load_image(p, r as u32, fo.grayscale))
            .collect::<Result<_>>()?;
        for img in &decoded {
            writer.push_images(img)?;
        }
        writer.push_labels(&block.iter().map(|(_, y)| *y).collect::<Vec<_>>());
        pb.inc(block.len() as u64);
    }
    let chunk_images = writer.chunk_images();
    let num_classes = Some(names.len());
    let source = format!(
        "folder {} at {r}x{r}, shorter side resized (Catmull-Rom) and center-cropped",
        dir.display()
    );
    writer.finish(&DatasetMeta {
        source,
        class_names: Some(names),
    })?;
    pb.finish_and_clear();
    Ok(ConvertSummary {
        out: out.to_path_buf(),
        n,
        height: r,
        width: r,
        channels: c,
        num_classes,
        chunk_images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_blocks_stay_within_the_byte_budget() {
        let gib = 1u64 << 30;
        // 1.1 GiB images are decoded one at a time, 0.9 GiB ones two at a time (budget 2 GiB).
        let big = decode_blocks(&[gib * 11 / 10; 3], 1 << 20);
        assert_eq!(big, vec![0..1, 1..2, 2..3]);
        let pairs = decode_blocks(&[gib * 9 / 10; 4], 1 << 20);
        assert_eq!(pairs, vec![0..2, 2..4]);
        // Small images: 256 per block, all covered in order.
        let small = decode_blocks(&[1000; 600], 100);
        assert_eq!(small, vec![0..256, 256..512, 512..600]);
        // Every block's total is within the budget unless it is a single image.
        let mixed: Vec<u64> = (0..300).map(|i| (i % 7) * gib / 5).collect();
        for b in decode_blocks(&mixed, 1 << 20) {
            let sum: u64 = mixed[b.clone()].iter().map(|w| w + (1 << 20)).sum();
            assert!(
                b.len() == 1 || sum <= limits::MAX_DECODE_BLOCK_BYTES,
                "{b:?}: {sum}"
            );
        }
    }

    #[test]
    fn header_checks_bound_size_and_aspect() {
        let p = Path::new("x.png");
        let err = check_header(p, (1, 65535), 1, 256).unwrap_err().to_string();
        assert!(
            err.contains("x.png") && err.contains("aspect ratio"),
            "{err}"
        );
        let err = check_header(p, (10000, 10000), 3, 256)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pixels"), "{err}");
        let err = check_header(p, (0, 5), 3, 256).unwrap_err().to_string();
        assert!(err.contains("zero size"), "{err}");
        assert!(check_header(p, (640, 480), 3, 256).is_ok());
        assert!(check_header(p, (8 * 300, 300), 3, 64).is_ok());
    }
}
