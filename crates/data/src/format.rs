//! The on-disk dataset format, and the validating reader for it.
//!
//! # Format, `format_version` 1
//!
//! One HDF5 file holds one split (train or test) of one image dataset:
//!
//! | object | kind | HDF5 type | shape | required |
//! |---|---|---|---|---|
//! | `images` | dataset | `uint8` | `[N, H, W, C]`, `C` is 1 (grey) or 3 (RGB) | yes |
//! | `labels` | dataset | any integer type | `[N]`, values in `0..num_classes` | no |
//! | `format_version` | root attribute | integer scalar | `1` | yes |
//! | `source` | root attribute | string scalar | where the data came from | yes |
//! | `num_classes` | root attribute | integer scalar `>= 1` | | exactly when `labels` exists |
//! | `class_names` | root attribute | string array | `[num_classes]` | exactly when `labels` exists |
//!
//! - `images` rows are top to bottom, columns left to right, channels R, G, B. Pixels are stored as
//!   they were in the source (no normalisation); the loader maps `x` to `x / 127.5 - 1`.
//! - `images` must use the chunked layout with chunk shape `[K, H, W, C]`, `K >= 1`: every chunk holds
//!   whole images. The loader reads whole chunks, so a random batch never decompresses a chunk twice and
//!   never touches a partial image. Chunks may be compressed with any filter the HDF5 library can
//!   decode; the converters write deflate (gzip) level 4 and pick `K` so a chunk is about 64 KiB.
//! - Strings are HDF5 variable-length strings (UTF-8 or ASCII), which is what h5py writes for Python
//!   `str` values and lists of `str`.
//!
//! Anything else (missing or mistyped object, wrong rank, labels of the wrong length or out of
//! range, a truncated file) is rejected by [`Hdf5Dataset::open`] with an error that names the file and
//! the dataset or attribute.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use hdf5::types::{TypeDescriptor, VarLenAscii, VarLenUnicode};

use crate::error::{DataError, Result};
use crate::limits;

/// The only format version this crate reads and writes.
pub const FORMAT_VERSION: i64 = 1;
pub const IMAGES: &str = "images";
pub const LABELS: &str = "labels";
pub const ATTR_FORMAT_VERSION: &str = "format_version";
pub const ATTR_SOURCE: &str = "source";
pub const ATTR_NUM_CLASSES: &str = "num_classes";
pub const ATTR_CLASS_NAMES: &str = "class_names";

/// An opened, validated dataset file. Cheap to query; image data is read on demand.
#[derive(Debug)]
pub struct Hdf5Dataset {
    path: PathBuf,
    // Kept open for the lifetime of the reader; `images` borrows nothing from it at the Rust level,
    // but closing the file first would invalidate the dataset handle.
    _file: hdf5::File,
    images: hdf5::Dataset,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    chunk_images: usize,
    filters: Vec<String>,
    labels: Option<Vec<i64>>,
    num_classes: Option<usize>,
    class_names: Vec<String>,
    source: String,
    version: crate::fingerprint::FileVersion,
    /// What the checking child computed before this process opened the file ([`crate::probe`]).
    checked_fingerprint: Option<crate::DatasetFingerprint>,
}

