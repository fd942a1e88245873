//! CIFAR-10, "binary version" (`cifar-10-binary.tar.gz`, extracted): `data_batch_1.bin` ..
//! `data_batch_5.bin` and `test_batch.bin`, each a sequence of 3073-byte records: one label byte, then
//! 1024 red, 1024 green and 1024 blue bytes of a 32x32 image in row-major order (channel-planar, CHW).
//! We store HWC, so each record is transposed.

use std::io::Read;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use super::{ConvertSummary, Split};
use crate::error::{DataError, Result};
use crate::limits;
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
/// Records read and converted at a time (3 MB): memory stays bounded whatever a file's size.
const BLOCK_RECORDS: usize = 1024;

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
    // Bounded read: the meta file is a few lines; anything longer is not one.
    let read_meta = |p: PathBuf| -> Option<String> {
        let mut text = String::new();
        std::fs::File::open(p)
            .ok()?
            .take(limits::MAX_TEXT_FILE_BYTES)
            .read_to_string(&mut text)
            .ok()?;
        Some(text)
    };
    if let Some(text) = meta.and_then(read_meta) {
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

/// Records in one batch file, from its length (checked to be a whole, non-zero number of records).
pub fn cifar10_records(path: &Path) -> Result<usize> {
    let len = std::fs::metadata(path)
        .map_err(|e| DataError::io(path, "cannot stat", e))?
        .len();
    if len == 0 || len % RECORD as u64 != 0 {
        return Err(DataError::file(
            path,
            format!(
                "is {len} bytes, not a whole number of {RECORD}-byte CIFAR-10 records (truncated?)"
            ),
        ));
    }
    let records = len / RECORD as u64;
    if records > limits::MAX_EXAMPLES {
        return Err(DataError::file(
            path,
            format!(
                "holds {records} records, above the limit of {} examples",
                limits::MAX_EXAMPLES
            ),
        ));
    }
    Ok(records as usize)
}

/// Streams one batch file in blocks of at most [`BLOCK_RECORDS`] records, handing each block to `sink`
/// as HWC image bytes and labels (checked to be below `num_classes`). Returns the number of records.
pub fn read_cifar10_batch(
    path: &Path,
    num_classes: usize,
    mut sink: impl FnMut(&[u8], &[i64]) -> Result<()>,
) -> Result<usize> {
    let records = cifar10_records(path)?;
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, "cannot open", e))?;
    let mut raw = vec![0u8; BLOCK_RECORDS.min(records) * RECORD];
    let mut hwc = Vec::with_capacity(raw.len());
    let mut labels = Vec::with_capacity(BLOCK_RECORDS);
    let mut done = 0;
    while done < records {
        let count = BLOCK_RECORDS.min(records - done);
        let buf = &mut raw[..count * RECORD];
        f.read_exact(buf)
            .map_err(|e| DataError::io(path, format!("reading record {done} failed"), e))?;
        hwc.clear();
        labels.clear();
        for (j, rec) in buf.chunks_exact(RECORD).enumerate() {
            if rec[0] as usize >= num_classes {
                return Err(DataError::file(
                    path,
                    format!(
                        "record {}: label byte {} is not a CIFAR-10 class (0..{num_classes})",
                        done + j,
                        rec[0]
                    ),
                ));
            }
            labels.push(rec[0] as i64);
            record_to_hwc(&rec[1..], &mut hwc);
        }
        sink(&hwc, &labels)?;
        done += count;
    }
    Ok(records)
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
    let mut n = 0usize;
    for f in &files {
        n += cifar10_records(f)?;
        if n as u64 > limits::MAX_EXAMPLES {
            return Err(DataError::file(
                f,
                format!(
                    "brings the split to {n} records, above the limit of {} examples",
                    limits::MAX_EXAMPLES
                ),
            ));
        }
    }
    let names = class_names(&files);
    let mut writer = DatasetWriter::create(out, n, [SIDE, SIDE, 3], opts)?;
    pb.set_length(n as u64);
    let mut done = 0u64;
    for f in &files {
        read_cifar10_batch(f, names.len(), |hwc, labels| {
            writer.push_images(hwc)?;
            writer.push_labels(labels);
            done += labels.len() as u64;
            pb.set_position(done);
            Ok(())
        })?;
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
