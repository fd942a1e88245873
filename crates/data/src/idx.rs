//! Reader for the IDX files of MNIST and Fashion-MNIST (plain or gzip-compressed).
//!
//! IDX layout: two zero bytes, an element-type code (0x08 = unsigned byte), the number of dimensions,
//! then each dimension as a big-endian u32, then the elements in row-major order. Only unsigned-byte
//! files exist for these datasets, so that is the only element type accepted.

use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a whole IDX file; gzip is detected from the content, not the file name.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::file(path, "no such file"),
        _ => DataError::io(path, "cannot read", e),
    })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 2);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| {
                DataError::io(
                    path,
                    "gzip decompression failed (truncated or corrupt .gz?)",
                    e,
                )
            })?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|what| DataError::file(path, format!("not a valid IDX file: {what}")))
}

pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
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
    let ndim = bytes[3] as usize;
    if ndim == 0 {
        return Err("dimension count: 0".into());
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(format!(
            "dimensions: header needs {header} bytes, file has {}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    let have = bytes.len() - header;
    if have != count {
        return Err(format!(
            "data: dimensions {dims:?} need {count} bytes, the file has {have} ({})",
            if have < count {
                "truncated"
            } else {
                "trailing bytes"
            }
        ));
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
