//! Conditioning and guidance around a [`Denoiser`]: class labels, classifier-free guidance and the
//! classifier gradient for classifier guidance.
//!
//! Conventions (documented in the CLI too):
//! - Classifier-free guidance uses GLIDE's / Ho & Salimans' `w`:
//!   `eps = (1 + w) eps_cond - w eps_uncond`, so `w = 0` is the plain conditional model (diffusers'
//!   `guidance_scale` is `1 + w`). Both halves come from one forward pass on the batch
//!   `[x, x]` with labels `[y, null]`, where the null label is `num_classes`. Learned-variance
//!   channels are taken from the conditional half (ddpm-diffusion's `cfg_combine_model_output`).
//! - Classifier guidance takes `grad_x log p(y | x_t)` of a noise-aware classifier at the model's
//!   original timestep, multiplied by the scale; ancestral DDPM shifts the mean by
//!   `variance * scale * grad` (guided-diffusion `condition_mean`), every other sampler shifts eps by
//!   `-sqrt(1 - abar_t) * scale * grad` (`condition_score`). A scale of exactly 0 is the unguided
//!   sampler (the classifier is not evaluated).

use candle_core::{DType, Tensor, Var, D};
use ddpm_diffusion::steps::cfg_combine_model_output;
use ddpm_diffusion::GaussianDiffusion;

use crate::denoiser::{Denoiser, NoisyClassifier};
use crate::error::{Result, SamplerError};

/// Classifier guidance: the classifier and its scale `s`.
#[derive(Clone, Copy)]
pub struct ClassifierGuidance<'a> {
    pub classifier: &'a dyn NoisyClassifier,
    pub scale: f64,
}

/// Everything a sampler needs to evaluate the (possibly guided) model at one step.
#[derive(Clone, Copy, Default)]
pub struct Guidance<'a> {
    /// Classifier-free guidance weight `w` (see the module documentation). `None`: no CFG.
    pub cfg_scale: Option<f64>,
    /// The label the model was trained to read as "no label" (`num_classes`); needed for CFG.
    pub null_label: Option<u32>,
    pub classifier: Option<ClassifierGuidance<'a>>,
}

impl Guidance<'_> {
    pub fn none() -> Self {
        Self::default()
    }

    /// Checks the guidance settings against the batch's labels.
    pub fn validate(&self, labels: Option<&[u32]>) -> Result<()> {
        if let Some(w) = self.cfg_scale {
            if !w.is_finite() {
                return Err(SamplerError::Config(format!(
                    "classifier-free guidance scale {w} is not finite"
                )));
            }
            if labels.is_none() {
                return Err(SamplerError::Config(
                    "classifier-free guidance needs class labels (a class-conditional model)"
                        .into(),
                ));
            }
            let null = self.null_label.ok_or_else(|| {
                SamplerError::Config(
                    "classifier-free guidance needs the null label (num_classes)".into(),
                )
            })?;
            if let Some(y) = labels.and_then(|l| l.iter().find(|&&y| y >= null)) {
                return Err(SamplerError::Config(format!(
                    "label {y} is not a class (the model has {null} classes)"
                )));
            }
        }
        if let Some(c) = &self.classifier {
            if !c.scale.is_finite() {
                return Err(SamplerError::Config(format!(
                    "classifier scale {} is not finite",
                    c.scale
                )));
            }
            if labels.is_none() {
                return Err(SamplerError::Config(
                    "classifier guidance needs target class labels".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The model output at one step, with classifier-free guidance applied when configured.
///
/// `t_model` is the original timestep of every sample, `labels` the `[B]` class labels.
pub fn guided_model_output(
    model: &dyn Denoiser,
    diffusion: &GaussianDiffusion,
    guidance: &Guidance<'_>,
    x: &Tensor,
    t_model: &[usize],
    labels: Option<&Tensor>,
) -> Result<Tensor> {
    let Some(w) = guidance.cfg_scale else {
        return model.predict(x, t_model, labels);
    };
    let y = labels
        .ok_or_else(|| SamplerError::Config("classifier-free guidance needs labels".into()))?;
    let null = guidance.null_label.ok_or_else(|| {
        SamplerError::Config("classifier-free guidance needs the null label".into())
    })?;
    let b = x.dim(0)?;
    let x2 = Tensor::cat(&[x, x], 0)?;
    let t2: Vec<usize> = t_model.iter().chain(t_model).copied().collect();
    let null_y = Tensor::full(null, b, y.device())?.to_dtype(y.dtype())?;
    let y2 = Tensor::cat(&[y, &null_y], 0)?;
    let out = model.predict(&x2, &t2, Some(&y2))?;
    let cond = out.narrow(0, 0, b)?;
    let uncond = out.narrow(0, b, b)?;
    Ok(cfg_combine_model_output(diffusion, &cond, &uncond, x, w)?)
}

/// `log_softmax` along the last axis with a gradient: the max is detached (its gradient cancels),
/// and only element-wise ops and sums are used, all of which candle differentiates.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `grad_x sum_b log p(y_b | x_b, t_b)`: the classifier-guidance direction, before the scale.
/// Samples are independent, so the gradient of the sum is the per-sample gradient.
pub fn classifier_grad(
    classifier: &dyn NoisyClassifier,
    x: &Tensor,
    t_model: &[usize],
    labels: &Tensor,
) -> Result<Tensor> {
    let var = Var::from_tensor(&x.detach())?;
    let logits = classifier.logits(var.as_tensor(), t_model)?;
    let (b, k) = logits.dims2()?;
    if b != x.dim(0)? {
        return Err(SamplerError::Model(format!(
            "classifier returned {b} rows for a batch of {}",
            x.dim(0)?
        )));
    }
    let y = labels.to_dtype(DType::U32)?;
    let y_host: Vec<u32> = y.to_vec1()?;
    if let Some(bad) = y_host.iter().find(|&&v| v as usize >= k) {
        return Err(SamplerError::Config(format!(
            "label {bad} is not one of the classifier's {k} classes"
        )));
    }
    let logp = log_softmax(&logits)?;
    let selected = logp.gather(&y.reshape((b, 1))?, 1)?.sum_all()?;
    let grads = selected.backward()?;
    let g = grads.get(var.as_tensor()).ok_or_else(|| {
        SamplerError::Model("the classifier output does not depend on its input".into())
    })?;
    Ok(g.to_dtype(x.dtype())?)
}
