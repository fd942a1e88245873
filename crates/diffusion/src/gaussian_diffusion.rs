//! The Gaussian diffusion process (improved-diffusion `gaussian_diffusion.py` + `respace.py`):
//! forward process, posterior, what the model predicts, training losses and variational-bound terms.
//!
//! Every tensor method works in the dtype and on the device of its inputs (f64 for the reference tests,
//! f32 for training, any candle device). Timesteps are per-sample host indices `t: &[usize]` into this
//! diffusion's own (possibly respaced) tables; coefficients are gathered on the host in f64.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};
use crate::losses::{discretized_gaussian_log_likelihood, normal_kl, normal_kl_standard};
use crate::respace::{respaced_betas, space_timesteps};
use crate::schedule::NoiseSchedule;
use crate::snr::min_snr_weight;
use crate::tensor::{check_batch, extract, gather, mean_flat, per_sample, same_shape};

/// What the network's (first C output channels) predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelMeanType {
    /// The noise eps (Ho et al.).
    #[serde(alias = "eps")]
    Epsilon,
    /// The velocity `v = sqrt(ac) eps - sqrt(1 - ac) x0` (Salimans & Ho 2022).
    V,
    /// The clean image x0.
    #[serde(alias = "x0", alias = "sample")]
    StartX,
}

/// How the reverse-process variance is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelVarType {
    /// The true posterior variance (beta tilde), log clipped at index 0.
    FixedSmall,
    /// beta_t (with index 0 replaced by the posterior variance at 1), better for likelihoods.
    FixedLarge,
    /// Learned interpolation in log space between beta tilde and beta (Nichol & Dhariwal); the network
    /// outputs 2C channels, the second C in [-1, 1].
    LearnedRange,
    /// The network outputs the log-variance directly in its second C channels.
    Learned,
}

impl ModelVarType {
    /// Whether the network produces the variance (and therefore 2C output channels).
    pub fn is_learned(self) -> bool {
        matches!(self, ModelVarType::LearnedRange | ModelVarType::Learned)
    }

    /// Output channels the network must have for `channels` image channels.
    pub fn output_channels(self, channels: usize) -> usize {
        if self.is_learned() {
            2 * channels
        } else {
            channels
        }
    }
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// MSE of the prediction (L_simple); with a learned variance the vb term is added unscaled.
    Mse,
    /// MSE plus the vb term scaled by T/1000: L_hybrid with a learned variance.
    RescaledMse,
    /// The variational bound term alone.
    Kl,
    /// The variational bound term times T (an estimate of the full bound).
    RescaledKl,
}

/// The output of [`GaussianDiffusion::p_mean_variance`].
///
/// `variance` / `log_variance` are `[B, 1, .., 1]` for fixed variances and full-shape for learned ones;
/// both broadcast against x. `eps` is re-derived from the (possibly clipped) `pred_xstart`, as
/// improved-diffusion's DDIM does.
#[derive(Debug, Clone)]
pub struct PMeanVariance {
    pub mean: Tensor,
    pub variance: Tensor,
    pub log_variance: Tensor,
    pub pred_xstart: Tensor,
    pub eps: Tensor,
}

/// Per-sample `[B]` training losses. `loss` is what to average and differentiate.
#[derive(Debug, Clone)]
pub struct TrainingLosses {
    pub loss: Tensor,
    /// Unweighted MSE between the target and the mean prediction (a diagnostic when the loss is KL).
    pub mse: Tensor,
    /// The (rescaled as configured) variational-bound term, when the loss has one.
    pub vb: Option<Tensor>,
}

/// Every intermediate of improved-diffusion's `_vb_terms_bpd`, so each can be checked and logged.
#[derive(Debug, Clone)]
pub struct VbTerms {
    pub true_mean: Tensor,
    /// `[B, 1, .., 1]`.
    pub true_log_variance_clipped: Tensor,
    pub model_mean: Tensor,
    pub model_log_variance: Tensor,
    pub pred_xstart: Tensor,
    /// `[B]` KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dimension.
    pub kl_bpd: Tensor,
    /// `[B]` -log p(x_0|x_1) under the discretized decoder, in bits per dimension.
    pub decoder_nll_bpd: Tensor,
    /// `[B]` the decoder NLL where t == 0, else the KL: the bound term L_t of each sample.
    pub output: Tensor,
}