impl Hdf5Dataset {
    /// Opens and validates `path` against the format above. Labels are read (and range-checked) here,
    /// images are not. A file version this process has not seen checked is first read through by a
    /// child process ([`crate::probe`]), so a file that crashes libhdf5 is an error naming it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        check_container(path)?;
        let version = crate::fingerprint::FileVersion::of(path)
            .map_err(|e| DataError::io(path, "cannot stat", e))?;
        let mut checked = crate::fingerprint::known(path, &version);
        if checked.is_none() {
            checked = crate::probe::check_in_child(path, &version)?;
            if let Some(fp) = &checked {
                crate::fingerprint::remember(path, &version, fp);
            }
        }
        let mut ds = Self::open_in_this_process(path)?;
        (ds.version, ds.checked_fingerprint) = (version, checked);
        Ok(ds)
    }

    /// [`Self::open`] without the child: what the child itself runs. A file that crashes libhdf5
    /// crashes this process.
    pub fn open_in_this_process(path: &Path) -> Result<Self> {
        check_container(path)?;
        let version = crate::fingerprint::FileVersion::of(path)
            .map_err(|e| DataError::io(path, "cannot stat", e))?;
        let file = hdf5::File::open(path)
            .map_err(|e| DataError::file(path, format!("cannot open as an HDF5 file: {e}")))?;

        let ImagesLayout {
            images,
            n,
            h,
            w,
            c,
            chunk_images,
        } = open_images(&file, path)?;
        let filters = images.filters().iter().map(|f| format!("{f:?}")).collect();

        let format_version = read_int_attr(&file, path, ATTR_FORMAT_VERSION)?.ok_or_else(|| {
            DataError::attribute(path, ATTR_FORMAT_VERSION, "missing (not a ddpm-data file?)")
        })?;
        if format_version != FORMAT_VERSION {
            return Err(DataError::attribute(
                path,
                ATTR_FORMAT_VERSION,
                format!("is {format_version}; this build reads version {FORMAT_VERSION}"),
            ));
        }
        let source = read_string_attr(&file, path, ATTR_SOURCE)?
            .ok_or_else(|| DataError::attribute(path, ATTR_SOURCE, "missing"))?;

        let labels = read_labels(&file, path, n)?;
        let (num_classes, class_names) = read_classes(&file, path, labels.as_deref())?;

        Ok(Self {
            path: path.to_path_buf(),
            _file: file,
            images,
            n,
            h,
            w,
            c,
            chunk_images,
            filters,
            labels,
            num_classes,
            class_names,
            source,
            version,
            checked_fingerprint: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Number of examples N.
    pub fn len(&self) -> usize {
        self.n
    }
    /// Always false for an opened file (empty files are rejected); here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn height(&self) -> usize {
        self.h
    }
    pub fn width(&self) -> usize {
        self.w
    }
    pub fn channels(&self) -> usize {
        self.c
    }
    /// Bytes of one image (H * W * C).
    pub fn image_bytes(&self) -> usize {
        self.h * self.w * self.c
    }
    /// Images per HDF5 chunk (K).
    pub fn chunk_images(&self) -> usize {
        self.chunk_images
    }
    pub fn num_chunks(&self) -> usize {
        self.n.div_ceil(self.chunk_images)
    }
    /// HDF5 filters on `images`, for display.
    pub fn filters(&self) -> &[String] {
        &self.filters
    }
    pub fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }
    /// A copy of the labels (the contract in API.md); see [`Self::labels_slice`] to borrow.
    pub fn labels(&self) -> Option<Vec<i64>> {
        self.labels.clone()
    }
    pub fn labels_slice(&self) -> Option<&[i64]> {
        self.labels.as_deref()
    }
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The file version (device, inode, size, times) that was opened.
    pub fn version(&self) -> &crate::fingerprint::FileVersion {
        &self.version
    }
    pub(crate) fn checked_fingerprint(&self) -> Option<crate::DatasetFingerprint> {
        self.checked_fingerprint.clone()
    }

    /// Reads images `start..start + count` as uint8 NHWC.
    pub fn read_images(&self, start: usize, count: usize) -> Result<Vec<u8>> {
        let end = start
            .checked_add(count)
            .filter(|&e| e <= self.n)
            .ok_or_else(|| {
                DataError::dataset(
                    &self.path,
                    IMAGES,
                    format!("read of {count} images at {start} is past N = {}", self.n),
                )
            })?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let arr = self
            .images
            .read_slice::<u8, _, ndarray::Ix4>((start..end, .., .., ..))
            .map_err(|e| {
                DataError::dataset(
                    &self.path,
                    IMAGES,
                    format!("reading images {start}..{end} failed: {e}"),
                )
            })?;
        let (v, offset) = arr.into_raw_vec_and_offset();
        debug_assert!(offset.unwrap_or(0) == 0);
        if v.len() != count * self.image_bytes() {
            return Err(DataError::dataset(
                &self.path,
                IMAGES,
                format!(
                    "reading images {start}..{end} returned {} bytes, expected {}",
                    v.len(),
                    count * self.image_bytes()
                ),
            ));
        }
        Ok(v)
    }

    /// Reads HDF5 chunk `k` (images `k*K .. min((k+1)*K, N)`): exactly one chunk from disk.
    pub fn read_chunk(&self, k: usize) -> Result<Vec<u8>> {
        let Some(start) = k.checked_mul(self.chunk_images).filter(|&s| s < self.n) else {
            return Err(DataError::dataset(
                &self.path,
                IMAGES,
                format!("chunk {k} is past the last chunk"),
            ));
        };
        self.read_images(start, self.chunk_images.min(self.n - start))
    }
}

