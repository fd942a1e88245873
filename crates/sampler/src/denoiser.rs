//! The model as the samplers see it: a function from `(x_t, t, y)` to the raw network output.
//!
//! Samplers take the model through these traits instead of a concrete U-Net so every loop can be
//! tested with a closed-form fake model, and so guidance can wrap any model.

use candle_core::{DType, Tensor};
use ddpm_unet::{EncoderUNet, ForwardCtx, UNet};

use crate::error::{Result, SamplerError};

/// A denoising network.
pub trait Denoiser {
    /// The raw network output `[B, C or 2C, H, W]` (mean channels as the model's prediction type,
    /// then the variance channels when the variance is learned) for `x_t` at the *original* training
    /// timesteps `t_model` (a respaced sampler passes its `timestep_map` values) and labels `y`
    /// (`[B]` u32, `num_classes` = the null label) for a class-conditional model.
    fn predict(&self, x_t: &Tensor, t_model: &[usize], y: Option<&Tensor>) -> Result<Tensor>;
}

impl<F> Denoiser for F
where
    F: Fn(&Tensor, &[usize], Option<&Tensor>) -> Result<Tensor>,
{
    fn predict(&self, x_t: &Tensor, t_model: &[usize], y: Option<&Tensor>) -> Result<Tensor> {
        self(x_t, t_model, y)
    }
}

/// A noise-aware classifier `p(y | x_t, t)` for classifier guidance.
pub trait NoisyClassifier {
    /// Logits `[B, K]` for `x_t` at original timesteps `t_model`. Must be differentiable with respect
    /// to `x_t` (candle autograd): guidance takes the gradient of `log p(y | x_t)`.
    fn logits(&self, x_t: &Tensor, t_model: &[usize]) -> Result<Tensor>;
}

impl<F> NoisyClassifier for F
where
    F: Fn(&Tensor, &[usize]) -> Result<Tensor>,
{
    fn logits(&self, x_t: &Tensor, t_model: &[usize]) -> Result<Tensor> {
        self(x_t, t_model)
    }
}

/// `t * scale` as the `[B]` float timestep tensor the networks embed.
fn timestep_tensor(t_model: &[usize], scale: f64, dtype: DType, x: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = t_model.iter().map(|&t| (t as f64 * scale) as f32).collect();
    Ok(Tensor::from_vec(v, t_model.len(), x.device())?.to_dtype(dtype)?)
}

/// The U-Net in evaluation mode (no dropout).
pub struct UNetDenoiser {
    pub unet: UNet,
    /// `1000 / T` when the model was trained with improved-diffusion's `rescale_timesteps`, else 1.
    pub timestep_scale: f64,
}

impl UNetDenoiser {
    pub fn new(unet: UNet) -> Self {
        Self {
            unet,
            timestep_scale: 1.0,
        }
    }
}

impl Denoiser for UNetDenoiser {
    /// An unconditional U-Net ignores `y` (labels are then only the targets of classifier guidance).
    fn predict(&self, x_t: &Tensor, t_model: &[usize], y: Option<&Tensor>) -> Result<Tensor> {
        let y = if self.unet.config().num_classes.is_some() {
            y
        } else {
            None
        };
        let dtype = self.unet.dtype();
        let t = timestep_tensor(t_model, self.timestep_scale, dtype, x_t)?;
        let out = self
            .unet
            .forward(&x_t.to_dtype(dtype)?, &t, y, &ForwardCtx::eval())?;
        Ok(out.to_dtype(x_t.dtype())?)
    }
}

/// guided-diffusion's noise-aware classifier in evaluation mode.
pub struct EncoderClassifier {
    pub net: EncoderUNet,
    pub timestep_scale: f64,
}

impl EncoderClassifier {
    pub fn new(net: EncoderUNet) -> Self {
        Self {
            net,
            timestep_scale: 1.0,
        }
    }
}

impl NoisyClassifier for EncoderClassifier {
    fn logits(&self, x_t: &Tensor, t_model: &[usize]) -> Result<Tensor> {
        let t = timestep_tensor(t_model, self.timestep_scale, DType::F32, x_t)?;
        let logits = self.net.forward(x_t, &t, &ForwardCtx::eval())?;
        let (b, _) = logits.dims2().map_err(|_| {
            SamplerError::Model(format!(
                "classifier returned shape {:?}, expected [B, K]",
                logits.dims()
            ))
        })?;
        if b != t_model.len() {
            return Err(SamplerError::Model(format!(
                "classifier returned {b} rows for a batch of {}",
                t_model.len()
            )));
        }
        Ok(logits)
    }
}