/// One timestep's contribution to the bits/dim evaluation (improved-diffusion `calc_bpd_loop` body).
#[derive(Debug, Clone)]
pub struct BpdTerm {
    /// `[B]` L_{t} term in bits per dimension.
    pub vb: Tensor,
    /// `[B]` mean squared error of the predicted x0.
    pub xstart_mse: Tensor,
    /// `[B]` mean squared error of the implied eps against the true noise.
    pub mse: Tensor,
}

/// A (possibly respaced) Gaussian diffusion process.
#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    pub schedule: NoiseSchedule,
    pub mean_type: ModelMeanType,
    pub var_type: ModelVarType,
    pub loss_type: LossType,
    /// `timestep_map[k]` is the original training timestep of this process's step k; the model is called
    /// with it (identity unless respaced).
    pub timestep_map: Vec<usize>,
    /// Number of timesteps of the process the model was trained on.
    pub original_num_timesteps: usize,
    /// Feed the model `t * 1000 / original_num_timesteps` instead of `t` (improved-diffusion option).
    pub rescale_timesteps: bool,
    /// Min-SNR-gamma weighting of the MSE term (Hang et al. 2023), if set.
    pub min_snr_gamma: Option<f64>,
}

const LN_2: f64 = std::f64::consts::LN_2;

impl GaussianDiffusion {
    /// A non-respaced process.
    pub fn new(
        schedule: NoiseSchedule,
        mean_type: ModelMeanType,
        var_type: ModelVarType,
        loss_type: LossType,
    ) -> Self {
        let n = schedule.num_timesteps();
        Self {
            schedule,
            mean_type,
            var_type,
            loss_type,
            timestep_map: (0..n).collect(),
            original_num_timesteps: n,
            rescale_timesteps: false,
            min_snr_gamma: None,
        }
    }

    /// A process on the sorted subset `use_timesteps` of this process's steps (improved-diffusion
    /// `SpacedDiffusion`). Respacing a respaced process composes the maps.
    pub fn respaced(&self, use_timesteps: &[usize]) -> Result<Self> {
        let betas = respaced_betas(&self.schedule, use_timesteps)?;
        let schedule = NoiseSchedule::from_betas(betas)?;
        Ok(Self {
            schedule,
            timestep_map: use_timesteps
                .iter()
                .map(|&t| self.timestep_map[t])
                .collect(),
            ..self.clone()
        })
    }

    /// [`Self::respaced`] with the steps chosen by a `section_counts` string ("ddim50", "250", "10,20").
    pub fn respace(&self, section_counts: &str) -> Result<Self> {
        self.respaced(&space_timesteps(self.num_timesteps(), section_counts)?)
    }

    pub fn with_rescale_timesteps(mut self, rescale: bool) -> Self {
        self.rescale_timesteps = rescale;
        self
    }

    pub fn with_min_snr_gamma(mut self, gamma: Option<f64>) -> Result<Self> {
        if let Some(g) = gamma {
            if !(g.is_finite() && g > 0.0) {
                return Err(DiffusionError::InvalidUse(format!(
                    "min_snr_gamma must be a positive number, got {g}"
                )));
            }
        }
        self.min_snr_gamma = gamma;
        Ok(self)
    }

    pub fn num_timesteps(&self) -> usize {
        self.schedule.num_timesteps()
    }

    /// The timestep values the model is called with for this process's steps `t`.
    pub fn model_timesteps(&self, t: &[usize]) -> Result<Vec<f64>> {
        let scale = if self.rescale_timesteps {
            1000.0 / self.original_num_timesteps as f64
        } else {
            1.0
        };
        t.iter()
            .map(|&ti| {
                self.timestep_map.get(ti).map(|&o| o as f64 * scale).ok_or(
                    DiffusionError::TimestepOutOfRange {
                        t: ti,
                        num_timesteps: self.num_timesteps(),
                    },
                )
            })
            .collect()
    }

    /// [`Self::model_timesteps`] as a `[B]` tensor, ready for the U-Net's timestep embedding.
    pub fn model_timestep_tensor(
        &self,
        t: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let v = self.model_timesteps(t)?;
        crate::tensor::host_tensor(&v, vec![v.len()], dtype, device)
    }