/// Bounds the declared shape of `images` (see [`crate::limits`]) before anything is sized from it.
fn check_image_shape(path: &Path, shape: &[usize]) -> Result<()> {
    let bad = |what: String| Err(DataError::dataset(path, IMAGES, what));
    if shape[..3].contains(&0) {
        return bad(format!("is empty (shape {shape:?})"));
    }
    limits::check_nhwc([shape[0], shape[1], shape[2], shape[3]])
        .or_else(|what| bad(format!("has shape {shape:?}: {what}")))
}

/// Bounds the chunk size, and checks that every chunk the shape promises is stored in the file: a
/// chunk that was never written reads as zeros, so without this a few-KB file could pass for any N.
fn check_chunks(
    path: &Path,
    images: &hdf5::Dataset,
    n: usize,
    k: usize,
    image_bytes: usize,
) -> Result<()> {
    let chunk_bytes = (k as u64).saturating_mul(image_bytes as u64);
    if chunk_bytes > limits::MAX_CHUNK_BYTES {
        return Err(DataError::dataset(
            path,
            IMAGES,
            format!(
                "has chunks of {k} images = {chunk_bytes} bytes, above the limit of {} bytes per chunk",
                limits::MAX_CHUNK_BYTES
            ),
        ));
    }
    let expected = n.div_ceil(k);
    let stored = images
        .num_chunks()
        .ok_or_else(|| DataError::dataset(path, IMAGES, "cannot count its stored chunks"))?;
    if stored < expected {
        return Err(DataError::dataset(
            path,
            IMAGES,
            format!(
                "only {stored} of {expected} chunks are stored (N = {n}, {k} images per chunk): the file \
                 declares more images than it holds (incomplete write?)"
            ),
        ));
    }
    Ok(())
}

