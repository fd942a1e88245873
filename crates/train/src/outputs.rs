//! Pictures a run leaves behind: the EMA preview grid and the loss plot (rank 0).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::metrics::MetricsLog;
use crate::plot;
use crate::preview::{sample_grid, PreviewSpec};
use crate::run::{unet_from_tensors, Net, Run, State};
use crate::trainer::TrainOutcome;

impl Run<'_> {
    /// EMA preview grid and loss plot (rank 0). Returns (grid, plot) paths.
    pub(crate) fn write_pictures(
        &self,
        st: &State,
        metrics: &MetricsLog,
    ) -> Result<(Option<PathBuf>, PathBuf)> {
        let plot_path = self.run_dir.join("loss.png");
        plot::plot_loss_curve(&plot_path, &metrics.loss_points()?)?;
        let Net::Diffusion(_) = &self.net else {
            return Ok((None, plot_path));
        };
        let _span = tracing::info_span!("preview", step = st.step).entered();
        let t0 = Instant::now();
        let p = &self.cfg.preview;
        let rate = p.ema_rate.unwrap_or(self.cfg.ema.rates[0]);
        let ema = st
            .emas
            .iter()
            .find(|e| e.rate == rate)
            .expect("validated rate");
        let mcfg = self.cfg.model.as_ref().expect("diffusion task");
        let tensors = self
            .names
            .iter()
            .cloned()
            .zip(ema.params.iter().cloned())
            .collect();
        let model = unet_from_tensors(mcfg, tensors, &self.device)?;
        let spec = PreviewSpec {
            steps: p.steps,
            eta: p.eta,
            guidance: p.guidance,
            per_class: p.per_class,
            seed: self.cfg.seed,
        };
        let (images, _) = sample_grid(&model, &self.diffusion, &spec, &self.device)?;
        let dims = images.dims4()?;
        let data: Vec<f32> = images.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let cols = if mcfg.num_classes.is_some() {
            p.per_class
        } else {
            (dims.0 as f64).sqrt().ceil() as usize
        };
        let scale = (96 / mcfg.image_size).clamp(1, 4);
        let grid = plot::image_grid(&data, [dims.0, dims.1, dims.2, dims.3], cols, scale);
        let dir = self.run_dir.join("samples");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let step_path = dir.join(format!("step_{:09}.png", st.step));
        grid.write_png(&step_path)?;
        let latest = self.run_dir.join("samples.png");
        grid.write_png(&latest)?;
        tracing::info!(
            path = %latest.display(),
            secs = format!("{:.1}", t0.elapsed().as_secs_f64()),
            "preview samples (EMA {rate}, DDIM {} steps, rows = classes)",
            p.steps
        );
        Ok((Some(latest), plot_path))
    }
}

/// Previews are a by-product: a failure is logged, not allowed to end a long run.
pub(crate) fn pictures(run: &Run, st: &State, metrics: &MetricsLog, outcome: &mut TrainOutcome) {
    match run.write_pictures(st, metrics) {
        Ok((grid, plot)) => {
            outcome.sample_grid = grid;
            outcome.loss_plot = Some(plot);
        }
        Err(e) => tracing::warn!(step = st.step, "preview/loss plot failed: {e:#}"),
    }
}
