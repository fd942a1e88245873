//! uint8 HWC images -> f32 CHW in [-1, 1], the model's input convention.

/// `x / 127.5 - 1` for every byte value, computed once so the hot loop is a table lookup and every
/// path (loader, tests, bench) produces identical bits.
pub fn lut() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (x, v) in t.iter_mut().enumerate() {
        *v = x as f32 / 127.5 - 1.0;
    }
    t
}

/// Decodes one HWC image into `out` (length C*H*W, CHW order), mirrored left-right when `flip`.
pub fn decode_into(
    img: &[u8],
    h: usize,
    w: usize,
    c: usize,
    flip: bool,
    lut: &[f32; 256],
    out: &mut [f32],
) {
    debug_assert_eq!(img.len(), h * w * c);
    debug_assert_eq!(out.len(), h * w * c);
    let plane = h * w;
    if c == 1 {
        for y in 0..h {
            let src = &img[y * w..(y + 1) * w];
            let dst = &mut out[y * w..(y + 1) * w];
            if flip {
                for (d, &s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = lut[s as usize];
                }
            } else {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = lut[s as usize];
                }
            }
        }
        return;
    }
    for y in 0..h {
        for x in 0..w {
            let sx = if flip { w - 1 - x } else { x };
            let src = &img[(y * w + sx) * c..(y * w + sx + 1) * c];
            for (ch, &s) in src.iter().enumerate() {
                out[ch * plane + y * w + x] = lut[s as usize];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_rgb_and_flips() {
        // 1x2 RGB: pixel0 = (0, 255, 51), pixel1 = (102, 153, 204)
        let img = [0u8, 255, 51, 102, 153, 204];
        let t = lut();
        let mut out = [0f32; 6];
        decode_into(&img, 1, 2, 3, false, &t, &mut out);
        assert_eq!(
            out,
            [
                -1.0,
                102.0 / 127.5 - 1.0,
                1.0,
                153.0 / 127.5 - 1.0,
                51.0 / 127.5 - 1.0,
                204.0 / 127.5 - 1.0
            ]
        );
        decode_into(&img, 1, 2, 3, true, &t, &mut out);
        assert_eq!(
            out,
            [
                102.0 / 127.5 - 1.0,
                -1.0,
                153.0 / 127.5 - 1.0,
                1.0,
                204.0 / 127.5 - 1.0,
                51.0 / 127.5 - 1.0
            ]
        );
        let grey = [0u8, 255, 10, 20];
        let mut g = [0f32; 4];
        decode_into(&grey, 2, 2, 1, true, &t, &mut g);
        assert_eq!(g, [1.0, -1.0, t[20], t[10]]);
    }
}
