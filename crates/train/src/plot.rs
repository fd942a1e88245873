//! PNG output: sample grids and the loss curve, drawn into plain RGB buffers.
//!
//! A plotting library would be a large dependency for two pictures; a line, axes and a few digits
//! are enough to see whether training is going well.

use std::io;
use std::path::Path;

/// An RGB8 canvas.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, bg: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&bg);
        }
        Self {
            width,
            height,
            data,
        }
    }

    pub fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let o = (y as usize * self.width + x as usize) * 3;
            self.data[o..o + 3].copy_from_slice(&c);
        }
    }

    /// Bresenham line.
    pub fn line(&mut self, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let dx = (x1 - x0).abs();
        let dy = -(y1 - y0).abs();
        let sx = if x0 < x1 { 1 } else { -1 };
        let sy = if y0 < y1 { 1 } else { -1 };
        let mut err = dx + dy;
        loop {
            self.put(x0, y0, c);
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    /// Text in a 3x5 pixel font scaled by `scale` (digits, `. - :` and a few lowercase letters).
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let glyph = glyph(ch);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.put(
                                    x + (k as i64 * 4 + col) * scale + dx,
                                    y + row as i64 * scale + dy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn write_png(&self, path: &Path) -> io::Result<()> {
        ddpm_io::write_png(path, self.width as u32, self.height as u32, 3, &self.data)
    }
}

fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0, 0, 0, 0, 0b010],
        '-' => [0, 0, 0b111, 0, 0],
        'e' => [0, 0b111, 0b111, 0b100, 0b111],
        'k' => [0b100, 0b101, 0b110, 0b101, 0b101],
        's' => [0, 0b111, 0b110, 0b011, 0b111],
        't' => [0b010, 0b111, 0b010, 0b010, 0b011],
        'p' => [0, 0b111, 0b101, 0b111, 0b100],
        'l' => [0b110, 0b010, 0b010, 0b010, 0b111],
        'o' => [0, 0b111, 0b101, 0b101, 0b111],
        ':' => [0, 0b010, 0, 0b010, 0],
        'a' => [0, 0b011, 0b101, 0b101, 0b011],
        'c' => [0, 0b111, 0b100, 0b100, 0b111],
        'd' => [0b001, 0b111, 0b101, 0b101, 0b111],
        'g' => [0, 0b111, 0b101, 0b111, 0b011],
        'i' => [0b010, 0, 0b010, 0b010, 0b010],
        'n' => [0, 0b110, 0b101, 0b101, 0b101],
        'r' => [0, 0b111, 0b100, 0b100, 0b100],
        _ => [0; 5],
    }
}

/// Compact tick label: `0.0123`, `1.5e-4`, `2500`.
pub(crate) fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if (1e-2..1e5).contains(&v.abs()) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        format!("{v:.1e}")
    }
}