    fn coef(&self, table: &[f64], t: &[usize], like: &Tensor) -> Result<Tensor> {
        check_batch(t, like, "a tensor")?;
        extract(table, t, like)
    }

    /// Splits the network output into the mean prediction and, for learned variances, the variance values.
    pub fn split_model_output(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let c = x_t.dim(1)?;
        let want = self.var_type.output_channels(c);
        let mut expect = x_t.dims().to_vec();
        expect[1] = want;
        if model_output.dims() != expect.as_slice() {
            return Err(DiffusionError::Shape(format!(
                "model output has shape {:?}, expected {:?} for {:?} variance",
                model_output.dims(),
                expect,
                self.var_type
            )));
        }
        if self.var_type.is_learned() {
            Ok((
                model_output.narrow(1, 0, c)?,
                Some(model_output.narrow(1, c, c)?),
            ))
        } else {
            Ok((model_output.clone(), None))
        }
    }

    // ---- forward process -------------------------------------------------------------------------

    /// Mean, variance and log-variance of q(x_t | x_0); the variances are `[B, 1, .., 1]`.
    pub fn q_mean_variance(&self, x0: &Tensor, t: &[usize]) -> Result<(Tensor, Tensor, Tensor)> {
        let s = &self.schedule;
        let mean = self
            .coef(&s.sqrt_alphas_cumprod, t, x0)?
            .broadcast_mul(x0)?;
        let one_minus: Vec<f64> = gather(&s.alphas_cumprod, t)?
            .iter()
            .map(|a| 1.0 - a)
            .collect();
        let var = per_sample(&one_minus, x0)?;
        let log_var = self.coef(&s.log_one_minus_alphas_cumprod, t, x0)?;
        Ok((mean, var, log_var))
    }

    /// x_t = sqrt(ac) x0 + sqrt(1 - ac) noise.
    pub fn q_sample(&self, x0: &Tensor, t: &[usize], noise: &Tensor) -> Result<Tensor> {
        same_shape(x0, "x0", noise, "noise")?;
        let s = &self.schedule;
        let a = self.coef(&s.sqrt_alphas_cumprod, t, x0)?;
        let b = self.coef(&s.sqrt_one_minus_alphas_cumprod, t, x0)?;
        Ok(a.broadcast_mul(x0)?.add(&b.broadcast_mul(noise)?)?)
    }

    /// Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0); variances are
    /// `[B, 1, .., 1]`.
    pub fn q_posterior_mean_variance(
        &self,
        x0: &Tensor,
        x_t: &Tensor,
        t: &[usize],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        same_shape(x0, "x0", x_t, "x_t")?;
        let s = &self.schedule;
        let c1 = self.coef(&s.posterior_mean_coef1, t, x0)?;
        let c2 = self.coef(&s.posterior_mean_coef2, t, x0)?;
        let mean = c1.broadcast_mul(x0)?.add(&c2.broadcast_mul(x_t)?)?;
        let var = self.coef(&s.posterior_variance, t, x0)?;
        let log_var = self.coef(&s.posterior_log_variance_clipped, t, x0)?;
        Ok((mean, var, log_var))
    }

    /// The posterior mean alone: `coef1[t] x0 + coef2[t] x_t`.
    pub fn q_posterior_mean(&self, x0: &Tensor, x_t: &Tensor, t: &[usize]) -> Result<Tensor> {
        Ok(self.q_posterior_mean_variance(x0, x_t, t)?.0)
    }

    // ---- conversions between eps, x0 and v -----------------------------------------------------------

    /// x0 = sqrt(1/ac) x_t - sqrt(1/ac - 1) eps.
    pub fn predict_xstart_from_eps(
        &self,
        x_t: &Tensor,
        t: &[usize],
        eps: &Tensor,
    ) -> Result<Tensor> {
        same_shape(x_t, "x_t", eps, "eps")?;
        let s = &self.schedule;
        let a = self.coef(&s.sqrt_recip_alphas_cumprod, t, x_t)?;
        let b = self.coef(&s.sqrt_recipm1_alphas_cumprod, t, x_t)?;
        Ok(a.broadcast_mul(x_t)?.sub(&b.broadcast_mul(eps)?)?)
    }

