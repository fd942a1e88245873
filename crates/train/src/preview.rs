//! Preview samples during training: a small DDIM sampler over the EMA weights.
//!
//! Deliberately minimal and self-contained (one function) so it can be swapped for `ddpm-sampler`
//! later; the full set of samplers, guidance kinds and output formats lives there.

use candle_core::{DType, Device, Tensor};
use ddpm_diffusion::steps::ddim::ddim_step;
use ddpm_diffusion::steps::guidance::cfg_combine_model_output;
use ddpm_diffusion::GaussianDiffusion;
use ddpm_rng::{Stream, StreamKey};
use ddpm_unet::{ForwardCtx, UNet};

/// What to draw.
#[derive(Debug, Clone)]
pub struct PreviewSpec {
    /// DDIM steps (respaced from the training process).
    pub steps: usize,
    pub eta: f64,
    /// Classifier-free guidance `w` (0 = conditional model only).
    pub guidance: f64,
    /// Images per class, or in total for an unconditional model.
    pub per_class: usize,
    pub seed: u64,
}

/// The respaced process for `steps` DDIM steps: improved-diffusion's `ddimN` spacing when it exists
/// for this T, else evenly spaced sections.
pub fn respaced(
    diffusion: &GaussianDiffusion,
    steps: usize,
) -> ddpm_diffusion::Result<GaussianDiffusion> {
    diffusion
        .respace(&format!("ddim{steps}"))
        .or_else(|_| diffusion.respace(&steps.to_string()))
}

/// Draws `per_class` images of every class (rows in class order) or `per_class` unconditional
/// images. Returns `[N, C, H, W]` in [-1, 1] (x0 clipped at every step) and the labels used.
pub fn sample_grid(
    model: &UNet,
    diffusion: &GaussianDiffusion,
    spec: &PreviewSpec,
    device: &Device,
) -> anyhow::Result<(Tensor, Vec<u32>)> {
    let cfg = model.config();
    let d = respaced(diffusion, spec.steps)?;
    let labels: Vec<u32> = match cfg.num_classes {
        Some(k) => (0..k as u32)
            .flat_map(|c| std::iter::repeat_n(c, spec.per_class))
            .collect(),
        None => Vec::new(),
    };
    let n = if labels.is_empty() {
        spec.per_class
    } else {
        labels.len()
    };
    let (c, h, w) = (cfg.in_channels, cfg.image_size, cfg.image_size);
    let per = c * h * w;
    let normal = |step: u64| -> candle_core::Result<Tensor> {
        let mut v = vec![0f32; n * per];
        for (i, ex) in v.chunks_mut(per).enumerate() {
            StreamKey::new(spec.seed, Stream::Sampler, step, i as u64).fill_normal(ex);
        }
        Tensor::from_vec(v, (n, c, h, w), device)
    };
    let mut x = normal(0)?;
    let y = (!labels.is_empty())
        .then(|| Tensor::new(labels.as_slice(), device))
        .transpose()?;
    let null = match (cfg.num_classes, spec.guidance > 0.0) {
        (Some(k), true) => Some(Tensor::full(k as u32, n, device)?),
        _ => None,
    };
    let ctx = ForwardCtx::eval();
    for k in (0..d.num_timesteps()).rev() {
        let t = vec![k; n];
        let tm = d.model_timestep_tensor(&t, DType::F32, device)?;
        let out = match (&y, &null) {
            (Some(y), Some(null)) => {
                // one forward on [cond; uncond]
                let xx = Tensor::cat(&[&x, &x], 0)?;
                let tt = Tensor::cat(&[&tm, &tm], 0)?;
                let yy = Tensor::cat(&[y, null], 0)?;
                let both = model.forward(&xx, &tt, Some(&yy), &ctx)?;
                cfg_combine_model_output(
                    &d,
                    &both.narrow(0, 0, n)?,
                    &both.narrow(0, n, n)?,
                    &x,
                    spec.guidance,
                )?
            }
            (y, _) => model.forward(&x, &tm, y.as_ref(), &ctx)?,
        };
        let noise = if spec.eta > 0.0 {
            Some(normal(k as u64 + 1)?)
        } else {
            None
        };
        x = ddim_step(&d, &out, &x, &t, true, spec.eta, noise.as_ref())?.x_prev;
    }
    Ok((x.clamp(-1f32, 1f32)?, labels))
}
