//! Reader for the IDX files of MNIST and Fashion-MNIST (plain or gzip-compressed).
//!
//! IDX layout: two zero bytes, an element-type code (0x08 = unsigned byte), the number of dimensions,
//! then each dimension as a big-endian u32, then the elements in row-major order. Only unsigned-byte
//! files exist for these datasets, so that is the only element type accepted.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::error::{DataError, Result};
use crate::limits::MAX_IDX_BYTES;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a whole IDX file; gzip is detected from the content, not the file name.
///
/// The header is read first and the element count it declares is bounded by [`MAX_IDX_BYTES`] before
/// the data is read; a plain file's length must match it, and a gzip stream is inflated through
/// `take(declared + 1)`, so neither a lying header nor a gzip bomb can make this allocate more than
/// the declared (bounded) size.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::file(path, "no such file"),
        _ => DataError::io(path, "cannot open", e),
    })?;
    let len = file
        .metadata()
        .map_err(|e| DataError::io(path, "cannot stat", e))?
        .len();
    let mut buffered = BufReader::new(file);
    let peek = buffered
        .fill_buf()
        .map_err(|e| DataError::io(path, "cannot read", e))?;
    if peek.starts_with(&[0x1f, 0x8b]) {
        let gz = flate2::bufread::MultiGzDecoder::new(buffered);
        read_stream(gz, path, None)
    } else {
        read_stream(buffered, path, Some(len))
    }
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> DataError {
    DataError::file(path, format!("not a valid IDX file: {what}"))
}

/// Reads as many bytes as `buf` holds, or fewer at the end of the stream.
fn read_full(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(DataError::io(
                    path,
                    "read failed (for a .gz: truncated or corrupt gzip stream?)",
                    e,
                ))
            }
        }
    }
    Ok(got)
}

/// `plain_len` is the file length for an uncompressed file (checked against the header before the
/// data is read), `None` for a decompressed stream.
fn read_stream(mut r: impl Read, path: &Path, plain_len: Option<u64>) -> Result<IdxArray> {
    let mut magic = [0u8; 4];
    let got = read_full(&mut r, &mut magic, path)?;
    check_magic(&magic[..got]).map_err(|w| invalid(path, w))?;
    let ndim = magic[3] as usize;
    let mut dim_bytes = vec![0u8; 4 * ndim];
    let got = read_full(&mut r, &mut dim_bytes, path)?;
    if got < dim_bytes.len() {
        return Err(invalid(
            path,
            format!(
                "dimensions: header needs {} bytes, file has {}",
                4 + 4 * ndim,
                4 + got
            ),
        ));
    }
    let dims = parse_dims(&dim_bytes);
    let count = declared_count(&dims).map_err(|w| invalid(path, w))?;
    let header = 4 + 4 * ndim as u64;
    if let Some(len) = plain_len {
        let have = len.saturating_sub(header);
        if have != count {
            return Err(invalid(path, size_mismatch(&dims, count, have)));
        }
    }
    // Never more than the declared size + 1 (to detect trailing bytes), whatever the stream holds.
    // A plain file's length was checked above; a stream's buffer grows only as data really arrives.
    let capacity = if plain_len.is_some() {
        count
    } else {
        count.min(1 << 20)
    };
    let mut data = Vec::with_capacity(capacity as usize);
    r.take(count + 1).read_to_end(&mut data).map_err(|e| {
        DataError::io(
            path,
            "read failed (for a .gz: truncated or corrupt gzip stream?)",
            e,
        )
    })?;
    if data.len() as u64 != count {
        return Err(invalid(
            path,
            size_mismatch(&dims, count, data.len() as u64),
        ));
    }
    Ok(IdxArray { dims, data })
}

fn check_magic(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.len() < 4 {
        return Err(format!("header: only {} bytes", bytes.len()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "magic: first two bytes are {:#04x} {:#04x}, expected 0 0",
            bytes[0], bytes[1]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "element type: code {:#04x}, only 0x08 (unsigned byte) is supported",
            bytes[2]
        ));
    }
    if bytes[3] == 0 {
        return Err("dimension count: 0".into());
    }
    Ok(())
}

fn parse_dims(bytes: &[u8]) -> Vec<usize> {
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect()
}

/// Elements the dimensions declare, bounded by [`MAX_IDX_BYTES`].
fn declared_count(dims: &[usize]) -> std::result::Result<u64, String> {
    let count = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&c| c <= MAX_IDX_BYTES)
        .ok_or_else(|| {
            format!(
                "dimensions {dims:?} declare more than the limit of {MAX_IDX_BYTES} bytes of data"
            )
        })?;
    Ok(count)
}

/// `have`: the data bytes present; for a stream read through `take(count + 1)`, `count + 1` stands
/// for "more than declared".
fn size_mismatch(dims: &[usize], count: u64, have: u64) -> String {
    if have < count {
        format!("data: dimensions {dims:?} need {count} bytes, the file has {have} (truncated)")
    } else {
        format!("data: dimensions {dims:?} need {count} bytes, the file has more (trailing bytes)")
    }
}

/// Parses an IDX file already in memory (same checks and bounds as [`read_idx`]).
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    check_magic(bytes)?;
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(format!(
            "dimensions: header needs {header} bytes, file has {}",
            bytes.len()
        ));
    }
    let dims = parse_dims(&bytes[4..header]);
    let count = declared_count(&dims)?;
    let have = (bytes.len() - header) as u64;
    if have != count {
        return Err(size_mismatch(&dims, count, have));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let mut f = vec![0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        f.extend(1..=6u8);
        let a = parse_idx(&f).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, (1..=6).collect::<Vec<u8>>());
        assert!(parse_idx(&f[..f.len() - 1])
            .unwrap_err()
            .contains("truncated"));
        let mut bad = f.clone();
        bad[2] = 0x0b;
        assert!(parse_idx(&bad).unwrap_err().contains("element type"));
        bad = f.clone();
        bad[0] = 1;
        assert!(parse_idx(&bad).unwrap_err().contains("magic"));
    }
}
