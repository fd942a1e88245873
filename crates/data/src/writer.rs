//! Streaming, atomic writer for the dataset format (see [`crate::format`]).
//!
//! Converters push images in dataset order as they decode them, so a dataset never has to fit in memory
//! twice. Writes are grouped into whole chunks, which keeps HDF5 from compressing a chunk more than once.

use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;

use crate::error::{DataError, Result};
use crate::format::{
    ATTR_CLASS_NAMES, ATTR_FORMAT_VERSION, ATTR_NUM_CLASSES, ATTR_SOURCE, FORMAT_VERSION, IMAGES,
    LABELS,
};

/// Target size of one chunk when [`WriteOptions::chunk_images`] is not given: small enough that a random
/// batch reads little it does not need, large enough for deflate to work and for HDF5's chunk index to
/// stay small.
pub const TARGET_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    /// Images per chunk (K). `None`: as many as fit in [`TARGET_CHUNK_BYTES`], at least one.
    pub chunk_images: Option<usize>,
    /// Deflate level 1..=9, or `None` for no compression.
    pub deflate: Option<u8>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            chunk_images: None,
            deflate: Some(4),
        }
    }
}

/// Root attributes written by [`DatasetWriter::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetMeta {
    /// Free text: where the data came from (converter, input path, split).
    pub source: String,
    /// `Some(names)` for a labelled dataset (`num_classes` = `names.len()`), `None` for an unlabelled one.
    pub class_names: Option<Vec<String>>,
}

pub struct DatasetWriter {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<hdf5::File>,
    images: Option<hdf5::Dataset>,
    n: usize,
    hwc: [usize; 3],
    chunk_images: usize,
    flush_images: usize,
    pending: Vec<u8>,
    written: usize,
    labels: Vec<i64>,
    done: bool,
}