    /// eps = (sqrt(1/ac) x_t - x0) / sqrt(1/ac - 1).
    pub fn predict_eps_from_xstart(
        &self,
        x_t: &Tensor,
        t: &[usize],
        x0: &Tensor,
    ) -> Result<Tensor> {
        same_shape(x_t, "x_t", x0, "x0")?;
        let s = &self.schedule;
        let a = self.coef(&s.sqrt_recip_alphas_cumprod, t, x_t)?;
        let b = self.coef(&s.sqrt_recipm1_alphas_cumprod, t, x_t)?;
        Ok(a.broadcast_mul(x_t)?.sub(x0)?.broadcast_div(&b)?)
    }

    /// v = sqrt(ac) eps - sqrt(1 - ac) x0 (the v-prediction target).
    pub fn v_target(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        same_shape(x0, "x0", noise, "noise")?;
        let s = &self.schedule;
        let a = self.coef(&s.sqrt_alphas_cumprod, t, x0)?;
        let b = self.coef(&s.sqrt_one_minus_alphas_cumprod, t, x0)?;
        Ok(a.broadcast_mul(noise)?.sub(&b.broadcast_mul(x0)?)?)
    }

    /// x0 = sqrt(ac) x_t - sqrt(1 - ac) v.
    pub fn predict_xstart_from_v(&self, x_t: &Tensor, t: &[usize], v: &Tensor) -> Result<Tensor> {
        same_shape(x_t, "x_t", v, "v")?;
        let s = &self.schedule;
        let a = self.coef(&s.sqrt_alphas_cumprod, t, x_t)?;
        let b = self.coef(&s.sqrt_one_minus_alphas_cumprod, t, x_t)?;
        Ok(a.broadcast_mul(x_t)?.sub(&b.broadcast_mul(v)?)?)
    }

    /// eps = sqrt(ac) v + sqrt(1 - ac) x_t.
    pub fn predict_eps_from_v(&self, x_t: &Tensor, t: &[usize], v: &Tensor) -> Result<Tensor> {
        same_shape(x_t, "x_t", v, "v")?;
        let s = &self.schedule;
        let a = self.coef(&s.sqrt_alphas_cumprod, t, x_t)?;
        let b = self.coef(&s.sqrt_one_minus_alphas_cumprod, t, x_t)?;
        Ok(a.broadcast_mul(v)?.add(&b.broadcast_mul(x_t)?)?)
    }

    /// x0 implied by a mean prediction of this process's `mean_type`.
    pub fn predict_xstart(
        &self,
        mean_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
    ) -> Result<Tensor> {
        match self.mean_type {
            ModelMeanType::Epsilon => self.predict_xstart_from_eps(x_t, t, mean_output),
            ModelMeanType::V => self.predict_xstart_from_v(x_t, t, mean_output),
            ModelMeanType::StartX => {
                same_shape(x_t, "x_t", mean_output, "model output")?;
                Ok(mean_output.clone())
            }
        }
    }

    /// What the network's mean channels are trained to output for `x_t = q_sample(x0, t, noise)`.
    pub fn training_target(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        same_shape(x0, "x0", noise, "noise")?;
        match self.mean_type {
            ModelMeanType::Epsilon => Ok(noise.clone()),
            ModelMeanType::StartX => Ok(x0.clone()),
            ModelMeanType::V => self.v_target(x0, noise, t),
        }
    }

    // ---- reverse process ---------------------------------------------------------------------------