/// Before handing the file to HDF5, check it exists, carries the HDF5 signature and is as long as its
/// superblock says. HDF5 would refuse all three too, but with a message about B-trees and addresses.
fn check_container(path: &Path) -> Result<()> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::file(path, "no such file"));
        }
        Err(e) => return Err(DataError::io(path, "cannot open", e)),
    };
    let len = f
        .metadata()
        .map_err(|e| DataError::io(path, "cannot stat", e))?
        .len();
    if len == 0 {
        return Err(DataError::file(
            path,
            "is empty (0 bytes), not an HDF5 file",
        ));
    }
    // The superblock sits at offset 0, or 512, 1024, 2048, ... when the file has a user block.
    let mut at = 0u64;
    let mut sig_at = None;
    while at + 8 <= len {
        let mut sig = [0u8; 8];
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(&mut sig))
            .map_err(|e| DataError::io(path, "read failed", e))?;
        if sig == *b"\x89HDF\r\n\x1a\n" {
            sig_at = Some(at);
            break;
        }
        at = if at == 0 { 512 } else { at * 2 };
    }
    let Some(sb) = sig_at else {
        return Err(DataError::file(
            path,
            "not an HDF5 file (no HDF5 signature found)",
        ));
    };
    let mut head = vec![0u8; 96];
    f.seek(SeekFrom::Start(sb))
        .map_err(|e| DataError::io(path, "seek failed", e))?;
    let got = read_up_to(&mut f, &mut head).map_err(|e| DataError::io(path, "read failed", e))?;
    head.truncate(got);
    let truncated = |what: String| DataError::file(path, format!("truncated HDF5 file: {what}"));
    let byte = |i: usize| {
        head.get(i)
            .copied()
            .ok_or_else(|| truncated(format!("superblock cut off ({len} bytes)")))
    };
    let version = byte(8)?;
    let (size_of_offsets, eof_field) = match version {
        0 => (byte(13)? as usize, 24 + 2 * byte(13)? as usize),
        1 => (byte(13)? as usize, 28 + 2 * byte(13)? as usize),
        2 | 3 => (byte(9)? as usize, 12 + 2 * byte(9)? as usize),
        // Newer superblocks: leave the judgement to the HDF5 library.
        _ => return Ok(()),
    };
    if !matches!(size_of_offsets, 2 | 4 | 8) {
        return Err(DataError::file(
            path,
            format!("corrupt HDF5 superblock (size of offsets {size_of_offsets})"),
        ));
    }
    let base_field = if version >= 2 {
        12
    } else {
        eof_field - 2 * size_of_offsets
    };
    let read_addr = |at: usize| -> Result<u64> {
        let bytes = head
            .get(at..at + size_of_offsets)
            .ok_or_else(|| truncated(format!("superblock cut off ({len} bytes)")))?;
        Ok(bytes
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64))
    };
    let undefined = if size_of_offsets == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size_of_offsets)) - 1
    };
    let base = read_addr(base_field)?;
    let eof = read_addr(eof_field)?;
    if base != undefined && eof != undefined {
        let need = base.saturating_add(eof);
        if len < need {
            return Err(truncated(format!(
                "{len} bytes on disk, but its superblock says the data ends at byte {need}"
            )));
        }
    }
    Ok(())
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            k => got += k,
        }
    }
    Ok(got)
}

fn describe(
    dtype: &hdf5::Result<hdf5::Datatype>,
    path: &Path,
    name: &str,
) -> Result<TypeDescriptor> {
    dtype
        .as_ref()
        .map_err(|e| DataError::dataset(path, name, format!("cannot read its type: {e}")))?
        .to_descriptor()
        .map_err(|e| DataError::dataset(path, name, format!("has an unsupported type: {e}")))
}

fn is_integer(d: &TypeDescriptor) -> bool {
    matches!(d, TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_))
}
/// The `images` dataset with its validated geometry.
struct ImagesLayout {
    images: hdf5::Dataset,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    chunk_images: usize,
}

/// Opens the `images` dataset and checks its type, rank, image shape and chunk layout.
fn open_images(file: &hdf5::File, path: &Path) -> Result<ImagesLayout> {
    let images = match file.dataset(IMAGES) {
        Ok(d) => d,
        Err(_) if !file.link_exists(IMAGES) => {
            return Err(DataError::dataset(
                path,
                IMAGES,
                "missing (every dataset file needs an `images` dataset)",
            ));
        }
        Err(e) => {
            return Err(DataError::dataset(
                path,
                IMAGES,
                format!("cannot open: {e}"),
            ))
        }
    };
    let dtype = describe(&images.dtype(), path, IMAGES)?;
    if dtype != TypeDescriptor::Unsigned(hdf5::types::IntSize::U1) {
        return Err(DataError::dataset(
            path,
            IMAGES,
            format!("has type {dtype}, expected uint8"),
        ));
    }
    let shape = images.shape();
    if shape.len() != 4 {
        return Err(DataError::dataset(
            path,
            IMAGES,
            format!(
                "has rank {} (shape {shape:?}), expected rank 4 [N, H, W, C]",
                shape.len()
            ),
        ));
    }
    let (n, h, w, c) = (shape[0], shape[1], shape[2], shape[3]);
    check_image_shape(path, &shape)?;
    let chunk = images.chunk().ok_or_else(|| {
        DataError::dataset(
            path,
            IMAGES,
            "is not chunked; the format needs chunks of whole images [K, H, W, C]",
        )
    })?;
    if chunk.len() != 4 || chunk[0] == 0 || chunk[1..] != shape[1..] {
        return Err(DataError::dataset(
            path,
            IMAGES,
            format!(
                "has chunk shape {chunk:?}; chunks must hold whole images, i.e. [K, {h}, {w}, {c}]"
            ),
        ));
    }
    check_chunks(path, &images, n, chunk[0], h * w * c)?;
    let chunk_images = chunk[0];
    Ok(ImagesLayout {
        images,
        n,
        h,
        w,
        c,
        chunk_images,
    })
}

