//! From samples to files: uint8 conversion, the PNG grid and the HDF5 output in the ddpm-data format.

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{Result, SamplerError};

/// `[B, C, H, W]` samples in [-1, 1] -> uint8 `[B, H, W, C]` bytes: `round((x + 1) * 127.5)` clamped to
/// 0..=255 (the inverse of ddpm-data's `x / 127.5 - 1`, rounded rather than truncated).
pub fn to_uint8_nhwc(x: &Tensor) -> Result<Vec<u8>> {
    let (b, c, h, w) = x.dims4()?;
    let v: Vec<f32> = x
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1()?;
    debug_assert_eq!(v.len(), b * c * h * w);
    Ok(v.iter()
        .map(|&p| ((p + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect())
}

/// uint8 `[N, H, W, C]` -> f32 `[N, C, H, W]` in [-1, 1] (ddpm-data's decoding).
pub fn from_uint8_nhwc(
    bytes: &[u8],
    n: usize,
    hwc: [usize; 3],
    device: &candle_core::Device,
) -> Result<Tensor> {
    let [h, w, c] = hwc;
    if bytes.len() != n * h * w * c {
        return Err(SamplerError::Config(format!(
            "{} bytes are not {n} images of {h}x{w}x{c}",
            bytes.len()
        )));
    }
    let v: Vec<f32> = bytes.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(v, (n, h, w, c), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// Lays out images (uint8 HWC, 1 or 3 channels) in a grid of `cols` columns with a 2-pixel white
/// border and writes it as a PNG, atomically.
pub fn write_grid_png(
    path: &Path,
    images: &[u8],
    n: usize,
    hwc: [usize; 3],
    cols: usize,
) -> Result<()> {
    let [h, w, c] = hwc;
    if n == 0 || cols == 0 || images.len() < n * h * w * c || !(c == 1 || c == 3) {
        return Err(SamplerError::Config(format!(
            "cannot make a grid of {n} images of {h}x{w}x{c} in {cols} columns"
        )));
    }
    const PAD: usize = 2;
    let rows = n.div_ceil(cols);
    let (gw, gh) = (cols * (w + PAD) + PAD, rows * (h + PAD) + PAD);
    let mut canvas = vec![255u8; gw * gh * c];
    for i in 0..n {
        let (r, q) = (i / cols, i % cols);
        let (y0, x0) = (PAD + r * (h + PAD), PAD + q * (w + PAD));
        let img = &images[i * h * w * c..(i + 1) * h * w * c];
        for y in 0..h {
            let dst = ((y0 + y) * gw + x0) * c;
            canvas[dst..dst + w * c].copy_from_slice(&img[y * w * c..(y + 1) * w * c]);
        }
    }
    ddpm_io::write_png(path, gw as u32, gh as u32, c, &canvas)
        .map_err(|e| SamplerError::Config(format!("{}: {e}", path.display())))
}

/// Class names of the training data when its HDF5 file is still there, else `class_0`, ...
pub fn class_names(run: &ddpm_config::TrainConfig, num_classes: usize) -> Vec<String> {
    if let Ok(ds) = ddpm_data::Hdf5Dataset::open(&run.data.path) {
        if ds.class_names().len() == num_classes {
            return ds.class_names().to_vec();
        }
    }
    (0..num_classes).map(|k| format!("class_{k}")).collect()
}

/// Writes samples as a ddpm-data HDF5 file (`images` uint8 `[N, H, W, C]`, `labels` when given, with
/// the class names), atomically.
pub fn write_samples_h5(
    path: &Path,
    images: &[u8],
    n: usize,
    hwc: [usize; 3],
    labels: Option<(&[u32], Vec<String>)>,
    source: &str,
) -> Result<()> {
    let err = |e: ddpm_data::DataError| SamplerError::Config(e.to_string());
    let mut w = ddpm_data::DatasetWriter::create(path, n, hwc, &ddpm_data::WriteOptions::default())
        .map_err(err)?;
    w.push_images(images).map_err(err)?;
    let class_names = match labels {
        Some((l, names)) => {
            w.push_labels(&l.iter().map(|&y| y as i64).collect::<Vec<_>>());
            Some(names)
        }
        None => None,
    };
    w.finish(&ddpm_data::DatasetMeta {
        source: source.to_string(),
        class_names,
    })
    .map_err(err)
}
