//! CIFAR-10, "binary version" (`cifar-10-binary.tar.gz`, extracted): `data_batch_1.bin` ..
//! `data_batch_5.bin` and `test_batch.bin`, each a sequence of 3073-byte records: one label byte, then
//! 1024 red, 1024 green and 1024 blue bytes of a 32x32 image in row-major order (channel-planar, CHW).
//! We store HWC, so each record is transposed.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use super::{ConvertSummary, Split};
use crate::error::{DataError, Result};
use crate::writer::{DatasetMeta, DatasetWriter, WriteOptions};

pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;
const RECORD: usize = 1 + 3 * PLANE;

/// The batch files of `split`, in the order their records are written. `dir` may be the extracted
/// `cifar-10-batches-bin` folder or its parent.
pub fn cifar10_files(dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let nested = dir.join("cifar-10-batches-bin");
    let base = if nested.is_dir() {
        nested
    } else {
        dir.to_path_buf()
    };
    let names: Vec<String> = match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".to_string()],
    };
    names
        .into_iter()
        .map(|name| {
            let p = base.join(&name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(DataError::file(
                    &base,
                    format!("no {name} here (expected the CIFAR-10 binary version)"),
                ))
            }
        })
        .collect()
}

/// Class names from `batches.meta.txt` when present (one per line), else the standard list.
fn class_names(files: &[PathBuf]) -> Vec<String> {
    let meta = files
        .first()
        .and_then(|f| f.parent())
        .map(|d| d.join("batches.meta.txt"));
    if let Some(text) = meta.and_then(|p| std::fs::read_to_string(p).ok()) {
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if names.len() == CIFAR10_CLASSES.len() {
            return names;
        }
    }
    CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()
}

/// CHW planes of one record -> HWC bytes.
pub(crate) fn record_to_hwc(planes: &[u8], out: &mut Vec<u8>) {
    for p in 0..PLANE {
        out.extend_from_slice(&[planes[p], planes[PLANE + p], planes[2 * PLANE + p]]);
    }
}

pub fn convert_cifar10(
    dir: &Path,
    split: Split,
    out: &Path,
    opts: &WriteOptions,
    pb: &ProgressBar,
) -> Result<ConvertSummary> {
    let _span = tracing::info_span!("convert_cifar10", dir = %dir.display()).entered();
    let files = cifar10_files(dir, split)?;
    let mut n = 0;
    for f in &files {
        let len = std::fs::metadata(f)
            .map_err(|e| DataError::io(f, "cannot stat", e))?
            .len() as usize;
        if len == 0 || len % RECORD != 0 {
            return Err(DataError::file(
                f,
                format!("is {len} bytes, not a whole number of {RECORD}-byte CIFAR-10 records (truncated?)"),
            ));
        }
        n += len / RECORD;
    }
    let names = class_names(&files);
    let mut writer = DatasetWriter::create(out, n, [SIDE, SIDE, 3], opts)?;
    pb.set_length(n as u64);
    let mut done = 0u64;
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| DataError::io(f, "cannot read", e))?;
        let mut hwc = Vec::with_capacity(bytes.len());
        let mut labels = Vec::with_capacity(bytes.len() / RECORD);
        for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
            if rec[0] as usize >= names.len() {
                return Err(DataError::file(
                    f,
                    format!(
                        "record {i}: label byte {} is not a CIFAR-10 class (0..10)",
                        rec[0]
                    ),
                ));
            }
            labels.push(rec[0] as i64);
            record_to_hwc(&rec[1..], &mut hwc);
        }
        writer.push_images(&hwc)?;
        writer.push_labels(&labels);
        done += labels.len() as u64;
        pb.set_position(done);
    }
    let chunk_images = writer.chunk_images();
    let num_classes = Some(names.len());
    let source = format!(
        "cifar10 {} split from {}",
        split.name(),
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    writer.finish(&DatasetMeta {
        source,
        class_names: Some(names),
    })?;
    pb.finish_and_clear();
    Ok(ConvertSummary {
        out: out.to_path_buf(),
        n,
        height: SIDE,
        width: SIDE,
        channels: 3,
        num_classes,
        chunk_images,
    })
}