    /// p(x_{t-1} | x_t): mean, variance and the predicted x0 from the network output.
    ///
    /// `clip_denoised` clamps the predicted x0 to [-1, 1] before the posterior mean (for sampling;
    /// training and likelihood terms use `false`).
    pub fn p_mean_variance(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        clip_denoised: bool,
    ) -> Result<PMeanVariance> {
        check_batch(t, x_t, "x_t")?;
        self.schedule.check_timesteps(t)?;
        let (mean_out, var_out) = self.split_model_output(model_output, x_t)?;
        let s = &self.schedule;
        let learned = || {
            var_out.clone().ok_or_else(|| {
                DiffusionError::Shape("learned variance needs the variance channels".into())
            })
        };
        let (variance, log_variance) = match self.var_type {
            ModelVarType::FixedSmall => (
                self.coef(&s.posterior_variance, t, x_t)?,
                self.coef(&s.posterior_log_variance_clipped, t, x_t)?,
            ),
            ModelVarType::FixedLarge => (
                self.coef(&s.fixed_large_variance, t, x_t)?,
                self.coef(&s.fixed_large_log_variance, t, x_t)?,
            ),
            ModelVarType::LearnedRange => {
                let v = learned()?;
                let min_log = self.coef(&s.posterior_log_variance_clipped, t, x_t)?;
                let log_betas: Vec<f64> = gather(&s.betas, t)?.iter().map(|b| b.ln()).collect();
                let max_log = per_sample(&log_betas, x_t)?;
                let frac = v.affine(0.5, 0.5)?;
                let one_minus = frac.affine(-1.0, 1.0)?;
                let lv = frac
                    .broadcast_mul(&max_log)?
                    .add(&one_minus.broadcast_mul(&min_log)?)?;
                (lv.exp()?, lv)
            }
            ModelVarType::Learned => {
                let v = learned()?;
                (v.exp()?, v)
            }
        };
        let mut pred_xstart = self.predict_xstart(&mean_out, x_t, t)?;
        if clip_denoised {
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)?;
        }
        let mean = self.q_posterior_mean(&pred_xstart, x_t, t)?;
        let eps = self.predict_eps_from_xstart(x_t, t, &pred_xstart)?;
        Ok(PMeanVariance {
            mean,
            variance,
            log_variance,
            pred_xstart,
            eps,
        })
    }

    // ---- variational bound ------------------------------------------------------------------------

    /// All terms of improved-diffusion's `_vb_terms_bpd` for a network output.
    pub fn vb_terms(
        &self,
        model_output: &Tensor,
        x0: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        clip_denoised: bool,
    ) -> Result<VbTerms> {
        let (true_mean, _, true_log_variance_clipped) =
            self.q_posterior_mean_variance(x0, x_t, t)?;
        let out = self.p_mean_variance(model_output, x_t, t, clip_denoised)?;
        let kl = normal_kl(
            &true_mean,
            &true_log_variance_clipped,
            &out.mean,
            &out.log_variance,
        )?;
        let kl_bpd = mean_flat(&kl.broadcast_as(x0.shape())?)?.affine(1.0 / LN_2, 0.0)?;
        let log_scales = out.log_variance.affine(0.5, 0.0)?;
        let ll = discretized_gaussian_log_likelihood(x0, &out.mean, &log_scales)?;
        let decoder_nll_bpd = mean_flat(&ll)?.affine(-1.0 / LN_2, 0.0)?;
        let is_first: Vec<u8> = t.iter().map(|&ti| u8::from(ti == 0)).collect();
        let mask = Tensor::from_vec(is_first, t.len(), x0.device())?;
        let output = mask.where_cond(&decoder_nll_bpd, &kl_bpd)?;
        Ok(VbTerms {
            true_mean,
            true_log_variance_clipped,
            model_mean: out.mean,
            model_log_variance: out.log_variance,
            pred_xstart: out.pred_xstart,
            kl_bpd,
            decoder_nll_bpd,
            output,
        })
    }

    /// `[B]` bound term L_t in bits/dim and the predicted x0 (improved-diffusion `_vb_terms_bpd`).
    pub fn vb_terms_bpd(
        &self,
        model_output: &Tensor,
        x0: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        clip_denoised: bool,
    ) -> Result<(Tensor, Tensor)> {
        let v = self.vb_terms(model_output, x0, x_t, t, clip_denoised)?;
        Ok((v.output, v.pred_xstart))
    }

    /// `[B]` prior term L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim. It does not depend on the model
    /// and is ~0 for a good schedule.
    pub fn prior_bpd(&self, x0: &Tensor) -> Result<Tensor> {
        let b = x0.dim(0)?;
        let t = vec![self.num_timesteps() - 1; b];
        let (mean, _, log_var) = self.q_mean_variance(x0, &t)?;
        let kl = normal_kl_standard(&mean, &log_var)?;
        Ok(mean_flat(&kl)?.affine(1.0 / LN_2, 0.0)?)
    }

    /// One step of improved-diffusion's `calc_bpd_loop`: the bound term at `t` for
    /// `x_t = q_sample(x0, t, noise)` plus the x0 and eps errors. An evaluator runs this for every
    /// t in `0..T` and adds [`Self::prior_bpd`]; [`crate::elbo::ElboAccumulator`] does the bookkeeping.
    pub fn calc_bpd_term(
        &self,
        model_output: &Tensor,
        x0: &Tensor,
        x_t: &Tensor,
        noise: &Tensor,
        t: &[usize],
        clip_denoised: bool,
    ) -> Result<BpdTerm> {
        let v = self.vb_terms(model_output, x0, x_t, t, clip_denoised)?;
        let xstart_mse = mean_flat(&v.pred_xstart.sub(x0)?.sqr()?)?;
        let eps = self.predict_eps_from_xstart(x_t, t, &v.pred_xstart)?;
        let mse = mean_flat(&eps.sub(noise)?.sqr()?)?;
        Ok(BpdTerm {
            vb: v.output,
            xstart_mse,
            mse,
        })
    }

    // ---- training ----------------------------------------------------------------------------------

    /// Per-sample Min-SNR-gamma weights for timesteps `t` and this process's mean type.
    pub fn min_snr_weights(&self, t: &[usize], gamma: f64) -> Result<Vec<f64>> {
        let snr: Vec<f64> = gather(&self.schedule.alphas_cumprod, t)?
            .iter()
            .map(|a| a / (1.0 - a))
            .collect();
        Ok(snr
            .iter()
            .map(|&s| min_snr_weight(s, gamma, self.mean_type))
            .collect())
    }

    /// Per-sample training losses (improved-diffusion `training_losses`) for a network output on
    /// `x_t = q_sample(x0, t, noise)`.
    ///
    /// With a learned variance, the vb term sees the mean channels detached, so it only trains the
    /// variance and L_simple keeps driving the mean (Nichol & Dhariwal, sec. 3.1).
    pub fn training_losses(
        &self,
        model_output: &Tensor,
        x0: &Tensor,
        x_t: &Tensor,
        noise: &Tensor,
        t: &[usize],
    ) -> Result<TrainingLosses> {
        check_batch(t, x0, "x0")?;
        self.schedule.check_timesteps(t)?;
        same_shape(x0, "x0", x_t, "x_t")?;
        let (mean_out, var_out) = self.split_model_output(model_output, x_t)?;
        let target = self.training_target(x0, noise, t)?;
        let mse = mean_flat(&target.sub(&mean_out)?.sqr()?)?;
        let n = self.num_timesteps() as f64;
        match self.loss_type {
            LossType::Kl | LossType::RescaledKl => {
                let vb = self.vb_terms(model_output, x0, x_t, t, false)?.output;
                let vb = if self.loss_type == LossType::RescaledKl {
                    vb.affine(n, 0.0)?
                } else {
                    vb
                };
                Ok(TrainingLosses {
                    loss: vb.clone(),
                    mse,
                    vb: Some(vb),
                })
            }
            LossType::Mse | LossType::RescaledMse => {
                let weighted = match self.min_snr_gamma {
                    Some(g) => mse.mul(&per_sample(&self.min_snr_weights(t, g)?, &mse)?)?,
                    None => mse.clone(),
                };
                let vb = match var_out {
                    Some(v) => {
                        let frozen = Tensor::cat(&[&mean_out.detach(), &v], 1)?;
                        let vb = self.vb_terms(&frozen, x0, x_t, t, false)?.output;
                        Some(if self.loss_type == LossType::RescaledMse {
                            vb.affine(self.vb_rescale_factor(), 0.0)?
                        } else {
                            vb
                        })
                    }
                    None => None,
                };
                let loss = match &vb {
                    Some(vb) => weighted.add(vb)?,
                    None => weighted,
                };
                Ok(TrainingLosses { loss, mse, vb })
            }
        }
    }

    /// The factor `T / 1000` that turns the per-timestep vb term into lambda * L_vlb with lambda = 0.001
    /// (L_vlb estimated as T * L_t) for [`LossType::RescaledMse`].
    pub fn vb_rescale_factor(&self) -> f64 {
        self.num_timesteps() as f64 / 1000.0
    }
}
