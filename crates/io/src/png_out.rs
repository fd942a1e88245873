//! 8-bit PNG encoding (grey or RGB) and atomic PNG files.

use std::io;
use std::path::Path;

/// Encodes `data` (row-major, `channels` = 1 grey or 3 RGB, 8 bits each) as PNG.
pub fn encode_png(width: u32, height: u32, channels: usize, data: &[u8]) -> io::Result<Vec<u8>> {
    let color = match channels {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        c => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("PNG: {c} channels (1 or 3 supported)"),
            ))
        }
    };
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(io::Error::other)?;
        w.write_image_data(data).map_err(io::Error::other)?;
    }
    Ok(out)
}

/// Encodes and writes a PNG atomically; errors name the file.
pub fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    channels: usize,
    data: &[u8],
) -> io::Result<()> {
    let bytes = encode_png(width, height, channels, data)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    crate::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_and_rgb_encode_and_bad_sizes_fail() {
        let grey = encode_png(2, 1, 1, &[0, 255]).unwrap();
        assert_eq!(&grey[1..4], b"PNG");
        assert!(encode_png(1, 1, 3, &[1, 2, 3]).is_ok());
        assert!(encode_png(2, 2, 1, &[0; 3]).is_err());
        let e = encode_png(1, 1, 2, &[0, 0]).unwrap_err();
        assert!(e.to_string().contains("2 channels"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        write_png(&p, 2, 1, 1, &[0, 255]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), grey);
    }
}