/// Reads `num_classes` and `class_names` and checks them against `labels` (present or not).
fn read_classes(
    file: &hdf5::File,
    path: &Path,
    labels: Option<&[i64]>,
) -> Result<(Option<usize>, Vec<String>)> {
    let num_classes = read_int_attr(file, path, ATTR_NUM_CLASSES)?;
    let class_names = read_string_array_attr(file, path, ATTR_CLASS_NAMES)?;
    let classes = match (labels, num_classes, class_names) {
        (Some(labels), Some(k), Some(names)) => {
            if k < 1 {
                return Err(DataError::attribute(
                    path,
                    ATTR_NUM_CLASSES,
                    format!("is {k}, expected >= 1"),
                ));
            }
            if k as u64 > limits::MAX_CLASSES {
                return Err(DataError::attribute(
                    path,
                    ATTR_NUM_CLASSES,
                    format!("is {k}, above the limit of {} classes", limits::MAX_CLASSES),
                ));
            }
            let k = k as usize;
            if names.len() != k {
                return Err(DataError::attribute(
                    path,
                    ATTR_CLASS_NAMES,
                    format!("has {} names but num_classes is {k}", names.len()),
                ));
            }
            if let Some((i, &y)) = labels
                .iter()
                .enumerate()
                .find(|(_, &y)| y < 0 || y >= k as i64)
            {
                return Err(DataError::dataset(
                    path,
                    LABELS,
                    format!("label {y} of example {i} is outside 0..{k} (num_classes {k})"),
                ));
            }
            (Some(k), names)
        }
        (Some(_), None, _) => {
            return Err(DataError::attribute(
                path,
                ATTR_NUM_CLASSES,
                "missing, but the file has `labels`",
            ));
        }
        (Some(_), Some(_), None) => {
            return Err(DataError::attribute(
                path,
                ATTR_CLASS_NAMES,
                "missing, but the file has `labels`",
            ));
        }
        (None, Some(_), _) => {
            return Err(DataError::dataset(
                path,
                LABELS,
                "missing, but the file has a `num_classes` attribute",
            ));
        }
        (None, None, names) => (None, names.unwrap_or_default()),
    };
    Ok(classes)
}

fn open_attr(
    file: &hdf5::File,
    path: &Path,
    name: &str,
) -> Result<Option<(hdf5::Attribute, TypeDescriptor)>> {
    let names = file
        .attr_names()
        .map_err(|e| DataError::file(path, format!("cannot list root attributes: {e}")))?;
    if !names.iter().any(|n| n == name) {
        return Ok(None);
    }
    let attr = file
        .attr(name)
        .map_err(|e| DataError::attribute(path, name, format!("cannot open: {e}")))?;
    let desc = attr
        .dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(|e| DataError::attribute(path, name, format!("has an unsupported type: {e}")))?;
    Ok(Some((attr, desc)))
}

