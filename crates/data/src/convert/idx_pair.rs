//! MNIST-style IDX image/label pairs, and Fashion-MNIST as shipped by Debian's
//! `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist/*-ubyte.gz`).

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use super::{ConvertSummary, Split};
use crate::error::{DataError, Result};
use crate::idx::read_idx;
use crate::limits;
use crate::writer::{DatasetMeta, DatasetWriter, WriteOptions};

/// Zalando's label order (fashion-mnist README).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// One IDX image file and, optionally, its label file.
#[derive(Debug, Clone)]
pub struct IdxInput {
    pub images: PathBuf,
    pub labels: Option<PathBuf>,
    /// Class names; `None` with labels means "0", "1", ... up to the largest label (or `num_classes`).
    pub class_names: Option<Vec<String>>,
    /// Number of classes when no names are given; `None` means largest label + 1.
    pub num_classes: Option<usize>,
    pub source: String,
}

/// The image and label files of `split` in `dir`, accepting the plain or the `.gz` name.
pub fn fashion_mnist_files(dir: &Path, split: Split) -> Result<(PathBuf, PathBuf)> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let find = |stem: String| -> Result<PathBuf> {
        for name in [stem.clone(), format!("{stem}.gz")] {
            let p = dir.join(&name);
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(DataError::file(
            dir,
            format!(
                "no {stem} or {stem}.gz here (Debian: apt-get install dataset-fashion-mnist, files in \
                 /usr/share/datasets/fashion-mnist)"
            ),
        ))
    };
    Ok((
        find(format!("{prefix}-images-idx3-ubyte"))?,
        find(format!("{prefix}-labels-idx1-ubyte"))?,
    ))
}

pub fn convert_fashion_mnist(
    dir: &Path,
    split: Split,
    out: &Path,
    opts: &WriteOptions,
    pb: &ProgressBar,
) -> Result<ConvertSummary> {
    let (images, labels) = fashion_mnist_files(dir, split)?;
    let input = IdxInput {
        source: format!(
            "fashion-mnist {} split from {} and {}",
            split.name(),
            images.display(),
            labels.display()
        ),
        images,
        labels: Some(labels),
        class_names: Some(
            FASHION_MNIST_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        num_classes: None,
    };
    convert_idx(&input, out, opts, pb)
}

/// Bounds the IDX image dimensions `[N, H, W(, C)]` like the dataset format does; the error names the
/// file and the dimension.
fn check_idx_image_dims(path: &Path, dims: &[usize], nhwc: [usize; 4]) -> Result<()> {
    let [n, h, w, c] = nhwc;
    let bad = |what: String| {
        Err(DataError::file(
            path,
            format!("IDX dimensions {dims:?}: {what}"),
        ))
    };
    if n as u64 > limits::MAX_EXAMPLES {
        return bad(format!(
            "N = {n} images is above the limit of {}",
            limits::MAX_EXAMPLES
        ));
    }
    for (name, side) in [("H", h), ("W", w)] {
        if side as u64 > limits::MAX_SIDE {
            return bad(format!(
                "{name} = {side} is above the limit of {} pixels",
                limits::MAX_SIDE
            ));
        }
    }
    if !limits::CHANNELS.contains(&(c as u64)) {
        return bad(format!("C = {c} channels, expected 1 or 3"));
    }
    Ok(())
}

/// Converts an IDX image file (`[N, H, W]` grey or `[N, H, W, C]`) and optional label file (`[N]`).
pub fn convert_idx(
    input: &IdxInput,
    out: &Path,
    opts: &WriteOptions,
    pb: &ProgressBar,
) -> Result<ConvertSummary> {
    let _span = tracing::info_span!("convert_idx", images = %input.images.display()).entered();
    let images = read_idx(&input.images)?;
    let (n, h, w, c) = match images.dims[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, c] => (n, h, w, c),
        ref d => {
            return Err(DataError::file(
                &input.images,
                format!("IDX dimensions {d:?}: an image file needs [N, H, W] or [N, H, W, C]"),
            ))
        }
    };
    check_idx_image_dims(&input.images, &images.dims, [n, h, w, c])?;
    if let Some(k) = input.num_classes {
        if k as u64 > limits::MAX_CLASSES {
            return Err(DataError::Config(format!(
                "--num-classes {k} is above the limit of {} classes",
                limits::MAX_CLASSES
            )));
        }
    }
    let (labels, class_names) = match &input.labels {
        Some(lpath) => {
            let l = read_idx(lpath)?;
            if l.dims != [n] {
                return Err(DataError::file(
                    lpath,
                    format!(
                        "IDX label dimensions {:?}, expected [{n}] (one label per image in {})",
                        l.dims,
                        input.images.display()
                    ),
                ));
            }
            let labels: Vec<i64> = l.data.iter().map(|&y| y as i64).collect();
            let max = labels.iter().copied().max().unwrap_or(0);
            let names = match (&input.class_names, input.num_classes) {
                (Some(names), _) => names.clone(),
                (None, Some(k)) => (0..k).map(|i| i.to_string()).collect(),
                (None, None) => (0..=max).map(|i| i.to_string()).collect(),
            };
            if max >= names.len() as i64 {
                return Err(DataError::file(
                    lpath,
                    format!(
                        "label {max} is outside 0..{} (the number of classes)",
                        names.len()
                    ),
                ));
            }
            (Some(labels), Some(names))
        }
        None => {
            if input.class_names.is_some() {
                return Err(DataError::Config(
                    "class names given but no label file".into(),
                ));
            }
            (None, None)
        }
    };

    let mut writer = DatasetWriter::create(out, n, [h, w, c], opts)?;
    pb.set_length(n as u64);
    let ib = h * w * c;
    let step = writer.chunk_images() * 64;
    for (i, block) in images.data.chunks(step * ib).enumerate() {
        writer.push_images(block)?;
        pb.set_position(((i + 1) * step).min(n) as u64);
    }
    if let Some(l) = &labels {
        writer.push_labels(l);
    }
    let num_classes = class_names.as_ref().map(|v| v.len());
    let chunk_images = writer.chunk_images();
    writer.finish(&DatasetMeta {
        source: input.source.clone(),
        class_names,
    })?;
    pb.finish_and_clear();
    Ok(ConvertSummary {
        out: out.to_path_buf(),
        n,
        height: h,
        width: w,
        channels: c,
        num_classes,
        chunk_images,
    })
}
