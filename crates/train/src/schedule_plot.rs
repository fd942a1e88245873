//! `schedule.png` of a continuous-time run: log-SNR (`-gamma`) against t in [0, 1], the run's
//! schedule drawn thick over the fixed linear and cosine schedules between the same endpoints.

use std::path::Path;

use anyhow::Result;
use candle_core::Tensor;
use ddpm_config::{ContinuousSchedule, ContinuousSpec};
use ddpm_diffusion::vdm::MonotoneGammaInit;

use crate::plot::{fmt_tick, Canvas};

const COLORS: [[u8; 3]; 3] = [[200, 30, 30], [120, 120, 120], [30, 90, 200]];

/// Writes the plot; `lookup` gives the learned schedule's parameters by checkpoint name.
pub fn write(
    path: &Path,
    spec: &ContinuousSpec,
    lookup: impl Fn(&str) -> Option<Tensor>,
) -> Result<()> {
    let params = match spec.schedule {
        ContinuousSchedule::Learned { .. } => Some(MonotoneGammaInit::from_named(lookup)?),
        ContinuousSchedule::Fixed(_) => None,
    };
    let mut curves = crate::continuous::schedule_curves(spec, params.as_ref());
    if params.is_none() {
        // Fixed schedule: its own curve is one of the references; name it first.
        let own = match spec.schedule {
            ContinuousSchedule::Fixed(ddpm_diffusion::vdm::FixedGamma::Cosine { .. }) => 1,
            _ => 0,
        };
        curves.swap(0, own);
    }
    draw(&curves).write_png(path)?;
    Ok(())
}

/// Line plot of `(label, points)` curves on linear axes; the first curve is drawn thick.
pub fn draw(curves: &[(String, Vec<(f64, f64)>)]) -> Canvas {
    let (w, h) = (800usize, 480usize);
    let (x0, x1, y0, y1) = (90i64, w as i64 - 20, h as i64 - 50, 20i64);
    let mut cv = Canvas::new(w, h, [255, 255, 255]);
    let black = [0, 0, 0];
    cv.line((x0, y0), (x1, y0), black);
    cv.line((x0, y0), (x0, y1), black);
    let ys = curves.iter().flat_map(|c| c.1.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let px = |t: f64| x0 + (t * (x1 - x0) as f64).round() as i64;
    let py = |v: f64| y0 - ((v - lo) / (hi - lo) * (y0 - y1) as f64).round() as i64;
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let label = fmt_tick((v * 10.0).round() / 10.0);
        cv.line((x0 - 5, py(v)), (x0, py(v)), black);
        cv.text(x0 - 8 - label.len() as i64 * 8, py(v) - 5, &label, 2, black);
        let t = k as f64 / 4.0;
        let label = fmt_tick(t);
        cv.line((px(t), y0), (px(t), y0 + 5), black);
        cv.text(px(t) - label.len() as i64 * 4, y0 + 10, &label, 2, black);
    }
    cv.text(x1 - 16, y0 + 30, "t", 2, black);
    cv.text(x0 + 8, y1 + 4, "log snr", 2, black);
    for (i, (label, pts)) in curves.iter().enumerate().rev() {
        let c = COLORS[i % COLORS.len()];
        let mut prev: Option<(i64, i64)> = None;
        for &(t, v) in pts {
            let q = (px(t), py(v));
            if let Some(a) = prev {
                cv.line(a, q, c);
                if i == 0 {
                    cv.line((a.0, a.1 + 1), (q.0, q.1 + 1), c);
                }
            }
            prev = Some(q);
        }
        cv.text(x1 - 150, y1 + 4 + 18 * i as i64, label, 2, c);
    }
    cv
}
