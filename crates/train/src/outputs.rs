//! Pictures a run leaves behind: the EMA preview grid and the loss plot (rank 0).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use ddpm_diffusion::GaussianDiffusion;
use ddpm_sampler::{BatchSpec, Guidance, Sampler, SamplerKind, SamplerSettings, UNetDenoiser};

use crate::metrics::MetricsLog;
use crate::plot;
use crate::run::unet_from_tensors;
use ddpm_config::TrainConfig;

/// The loss plot and, for a diffusion run, the EMA preview grid (`ema` = rate and weights by
/// name). Returns (grid, plot) paths.
pub(crate) fn write_pictures(
    cfg: &TrainConfig,
    run_dir: &Path,
    diffusion: &GaussianDiffusion,
    device: &Device,
    step: u64,
    ema: Option<(f64, Vec<(String, Tensor)>)>,
    metrics: &MetricsLog,
) -> Result<(Option<PathBuf>, PathBuf)> {
    let plot_path = run_dir.join("loss.png");
    plot::plot_loss_curve(&plot_path, &metrics.loss_points()?)?;
    let Some((rate, tensors)) = ema else {
        return Ok((None, plot_path));
    };
    let _span = tracing::info_span!("preview", step).entered();
    let t0 = Instant::now();
    let p = &cfg.preview;
    let mcfg = cfg.model.as_ref().expect("diffusion task");
    let model = UNetDenoiser::new(unet_from_tensors(mcfg, tensors, device)?);
    let images = preview_samples(cfg, model, diffusion, device)?;
    let dims = images.dims4()?;
    let data: Vec<f32> = images.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    let cols = if mcfg.num_classes.is_some() {
        p.per_class
    } else {
        (dims.0 as f64).sqrt().ceil() as usize
    };
    let scale = (96 / mcfg.image_size).clamp(1, 4);
    let grid = plot::image_grid(&data, [dims.0, dims.1, dims.2, dims.3], cols, scale);
    let dir = run_dir.join("samples");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let step_path = dir.join(format!("step_{step:09}.png"));
    grid.write_png(&step_path)?;
    let latest = run_dir.join("samples.png");
    grid.write_png(&latest)?;
    tracing::info!(
        path = %latest.display(),
        secs = format!("{:.1}", t0.elapsed().as_secs_f64()),
        "preview samples (EMA {rate}, DDIM steps {}, rows = classes)",
        preview_steps(cfg)
    );
    Ok((Some(latest), plot_path))
}

/// The preview's DDIM step spec: `preview.steps`, or a distilled student's own grid.
fn preview_steps(cfg: &TrainConfig) -> String {
    cfg.distilled()
        .map_or(cfg.preview.steps.to_string(), |d| d.student_spec())
}

/// The preview grid's images, `[N, C, H, W]` in [-1, 1]: DDIM over `preview.steps` respaced steps
/// (x0 clipped), `preview.per_class` images of every class in class order (or in total for an
/// unconditional model), with classifier-free guidance `preview.guidance`.
fn preview_samples(
    cfg: &TrainConfig,
    model: UNetDenoiser,
    diffusion: &GaussianDiffusion,
    device: &Device,
) -> Result<Tensor> {
    let p = &cfg.preview;
    let m = model.unet.config().clone();
    let labels: Vec<u32> = match m.num_classes {
        Some(k) => (0..k as u32)
            .flat_map(|c| std::iter::repeat_n(c, p.per_class))
            .collect(),
        None => Vec::new(),
    };
    let n = if labels.is_empty() {
        p.per_class
    } else {
        labels.len()
    };
    // A distilled student is previewed as it is meant to be sampled (its grid, no clipping, its
    // guidance already folded in).
    let distilled = cfg.distilled();
    let mut settings = SamplerSettings::new(SamplerKind::Ddim).steps(preview_steps(cfg));
    settings.eta = p.eta;
    settings.clip_denoised = distilled.is_none();
    let sampler = Sampler::new(diffusion.clone(), settings)?;
    let guidance = Guidance {
        cfg_scale: (p.guidance > 0.0 && m.num_classes.is_some() && distilled.is_none())
            .then_some(p.guidance),
        null_label: m.num_classes.map(|k| k as u32),
        classifier: None,
    };
    let batch = BatchSpec {
        shape: [n, m.in_channels, m.image_size, m.image_size],
        first_index: 0,
        seed: cfg.seed,
        labels: (!labels.is_empty()).then_some(labels.as_slice()),
        device: device.clone(),
        dtype: DType::F32,
        x_init: None,
    };
    Ok(sampler
        .sample(&model, &guidance, &batch)?
        .clamp(-1f32, 1f32)?)
}