impl DatasetWriter {
    /// Creates `target.tmp` holding an `images` dataset of shape `[n, h, w, c]`.
    pub fn create(
        target: impl AsRef<Path>,
        n: usize,
        hwc: [usize; 3],
        opts: &WriteOptions,
    ) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let [h, w, c] = hwc;
        if n == 0 {
            return Err(DataError::Config(format!(
                "{}: refusing to write a dataset with no images",
                target.display()
            )));
        }
        if h == 0 || w == 0 || !(c == 1 || c == 3) {
            return Err(DataError::Config(format!(
                "{}: bad image shape [{h}, {w}, {c}]",
                target.display()
            )));
        }
        if let Some(l) = opts.deflate {
            if !(1..=9).contains(&l) {
                return Err(DataError::Config(format!(
                    "deflate level {l} is outside 1..=9"
                )));
            }
        }
        let image_bytes = h * w * c;
        let chunk_images = opts
            .chunk_images
            .unwrap_or((TARGET_CHUNK_BYTES / image_bytes).max(1))
            .clamp(1, n);
        let tmp = ddpm_io::temp_sibling(&target);
        let file = hdf5::File::create(&tmp)
            .map_err(|e| DataError::file(&tmp, format!("cannot create: {e}")))?;
        let mut builder =
            file.new_dataset::<u8>()
                .shape((n, h, w, c))
                .chunk((chunk_images, h, w, c));
        if let Some(level) = opts.deflate {
            builder = builder.deflate(level);
        }
        let images = builder
            .create(IMAGES)
            .map_err(|e| DataError::dataset(&tmp, IMAGES, format!("cannot create: {e}")))?;
        // About 4 MiB per HDF5 write call: few calls, bounded memory.
        let flush_images = chunk_images * (4 * 1024 * 1024 / (chunk_images * image_bytes)).max(1);
        Ok(Self {
            target,
            tmp,
            file: Some(file),
            images: Some(images),
            n,
            hwc,
            chunk_images,
            flush_images,
            pending: Vec::new(),
            written: 0,
            labels: Vec::new(),
            done: false,
        })
    }

    pub fn image_bytes(&self) -> usize {
        self.hwc.iter().product()
    }

    pub fn chunk_images(&self) -> usize {
        self.chunk_images
    }

    /// Images pushed so far.
    pub fn pushed(&self) -> usize {
        self.written + self.pending.len() / self.image_bytes()
    }

    /// Appends whole uint8 HWC images (`data.len()` a multiple of H*W*C).
    pub fn push_images(&mut self, data: &[u8]) -> Result<()> {
        let ib = self.image_bytes();
        if data.len() % ib != 0 {
            return Err(DataError::Config(format!(
                "{}: pushed {} bytes, not a whole number of {ib}-byte images",
                self.target.display(),
                data.len()
            )));
        }
        if self.pushed() + data.len() / ib > self.n {
            return Err(DataError::Config(format!(
                "{}: more than the declared {} images pushed",
                self.target.display(),
                self.n
            )));
        }
        self.pending.extend_from_slice(data);
        if self.pending.len() / ib >= self.flush_images {
            let whole = self.pending.len() / ib / self.chunk_images * self.chunk_images;
            self.flush(whole)?;
        }
        Ok(())
    }

    /// Appends labels (one per image, in the same order).
    pub fn push_labels(&mut self, labels: &[i64]) {
        self.labels.extend_from_slice(labels);
    }

    fn flush(&mut self, count: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let [h, w, c] = self.hwc;
        let bytes = count * self.image_bytes();
        let view = ndarray::ArrayView4::from_shape((count, h, w, c), &self.pending[..bytes])
            .map_err(|e| DataError::Config(format!("internal shape error: {e}")))?;
        let start = self.written;
        self.images
            .as_ref()
            .expect("dataset open until finish")
            .write_slice(view, (start..start + count, .., .., ..))
            .map_err(|e| {
                DataError::dataset(
                    &self.tmp,
                    IMAGES,
                    format!("writing images {start}.. failed: {e}"),
                )
            })?;
        self.pending.drain(..bytes);
        self.written += count;
        Ok(())
    }

    /// Writes the remaining images, `labels` and the root attributes, then atomically moves the file
    /// into place. Fails (and leaves no file) when fewer images or labels than declared were pushed.
    pub fn finish(mut self, meta: &DatasetMeta) -> Result<()> {
        let rest = self.pending.len() / self.image_bytes();
        self.flush(rest)?;
        if self.written != self.n {
            return Err(DataError::Config(format!(
                "{}: only {} of the declared {} images were written",
                self.target.display(),
                self.written,
                self.n
            )));
        }
        let file = self.file.as_ref().expect("file open until finish");
        let attr_err = |name: &str, e: hdf5::Error| {
            DataError::attribute(&self.tmp, name, format!("cannot write: {e}"))
        };
        match &meta.class_names {
            Some(names) => {
                if names.is_empty() {
                    return Err(DataError::Config(
                        "a labelled dataset needs at least one class name".into(),
                    ));
                }
                if self.labels.len() != self.n {
                    return Err(DataError::Config(format!(
                        "{}: {} labels for {} images",
                        self.target.display(),
                        self.labels.len(),
                        self.n
                    )));
                }
                let k = names.len() as i64;
                if let Some((i, y)) = self
                    .labels
                    .iter()
                    .enumerate()
                    .find(|(_, &y)| y < 0 || y >= k)
                {
                    return Err(DataError::Config(format!(
                        "{}: label {y} of example {i} is outside 0..{k} (the number of class names)",
                        self.target.display()
                    )));
                }
                file.new_dataset::<i64>()
                    .shape(self.n)
                    .create(LABELS)
                    .and_then(|d| d.write_raw(&self.labels))
                    .map_err(|e| {
                        DataError::dataset(&self.tmp, LABELS, format!("cannot write: {e}"))
                    })?;
                file.new_attr::<i64>()
                    .create(ATTR_NUM_CLASSES)
                    .and_then(|a| a.write_scalar(&k))
                    .map_err(|e| attr_err(ATTR_NUM_CLASSES, e))?;
                let names = names
                    .iter()
                    .map(|s| to_vlu(s))
                    .collect::<Result<Vec<_>>>()?;
                file.new_attr::<VarLenUnicode>()
                    .shape(names.len())
                    .create(ATTR_CLASS_NAMES)
                    .and_then(|a| a.write_raw(&names))
                    .map_err(|e| attr_err(ATTR_CLASS_NAMES, e))?;
            }
            None => {
                if !self.labels.is_empty() {
                    return Err(DataError::Config(format!(
                        "{}: labels were pushed but no class names given",
                        self.target.display()
                    )));
                }
            }
        }
        file.new_attr::<i64>()
            .create(ATTR_FORMAT_VERSION)
            .and_then(|a| a.write_scalar(&FORMAT_VERSION))
            .map_err(|e| attr_err(ATTR_FORMAT_VERSION, e))?;
        let source = to_vlu(&meta.source)?;
        file.new_attr::<VarLenUnicode>()
            .create(ATTR_SOURCE)
            .and_then(|a| a.write_scalar(&source))
            .map_err(|e| attr_err(ATTR_SOURCE, e))?;

        drop(self.images.take());
        let file = self.file.take().expect("file open until finish");
        file.close()
            .map_err(|e| DataError::file(&self.tmp, format!("closing failed: {e}")))?;
        ddpm_io::commit(&self.tmp, &self.target)
            .map_err(|e| DataError::io(&self.target, "cannot move into place", e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        if !self.done {
            drop(self.images.take());
            drop(self.file.take());
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn to_vlu(s: &str) -> Result<VarLenUnicode> {
    s.parse::<VarLenUnicode>()
        .map_err(|e| DataError::Config(format!("string {s:?} cannot be stored: {e}")))
}
