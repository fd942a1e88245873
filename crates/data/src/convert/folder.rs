//! A folder of class sub-folders of PNG/JPEG files (the ImageNet / `ImageFolder` layout).
//!
//! Class `i` is the `i`-th sub-folder in byte order of its name; within a class, files are taken in
//! byte order of their names. Files whose extension is not png/jpg/jpeg are skipped with a warning.
//! Each image is resized so its shorter side is `resolution` (Catmull-Rom, i.e. bicubic, with the
//! filter widened when shrinking so it also anti-aliases) and then center-cropped to a square, as
//! guided-diffusion's `center_crop_arr` does.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use indicatif::ProgressBar;
use rayon::prelude::*;

use super::ConvertSummary;
use crate::error::{DataError, Result};
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

fn load(path: &Path, r: u32, grayscale: bool) -> Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, "cannot open image", e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, "cannot read image", e))?
        .decode()
        .map_err(|e| DataError::file(path, format!("cannot decode image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(DataError::file(path, "image has zero size"));
    }
    Ok(center_crop_resize(&img, r, grayscale))
}

pub fn convert_folder(
    dir: &Path,
    fo: &FolderOptions,
    out: &Path,
    opts: &WriteOptions,
    pb: &ProgressBar,
) -> Result<ConvertSummary> {
    let _span = tracing::info_span!("convert_folder", dir = %dir.display()).entered();
    if fo.resolution == 0 || fo.resolution > 65_535 {
        return Err(DataError::Config(format!(
            "resolution {} is outside 1..=65535",
            fo.resolution
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
    // Decode in parallel, write in order: blocks keep memory bounded and the output deterministic.
    for block in items.chunks(256) {
        let decoded: Vec<Vec<u8>> = block
            .par_iter()
            .map(|(p, _)| load(p, r as u32, fo.grayscale))
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