fn read_int_attr(file: &hdf5::File, path: &Path, name: &str) -> Result<Option<i64>> {
    let Some((attr, desc)) = open_attr(file, path, name)? else {
        return Ok(None);
    };
    if !is_integer(&desc) {
        return Err(DataError::attribute(
            path,
            name,
            format!("has type {desc}, expected an integer"),
        ));
    }
    if attr.size() != 1 {
        return Err(DataError::attribute(
            path,
            name,
            format!("has shape {:?}, expected a scalar", attr.shape()),
        ));
    }
    let v = attr
        .read_raw::<i64>()
        .map_err(|e| DataError::attribute(path, name, format!("cannot read: {e}")))?;
    Ok(v.first().copied())
}

fn read_strings(
    attr: &hdf5::Attribute,
    desc: &TypeDescriptor,
    path: &Path,
    name: &str,
) -> Result<Vec<String>> {
    let read_err = |e: hdf5::Error| DataError::attribute(path, name, format!("cannot read: {e}"));
    let strings: Vec<String> = match desc {
        TypeDescriptor::VarLenUnicode => attr
            .read_raw::<VarLenUnicode>()
            .map_err(read_err)?
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        TypeDescriptor::VarLenAscii => attr
            .read_raw::<VarLenAscii>()
            .map_err(read_err)?
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        other => {
            return Err(DataError::attribute(
                path,
                name,
                format!(
                    "has type {other}, expected variable-length strings (what h5py writes for str)"
                ),
            ))
        }
    };
    if let Some((i, s)) = strings
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() as u64 > limits::MAX_STRING_BYTES)
    {
        return Err(DataError::attribute(
            path,
            name,
            format!(
                "entry {i} is {} bytes long, above the limit of {} bytes",
                s.len(),
                limits::MAX_STRING_BYTES
            ),
        ));
    }
    Ok(strings)
}

fn read_string_attr(file: &hdf5::File, path: &Path, name: &str) -> Result<Option<String>> {
    let Some((attr, desc)) = open_attr(file, path, name)? else {
        return Ok(None);
    };
    if attr.size() != 1 {
        return Err(DataError::attribute(
            path,
            name,
            format!("has shape {:?}, expected a scalar string", attr.shape()),
        ));
    }
    Ok(read_strings(&attr, &desc, path, name)?.pop())
}

fn read_string_array_attr(
    file: &hdf5::File,
    path: &Path,
    name: &str,
) -> Result<Option<Vec<String>>> {
    let Some((attr, desc)) = open_attr(file, path, name)? else {
        return Ok(None);
    };
    if attr.ndim() > 1 {
        return Err(DataError::attribute(
            path,
            name,
            format!("has shape {:?}, expected a 1-D string array", attr.shape()),
        ));
    }
    if attr.size() as u64 > limits::MAX_CLASSES {
        return Err(DataError::attribute(
            path,
            name,
            format!(
                "has {} entries, above the limit of {} classes",
                attr.size(),
                limits::MAX_CLASSES
            ),
        ));
    }
    read_strings(&attr, &desc, path, name).map(Some)
}

fn read_labels(file: &hdf5::File, path: &Path, n: usize) -> Result<Option<Vec<i64>>> {
    if !file.link_exists(LABELS) {
        return Ok(None);
    }
    let ds = file
        .dataset(LABELS)
        .map_err(|e| DataError::dataset(path, LABELS, format!("cannot open: {e}")))?;
    let desc = describe(&ds.dtype(), path, LABELS)?;
    if !is_integer(&desc) {
        return Err(DataError::dataset(
            path,
            LABELS,
            format!("has type {desc}, expected an integer type"),
        ));
    }
    let shape = ds.shape();
    if shape.len() != 1 {
        return Err(DataError::dataset(
            path,
            LABELS,
            format!("has shape {shape:?}, expected rank 1 [N]"),
        ));
    }
    if shape[0] != n {
        return Err(DataError::dataset(
            path,
            LABELS,
            format!(
                "has {} entries but `images` has N = {n}; there must be one label per image",
                shape[0]
            ),
        ));
    }
    let v = ds
        .read_raw::<i64>()
        .map_err(|e| DataError::dataset(path, LABELS, format!("cannot read: {e}")))?;
    Ok(Some(v))
}
