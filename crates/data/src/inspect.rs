//! Summary statistics and a preview grid, to check a converted file by eye before training on it.

use std::path::Path;

use indicatif::ProgressBar;

use crate::error::{DataError, Result};
use crate::format::Hdf5Dataset;

#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// Examples per class, in class order, when labelled.
    pub class_counts: Option<Vec<u64>>,
    /// Per-channel pixel mean and standard deviation, in 0..255 units.
    pub channel_mean: Vec<f64>,
    pub channel_std: Vec<f64>,
    /// Over all channels.
    pub mean: f64,
    pub std: f64,
}

/// Reads every image once (chunk by chunk) and accumulates exact integer sums.
pub fn stats(ds: &Hdf5Dataset, pb: &ProgressBar) -> Result<Stats> {
    let c = ds.channels();
    let mut sum = vec![0u64; c];
    let mut sq = vec![0u64; c];
    pb.set_length(ds.len() as u64);
    for k in 0..ds.num_chunks() {
        let data = ds.read_chunk(k)?;
        for px in data.chunks_exact(c) {
            for (ch, &v) in px.iter().enumerate() {
                sum[ch] += v as u64;
                sq[ch] += (v as u64) * (v as u64);
            }
        }
        pb.inc((data.len() / ds.image_bytes()) as u64);
    }
    pb.finish_and_clear();
    let per = (ds.len() * ds.height() * ds.width()) as f64;
    let moments = |s: u64, q: u64, count: f64| {
        let m = s as f64 / count;
        (m, (q as f64 / count - m * m).max(0.0).sqrt())
    };
    let (channel_mean, channel_std): (Vec<f64>, Vec<f64>) =
        (0..c).map(|ch| moments(sum[ch], sq[ch], per)).unzip();
    let (mean, std) = moments(sum.iter().sum(), sq.iter().sum(), per * c as f64);
    let class_counts = match (ds.labels_slice(), ds.num_classes()) {
        (Some(labels), Some(k)) => {
            let mut counts = vec![0u64; k];
            for &y in labels {
                counts[y as usize] += 1;
            }
            Some(counts)
        }
        _ => None,
    };
    Ok(Stats {
        n: ds.len(),
        height: ds.height(),
        width: ds.width(),
        channels: c,
        class_counts,
        channel_mean,
        channel_std,
        mean,
        std,
    })
}

/// Which examples a preview grid shows: one row per class (its first `cols` examples) when the file is
/// labelled with at most 32 classes, otherwise the first `cols * cols` examples.
pub fn grid_indices(ds: &Hdf5Dataset, cols: usize) -> Vec<Vec<usize>> {
    match (ds.labels_slice(), ds.num_classes()) {
        (Some(labels), Some(k)) if k <= 32 => (0..k as i64)
            .map(|class| {
                labels
                    .iter()
                    .enumerate()
                    .filter(|(_, &y)| y == class)
                    .map(|(i, _)| i)
                    .take(cols)
                    .collect()
            })
            .collect(),
        _ => (0..cols)
            .map(|r| {
                (r * cols..(r + 1) * cols)
                    .filter(|&i| i < ds.len())
                    .collect::<Vec<_>>()
            })
            .filter(|row| !row.is_empty())
            .collect(),
    }
}

/// Writes a PNG grid of examples (see [`grid_indices`]), nearest-neighbour upscaled so small images are
/// at least 64 pixels wide.
pub fn write_grid(ds: &Hdf5Dataset, out: &Path, cols: usize) -> Result<()> {
    let cols = cols.max(1);
    let rows = grid_indices(ds, cols);
    let (h, w, c) = (ds.height(), ds.width(), ds.channels());
    let scale = (64 / h.max(w)).max(1);
    let pad = 2;
    let (cw, chh) = (w * scale + pad, h * scale + pad);
    let gw = cols * cw + pad;
    let gh = rows.len().max(1) * chh + pad;
    let mut canvas = vec![40u8; gw * gh * 3];
    for (r, row) in rows.iter().enumerate() {
        for (col, &i) in row.iter().enumerate() {
            let img = ds.read_images(i, 1)?;
            for y in 0..h * scale {
                for x in 0..w * scale {
                    let src = ((y / scale) * w + x / scale) * c;
                    let px = if c == 1 {
                        [img[src]; 3]
                    } else {
                        [img[src], img[src + 1], img[src + 2]]
                    };
                    let (gx, gy) = (pad + col * cw + x, pad + r * chh + y);
                    canvas[(gy * gw + gx) * 3..(gy * gw + gx) * 3 + 3].copy_from_slice(&px);
                }
            }
        }
    }
    ddpm_io::write_png(out, gw as u32, gh as u32, 3, &canvas)
        .map_err(|e| DataError::file(out, format!("cannot write the PNG: {e}")))
}