/// Plots `points` (step, loss) with a log-scale y axis when all losses are positive; a smoothed
/// curve (centred moving average) is drawn over the raw one so the trend is visible through the
/// noise of per-step losses.
pub fn plot_loss_curve(path: &Path, points: &[(u64, f64)]) -> io::Result<()> {
    let (w, h) = (800usize, 480usize);
    let (ml, mr, mt, mb) = (90i64, 20i64, 20i64, 50i64);
    let mut cv = Canvas::new(w, h, [255, 255, 255]);
    let black = [0, 0, 0];
    let (x0, x1, y0, y1) = (ml, w as i64 - mr, h as i64 - mb, mt);
    cv.line((x0, y0), (x1, y0), black);
    cv.line((x0, y0), (x0, y1), black);
    let pts: Vec<(u64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    if pts.is_empty() {
        return cv.write_png(path);
    }
    let log = pts.iter().all(|p| p.1 > 0.0);
    let f = |v: f64| if log { v.log10() } else { v };
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in &pts {
        lo = lo.min(f(p.1));
        hi = hi.max(f(p.1));
    }
    if hi - lo < 1e-12 {
        lo -= 0.5;
        hi += 0.5;
    }
    let smin = pts.first().unwrap().0 as f64;
    let smax = (pts.last().unwrap().0 as f64).max(smin + 1.0);
    let px = |s: f64| x0 + ((s - smin) / (smax - smin) * (x1 - x0) as f64).round() as i64;
    let py = |v: f64| y0 - ((f(v) - lo) / (hi - lo) * (y0 - y1) as f64).round() as i64;
    // y ticks: 5 evenly spaced in the (possibly log) axis
    for k in 0..=4 {
        let a = lo + (hi - lo) * k as f64 / 4.0;
        let v = if log { 10f64.powf(a) } else { a };
        let y = y0 - ((a - lo) / (hi - lo) * (y0 - y1) as f64).round() as i64;
        cv.line((x0 - 5, y), (x0, y), black);
        for x in (x0..x1).step_by(6) {
            cv.put(x, y, [220, 220, 220]);
        }
        let label = fmt_tick(v);
        cv.text(x0 - 8 - label.len() as i64 * 8, y - 5, &label, 2, black);
    }
    for k in 0..=4 {
        let s = smin + (smax - smin) * k as f64 / 4.0;
        let x = px(s);
        cv.line((x, y0), (x, y0 + 5), black);
        let label = fmt_tick(s.round());
        cv.text(x - label.len() as i64 * 4, y0 + 10, &label, 2, black);
    }
    cv.text(x1 - 40, y0 + 30, "step", 2, black);
    cv.text(x0 + 8, y1 + 4, "loss", 2, black);
    let mut prev: Option<(i64, i64)> = None;
    for p in &pts {
        let q = (px(p.0 as f64), py(p.1));
        if let Some(a) = prev {
            cv.line(a, q, [160, 190, 230]);
        }
        prev = Some(q);
    }
    // Centred moving average (in the plotted space) over ~4% of the points: no lag, unlike an EMA.
    let half = pts.len() / 50;
    let vals: Vec<f64> = pts.iter().map(|p| f(p.1)).collect();
    let mut prev: Option<(i64, i64)> = None;
    for (i, p) in pts.iter().enumerate() {
        let (a, b) = (i.saturating_sub(half), (i + half + 1).min(vals.len()));
        let m = vals[a..b].iter().sum::<f64>() / (b - a) as f64;
        let sm = if log { 10f64.powf(m) } else { m };
        let q = (px(p.0 as f64), py(sm));
        if let Some(a) = prev {
            cv.line(a, q, [20, 40, 160]);
            cv.line((a.0, a.1 + 1), (q.0, q.1 + 1), [20, 40, 160]);
        }
        prev = Some(q);
    }
    cv.write_png(path)
}

/// Tiles NCHW images in [-1, 1] into a grid with `cols` columns (rows follow), each image
/// magnified `scale` times, separated by 2-pixel gutters. 1- and 3-channel images are supported.
pub fn image_grid(images: &[f32], shape: [usize; 4], cols: usize, scale: usize) -> Canvas {
    let [n, c, h, w] = shape;
    let cols = cols.max(1).min(n.max(1));
    let rows = n.div_ceil(cols);
    let pad = 2;
    let cw = cols * (w * scale + pad) + pad;
    let ch = rows * (h * scale + pad) + pad;
    let mut cv = Canvas::new(cw, ch, [40, 40, 40]);
    for i in 0..n {
        let (gr, gc) = (i / cols, i % cols);
        let ox = pad + gc * (w * scale + pad);
        let oy = pad + gr * (h * scale + pad);
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| {
                    let v = images[((i * c + ch) * h + y) * w + x];
                    ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
                };
                let rgb = if c >= 3 {
                    [px(0), px(1), px(2)]
                } else {
                    [px(0); 3]
                };
                for dy in 0..scale {
                    for dx in 0..scale {
                        cv.put(
                            (ox + x * scale + dx) as i64,
                            (oy + y * scale + dy) as i64,
                            rgb,
                        );
                    }
                }
            }
        }
    }
    cv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn grid_places_pixels() {
        let dir = tempfile::tempdir().unwrap();
        // two 1x1 grey images: -1 (black) and 1 (white)
        let cv = image_grid(&[-1.0, 1.0], [2, 1, 1, 1], 2, 1);
        let p = dir.path().join("g.png");
        cv.write_png(&p).unwrap();
        let (w, h, data) = decode(&p);
        // 2 gutter pixels around and between the 1x1 images
        assert_eq!((w, h), (8, 5));
        let at = |x: usize, y: usize| &data[(y * 8 + x) * 3..(y * 8 + x) * 3 + 3];
        assert_eq!(at(2, 2), &[0, 0, 0]);
        assert_eq!(at(5, 2), &[255, 255, 255]);
        assert_eq!(at(3, 2), &[40, 40, 40]);
        assert_eq!(at(7, 2), &[40, 40, 40]);
        let cv = image_grid(&[-1.0, 1.0], [2, 1, 1, 1], 1, 1);
        assert_eq!((cv.width, cv.height), (5, 8));
    }

    #[test]
    fn loss_plot_draws_something() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let pts: Vec<(u64, f64)> = (0..200).map(|s| (s, 1.0 / (1.0 + s as f64))).collect();
        plot_loss_curve(&p, &pts).unwrap();
        let (w, h, data) = decode(&p);
        assert_eq!((w, h), (800, 480));
        let dark_blue = data.chunks(3).filter(|c| c == &[20, 40, 160]).count();
        assert!(dark_blue > 500, "{dark_blue}");
        plot_loss_curve(&dir.path().join("empty.png"), &[]).unwrap();
        plot_loss_curve(
            &dir.path().join("neg.png"),
            &[(0, -1.0), (1, 2.0), (2, f64::NAN)],
        )
        .unwrap();
    }
}
