//! The sampling loops: DDPM (ancestral), DDIM, DPM-Solver++(2M), a Heun probability-flow ODE
//! sampler, the score-SDE samplers (`sde`, `pc`; the loop is in [`crate::sde`]) and EDM's stochastic
//! sampler, over any [`Denoiser`], with class labels, classifier-free and classifier guidance.
//!
//! # Timesteps
//! - `ddpm` and `ddim` run on a respaced process (improved-diffusion `SpacedDiffusion`). The step
//!   spec is an improved-diffusion `section_counts` string: `"ddim50"` (evenly strided), `"250"` or
//!   `"10,20,30"` (evenly spaced within equal sections). A plain number `N` means `"N"` for DDPM and
//!   `"ddimN"` for DDIM (falling back to `"N"` when no integer stride gives exactly N steps). No spec
//!   means all T steps for DDPM and 50 for DDIM.
//! - `dpm-solver` uses diffusers' "linspace" timesteps (`round_half_even(linspace(0, T-1, N+1))`,
//!   reversed, last dropped), the setting the reference vectors check; default N = 20.
//! - `heun` is Karras et al.'s deterministic 2nd-order Heun solver (EDM Algorithm 1) on the
//!   probability-flow ODE written in sigma space, `x_ve = x / sqrt(abar)`, `sigma = sqrt(1/abar - 1)`,
//!   where the ODE is `dx_ve/dsigma = eps(x, t(sigma))`. N noise levels follow EDM's rho = 7 spacing
//!   between sigma(T-1) and sigma(0), each snapped to the nearest training timestep (in log sigma) so
//!   the discrete-time model is only ever evaluated at timesteps it was trained on; then sigma = 0.
//!   Each interval costs two model evaluations except the last (an Euler step to sigma = 0), so
//!   N levels cost 2N - 1 evaluations. Default N = 18 (EDM's CIFAR-10 setting, 35 evaluations).
//!   As in EDM, the largest level is capped at sigma = 80 (the training timestep nearest to it): above
//!   that the sample is noise for all practical purposes (the cosine schedule ends near sigma = 2e4),
//!   and starting from `x_T` at a smaller sigma only drops the negligible `x0 / sigma` part.
//! - `sde` and `pc` run on a respaced chain chosen as for DDPM (default all T steps, Song et al.'s
//!   N = 1000 for DDPM models); `pc` costs `corrector_steps + 1` evaluations per step.
//! - `edm` is EDM Algorithm 2 on Heun's noise levels: level i is first raised to
//!   `sigma_i (1 + gamma_i)`, `gamma_i = min(S_churn / N, sqrt 2 - 1)` where
//!   `S_tmin <= sigma_i <= S_tmax`, snapped like the levels to a training timestep (never below level
//!   i's), by adding `sqrt(sigma_hat^2 - sigma_i^2) S_noise z`; then Heun's step from there. With
//!   S_churn = 0 it is exactly `heun`. Defaults: EDM's Table 5 settings for the ADM ImageNet-64
//!   model (S_churn 80, S_tmin 0.05, S_tmax 50, S_noise 1.003), the discrete VP model closest to ours.
//!
//! # Randomness
//! All noise is ddpm-rng `Stream::Sampler`, keyed by `(seed, step, global image index)`: `x_T` uses
//! step 0 and the j-th noise tensor drawn after it (j = 1, 2, ..., in sampling order) uses step j:
//! loop iteration `i` for DDPM / DDIM, level `i` (if churned) for EDM, and for `pc` the corrector
//! draws then the predictor draw of each step (see [`crate::sde`]). Element
//! `e` of image `g` is `StreamKey::new(seed, Stream::Sampler, step, g).normal(e)`, so an image depends
//! only on the seed, its global index and its label: not on the batch it was in, nor on the rank that
//! made it.

use candle_core::{DType, Device, Tensor};
use ddpm_diffusion::steps::{edm_churn, edm_euler, edm_heun, DpmSolverPp2m, EdmChurn};
use ddpm_diffusion::{space_timesteps, GaussianDiffusion, ModelVarType};
use ddpm_kernels::{philox_normal, NoiseKey, StepNoise};
use ddpm_rng::Stream;

use crate::denoiser::Denoiser;
use crate::error::{Result, SamplerError};
use crate::guidance::{classifier_grad, guided_model_output, Guidance};
use crate::sde::ScoreSdeOptions;
use crate::steps::{
    ancestral_step, ddim_step, fused_step, guided_eps, DdimOptions, FusedUpdate, ScaledGrad,
};

/// DPM-Solver++ starts where the half-log-SNR is at least this (diffusers' `lambda_min_clipped`):
/// no effect on the linear schedule, skips the last ~1% of the cosine one, where alpha_bar ~ 2e-9
/// makes the first data prediction explode (measured: speckle-noise samples without it).
pub const DPM_LAMBDA_MIN: f64 = -5.1;

/// Which sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    Ddpm,
    Ddim,
    DpmSolver,
    Heun,
    /// Reverse-SDE predictor alone (Euler-Maruyama by default), Song et al. 2021.
    Sde,
    /// Predictor-corrector: reverse-diffusion predictor + Langevin corrector, Song et al. 2021.
    Pc,
    /// Karras et al.'s stochastic sampler (EDM Algorithm 2).
    Edm,
}

impl SamplerKind {
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim => "ddim",
            SamplerKind::DpmSolver => "dpm-solver",
            SamplerKind::Heun => "heun",
            SamplerKind::Sde => "sde",
            SamplerKind::Pc => "pc",
            SamplerKind::Edm => "edm",
        }
    }

    pub fn all() -> [SamplerKind; 7] {
        [
            SamplerKind::Ddpm,
            SamplerKind::Ddim,
            SamplerKind::DpmSolver,
            SamplerKind::Heun,
            SamplerKind::Sde,
            SamplerKind::Pc,
            SamplerKind::Edm,
        ]
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ddpm" | "ancestral" => Ok(SamplerKind::Ddpm),
            "ddim" => Ok(SamplerKind::Ddim),
            "dpm-solver" | "dpm-solver++" | "dpmsolver" | "dpmpp-2m" | "dpm-solver-2m" => {
                Ok(SamplerKind::DpmSolver)
            }
            "heun" | "ode" => Ok(SamplerKind::Heun),
            "sde" | "euler-maruyama" | "em" => Ok(SamplerKind::Sde),
            "pc" | "predictor-corrector" => Ok(SamplerKind::Pc),
            "edm" | "edm-stochastic" => Ok(SamplerKind::Edm),
            other => Err(SamplerError::Config(format!(
                "unknown sampler {other:?} (expected ddpm, ddim, dpm-solver, heun, sde, pc or edm)"
            ))),
        }
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerSettings {
    pub kind: SamplerKind,
    /// The step spec (see the module documentation); `None` = the sampler's default.
    pub steps: Option<String>,
    /// DDIM stochasticity (0 = deterministic). Only DDIM takes it.
    pub eta: f64,
    /// Clamp the predicted x0 to [-1, 1] before each DDPM / DDIM update.
    pub clip_denoised: bool,
    /// Use ddpm-kernels' fused update for DDPM / DDIM steps where it applies (f32, fixed variance,
    /// no classifier guidance). It computes the same update as ddpm-diffusion's step functions in one
    /// pass over memory (equal to float rounding; tested).
    pub fused_update: bool,
    /// Predictor, corrector steps and snr of `sde` / `pc` (see [`ScoreSdeOptions`]).
    pub score_sde: ScoreSdeOptions,
    /// EDM's S_churn, S_tmin, S_tmax, S_noise for `edm`; `None` = [`EdmChurn::IDDPM`].
    pub churn: Option<EdmChurn>,
}

impl SamplerSettings {
    pub fn new(kind: SamplerKind) -> Self {
        Self {
            kind,
            steps: None,
            eta: 0.0,
            clip_denoised: false,
            fused_update: true,
            score_sde: ScoreSdeOptions::default(),
            churn: None,
        }
    }

    pub fn steps(mut self, spec: impl Into<String>) -> Self {
        self.steps = Some(spec.into());
        self
    }
}

/// Reported to the caller after every model evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Model evaluations done so far for this batch.
    pub evals: usize,
    /// Model evaluations the batch needs in all.
    pub total: usize,
    /// The sample after a completed sampler step (VP coordinates, like `x_T`); `None` after the
    /// first evaluation of a two-evaluation Heun step.
    pub sample: Option<&'a Tensor>,
}

/// A batch to generate.
#[derive(Debug, Clone)]
pub struct BatchSpec<'a> {
    /// `[B, C, H, W]`.
    pub shape: [usize; 4],
    /// Global index of image 0 of the batch; image `i` is global image `first_index + i`.
    pub first_index: u64,
    pub seed: u64,
    /// `[B]` class labels for a class-conditional model.
    pub labels: Option<&'a [u32]>,
    pub device: Device,
    /// The dtype of the sample (f32 normally; f64 for reference tests).
    pub dtype: DType,
    /// Start from this `x_T` instead of the seeded noise (tests).
    pub x_init: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Plan {
    /// DDPM / DDIM on a respaced process.
    Respaced(Box<GaussianDiffusion>),
    DpmSolver(usize),
    /// Heun (EDM Algorithm 1) and EDM Algorithm 2: noise levels, their timesteps, and the churned
    /// level `(timestep, sigma_hat)` each step starts from (the level itself without churn).
    Karras {
        timesteps: Vec<usize>,
        sigmas: Vec<f64>,
        hats: Vec<(usize, f64)>,
    },
    /// Score-SDE predictor(-corrector) on a respaced chain.
    Sde(Box<GaussianDiffusion>),
}

/// A configured sampler for one trained diffusion process.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub(crate) full: GaussianDiffusion,
    pub(crate) settings: SamplerSettings,
    plan: Plan,
}

fn plain_count(spec: &str) -> Option<usize> {
    spec.trim().parse::<usize>().ok()
}

/// The respacing a DDPM or DDIM step spec selects (see the module documentation).
pub fn respacing_for(
    kind: SamplerKind,
    num_timesteps: usize,
    spec: Option<&str>,
) -> Result<Vec<usize>> {
    let spec = spec.map(str::trim).filter(|s| !s.is_empty());
    let ancestral = matches!(kind, SamplerKind::Ddpm | SamplerKind::Sde | SamplerKind::Pc);
    Ok(match (kind, spec) {
        (_, None) if ancestral => (0..num_timesteps).collect(),
        (SamplerKind::Ddim, None) => space_timesteps(num_timesteps, "ddim50")
            .or_else(|_| space_timesteps(num_timesteps, &50.min(num_timesteps).to_string()))?,
        (SamplerKind::Ddim, Some(s)) if plain_count(s).is_some() => {
            space_timesteps(num_timesteps, &format!("ddim{s}"))
                .or_else(|_| space_timesteps(num_timesteps, s))?
        }
        (_, Some(s)) if ancestral || kind == SamplerKind::Ddim => {
            space_timesteps(num_timesteps, s)?
        }
        (other, _) => {
            return Err(SamplerError::Config(format!(
                "{other} does not run on a respaced process"
            )));
        }
    })
}

/// The largest noise level the Heun sampler starts from (EDM's choice for VP models).
pub const HEUN_SIGMA_MAX: f64 = 80.0;

/// The training timestep whose sigma (`sig`, increasing in t) is nearest to `s` in log sigma.
fn nearest_timestep(sig: &[f64], s: f64) -> usize {
    let target = s.ln();
    let p = sig.partition_point(|&v| v.ln() < target);
    match p {
        0 => 0,
        p if p >= sig.len() => sig.len() - 1,
        p => {
            if (sig[p].ln() - target).abs() < (target - sig[p - 1].ln()).abs() {
                p
            } else {
                p - 1
            }
        }
    }
}

/// EDM Algorithm 2's churned levels for the Karras levels `(timesteps, sigmas)` of
/// [`heun_timesteps`]: level i is raised to `sigma_i (1 + gamma_i)`, snapped (as the levels are) to
/// the nearest training timestep in log sigma and never below level i's own; `(t_i, sigma_i)` where
/// gamma is 0 or the snap lands on level i itself.
pub fn edm_churned_levels(
    full: &GaussianDiffusion,
    timesteps: &[usize],
    sigmas: &[f64],
    churn: &EdmChurn,
) -> Vec<(usize, f64)> {
    let sig = &full.schedule.sqrt_recipm1_alphas_cumprod;
    let n = timesteps.len();
    timesteps
        .iter()
        .zip(sigmas)
        .map(|(&t, &s)| {
            let gamma = churn.gamma(s, n);
            if gamma == 0.0 {
                return (t, s);
            }
            let th = nearest_timestep(sig, s * (1.0 + gamma)).max(t);
            (th, sig[th])
        })
        .collect()
}

/// EDM's rho = 7 noise levels between the schedule's extremes, snapped to training timesteps
/// (descending, unique), with their sigmas and a final 0.
pub fn heun_timesteps(full: &GaussianDiffusion, n: usize) -> Result<(Vec<usize>, Vec<f64>)> {
    let big_t = full.num_timesteps();
    if n == 0 || n > big_t {
        return Err(SamplerError::Config(format!(
            "heun needs 1..={big_t} noise levels, got {n}"
        )));
    }
    let sig = &full.schedule.sqrt_recipm1_alphas_cumprod; // sqrt(1/abar - 1), increasing in t
                                                          // EDM's sigma_max = 80 for VP models: above it x_t is noise for all practical purposes (the
                                                          // cosine schedule's last step reaches sigma ~ 2e4), and steps up there only cost evaluations.
    let (smin, smax) = (sig[0], sig[big_t - 1].min(HEUN_SIGMA_MAX));
    const RHO: f64 = 7.0;
    let mut ts: Vec<usize> = Vec::with_capacity(n);
    for i in 0..n {
        let s = if n == 1 {
            smax
        } else {
            let f = i as f64 / (n - 1) as f64;
            (smax.powf(1.0 / RHO) + f * (smin.powf(1.0 / RHO) - smax.powf(1.0 / RHO))).powf(RHO)
        };
        let t = nearest_timestep(sig, s);
        if ts.last() != Some(&t) {
            ts.push(t);
        }
    }
    let mut sigmas: Vec<f64> = ts.iter().map(|&t| sig[t]).collect();
    sigmas.push(0.0);
    Ok((ts, sigmas))
}

impl Sampler {
    /// `full` is the process the model was trained on (not respaced).
    pub fn new(full: GaussianDiffusion, settings: SamplerSettings) -> Result<Self> {
        if full.num_timesteps() != full.original_num_timesteps
            || full.timestep_map.iter().enumerate().any(|(i, &t)| i != t)
        {
            return Err(SamplerError::Config(
                "the sampler needs the training process, not a respaced one".into(),
            ));
        }
        if !(settings.eta.is_finite() && settings.eta >= 0.0) {
            return Err(SamplerError::Config(format!(
                "eta must be >= 0, got {}",
                settings.eta
            )));
        }
        if settings.eta != 0.0 && settings.kind != SamplerKind::Ddim {
            return Err(SamplerError::Config(format!(
                "eta applies to ddim only, not {}",
                settings.kind
            )));
        }
        crate::sde::validate_options(&settings)?;
        if settings.clip_denoised
            && !matches!(
                settings.kind,
                SamplerKind::Ddpm | SamplerKind::Ddim | SamplerKind::DpmSolver
            )
        {
            return Err(SamplerError::Config(format!(
                "x0 clipping applies to ddpm, ddim and dpm-solver, not {}",
                settings.kind
            )));
        }
        let big_t = full.num_timesteps();
        let spec = settings
            .steps
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let count = |default: usize| -> Result<usize> {
            match spec {
                None => Ok(default.min(big_t)),
                Some(s) => plain_count(s).filter(|&n| n > 0).ok_or_else(|| {
                    SamplerError::Config(format!(
                        "{} takes a plain step count, got {s:?}",
                        settings.kind
                    ))
                }),
            }
        };
        let plan = match settings.kind {
            SamplerKind::Ddpm | SamplerKind::Ddim => Plan::Respaced(Box::new(
                full.respaced(&respacing_for(settings.kind, big_t, spec)?)?,
            )),
            SamplerKind::DpmSolver => {
                let n = count(20)?;
                DpmSolverPp2m::with_lambda_min(&full.schedule, n, DPM_LAMBDA_MIN)?; // validates n
                Plan::DpmSolver(n)
            }
            SamplerKind::Heun | SamplerKind::Edm => {
                let (timesteps, sigmas) = heun_timesteps(&full, count(18)?)?;
                let hats = match (settings.kind, settings.churn) {
                    (SamplerKind::Heun, _) => {
                        timesteps.iter().copied().zip(sigmas.clone()).collect()
                    }
                    (_, churn) => edm_churned_levels(
                        &full,
                        &timesteps,
                        &sigmas,
                        &churn.unwrap_or(EdmChurn::IDDPM),
                    ),
                };
                Plan::Karras {
                    timesteps,
                    sigmas,
                    hats,
                }
            }
            SamplerKind::Sde | SamplerKind::Pc => Plan::Sde(Box::new(
                full.respaced(&respacing_for(settings.kind, big_t, spec)?)?,
            )),
        };
        Ok(Self {
            full,
            settings,
            plan,
        })
    }

    pub fn settings(&self) -> &SamplerSettings {
        &self.settings
    }

    pub fn diffusion(&self) -> &GaussianDiffusion {
        &self.full
    }

    /// The original timesteps the model is evaluated at, in order.
    pub fn model_timesteps(&self) -> Vec<usize> {
        match &self.plan {
            Plan::Respaced(d) => d.timestep_map.iter().rev().copied().collect(),
            Plan::Sde(d) => {
                let (_, nc, _) = self.settings.score_sde.resolved(self.settings.kind);
                d.timestep_map
                    .iter()
                    .rev()
                    .flat_map(|&t| std::iter::repeat_n(t, nc + 1))
                    .collect()
            }
            Plan::DpmSolver(n) => {
                DpmSolverPp2m::with_lambda_min(&self.full.schedule, *n, DPM_LAMBDA_MIN)
                    .map(|s| s.timesteps)
                    .unwrap_or_default()
            }
            Plan::Karras {
                timesteps,
                sigmas,
                hats,
            } => {
                let mut v = Vec::new();
                for i in 0..timesteps.len() {
                    v.push(hats[i].0);
                    if sigmas[i + 1] > 0.0 {
                        v.push(timesteps[i + 1]);
                    }
                }
                v
            }
        }
    }

    /// Model evaluations per image (twice the forward batch with classifier-free guidance).
    pub fn num_model_evals(&self) -> usize {
        self.model_timesteps().len()
    }

    /// Sampler iterations (progress units): one per model evaluation.
    pub fn num_iterations(&self) -> usize {
        self.num_model_evals()
    }

    /// Noise `[B, ...]` for sampler step `step` (0 = x_T) of a batch, in `dtype` on `device`.
    pub fn noise(batch: &BatchSpec<'_>, step: u64) -> Result<Tensor> {
        let key = NoiseKey {
            seed: batch.seed,
            step,
            first_example: batch.first_index,
        };
        let z = philox_normal(
            batch.shape.to_vec(),
            Stream::Sampler as u32,
            key,
            &batch.device,
        )?;
        Ok(z.to_dtype(batch.dtype)?)
    }

    fn fused_applies(&self, batch: &BatchSpec<'_>, guidance: &Guidance<'_>) -> bool {
        self.settings.fused_update
            && batch.dtype == DType::F32
            && guidance.classifier.is_none_or(|c| c.scale == 0.0)
            && matches!(
                self.full.var_type,
                ModelVarType::FixedSmall | ModelVarType::FixedLarge
            )
    }

    /// Generates one batch.
    pub fn sample(
        &self,
        model: &dyn Denoiser,
        guidance: &Guidance<'_>,
        batch: &BatchSpec<'_>,
    ) -> Result<Tensor> {
        self.sample_observed(model, guidance, batch, &mut |_| {})
    }

    /// Generates one batch, calling `progress` after every model evaluation.
    pub fn sample_observed(
        &self,
        model: &dyn Denoiser,
        guidance: &Guidance<'_>,
        batch: &BatchSpec<'_>,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Tensor> {
        let b = batch.shape[0];
        if let Some(l) = batch.labels {
            if l.len() != b {
                return Err(SamplerError::Config(format!(
                    "{} labels for a batch of {b}",
                    l.len()
                )));
            }
        }
        guidance.validate(batch.labels)?;
        let labels = match batch.labels {
            Some(l) => Some(Tensor::from_vec(l.to_vec(), b, &batch.device)?),
            None => None,
        };
        let x = match &batch.x_init {
            Some(x) => {
                if x.dims() != batch.shape {
                    return Err(SamplerError::Config(format!(
                        "x_init has shape {:?}, the batch is {:?}",
                        x.dims(),
                        batch.shape
                    )));
                }
                x.to_dtype(batch.dtype)?.to_device(&batch.device)?
            }
            None => Self::noise(batch, 0)?,
        };
        let x = match &self.plan {
            Plan::Respaced(d) => {
                self.sample_respaced(d, model, guidance, batch, labels.as_ref(), x, progress)?
            }
            Plan::DpmSolver(n) => {
                self.sample_dpm_solver(*n, model, guidance, labels.as_ref(), x, progress)?
            }
            Plan::Karras {
                timesteps,
                sigmas,
                hats,
            } => self.sample_karras(
                (timesteps, sigmas, hats),
                model,
                guidance,
                batch,
                labels.as_ref(),
                x,
                progress,
            )?,
            Plan::Sde(d) => {
                self.sample_sde(d, model, guidance, batch, labels.as_ref(), x, progress)?
            }
        };
        // x - x is 0 for finite values and NaN for NaN or +-inf; its sum is 0 exactly when all are finite.
        let probe = x.to_dtype(DType::F64)?;
        if probe.sub(&probe)?.sum_all()?.to_scalar::<f64>()? != 0.0 {
            return Err(SamplerError::NonFinite {
                what: "the final sample".into(),
                step: self.num_iterations(),
            });
        }
        Ok(x)
    }

    pub(crate) fn grad<'g>(
        &self,
        guidance: &Guidance<'_>,
        x: &Tensor,
        t_model: &[usize],
        labels: Option<&Tensor>,
        slot: &'g mut Option<Tensor>,
    ) -> Result<Option<ScaledGrad<'g>>> {
        match (&guidance.classifier, labels) {
            // s = 0 is exactly the unguided sampler: the classifier is not evaluated. (Applying a zero
            // shift would equal it mathematically but not bit for bit: condition_score goes through
            // x0 and back.)
            (Some(c), Some(y)) if c.scale != 0.0 => {
                *slot = Some(classifier_grad(c.classifier, x, t_model, y)?);
                Ok(slot.as_ref().map(|grad| ScaledGrad {
                    grad,
                    scale: c.scale,
                }))
            }
            _ => Ok(None),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sample_respaced(
        &self,
        d: &GaussianDiffusion,
        model: &dyn Denoiser,
        guidance: &Guidance<'_>,
        batch: &BatchSpec<'_>,
        labels: Option<&Tensor>,
        mut x: Tensor,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Tensor> {
        let b = batch.shape[0];
        let n = d.num_timesteps();
        let fused = self.fused_applies(batch, guidance);
        let ddim = self.settings.kind == SamplerKind::Ddim;
        let opts = DdimOptions {
            clip_denoised: self.settings.clip_denoised,
            eta: self.settings.eta,
        };
        for (i, k) in (0..n).rev().enumerate() {
            let t = vec![k; b];
            let t_model = vec![d.timestep_map[k]; b];
            let out = guided_model_output(model, d, guidance, &x, &t_model, labels)?;
            let step = i as u64 + 1;
            let needs_noise = !ddim || opts.eta > 0.0;
            if fused {
                let update = if ddim {
                    FusedUpdate::Ddim { eta: opts.eta }
                } else {
                    FusedUpdate::Ddpm
                };
                let noise = if needs_noise {
                    StepNoise::Philox(NoiseKey {
                        seed: batch.seed,
                        step,
                        first_example: batch.first_index,
                    })
                } else {
                    StepNoise::None
                };
                x = fused_step(d, update, opts.clip_denoised, &out, &x, &t, noise)?.0;
            } else {
                let mut slot = None;
                let g = self.grad(guidance, &x, &t_model, labels, &mut slot)?;
                let noise = if needs_noise {
                    Some(Self::noise(batch, step)?)
                } else {
                    None
                };
                x = if ddim {
                    ddim_step(d, &out, &x, &t, opts, noise.as_ref(), g)?.x_prev
                } else {
                    let z = noise.expect("ddpm always draws noise");
                    ancestral_step(d, &out, &x, &t, &z, self.settings.clip_denoised, g)?.x_prev
                };
            }
            progress(Progress {
                evals: i + 1,
                total: n,
                sample: Some(&x),
            });
        }
        Ok(x)
    }

    fn sample_dpm_solver(
        &self,
        n: usize,
        model: &dyn Denoiser,
        guidance: &Guidance<'_>,
        labels: Option<&Tensor>,
        mut x: Tensor,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Tensor> {
        let full = &self.full;
        let b = x.dim(0)?;
        // The solver always receives eps (converted from v / x0 predictions, and guided), so
        // classifier guidance applies the same way whatever the model predicts.
        let mut solver = DpmSolverPp2m::with_lambda_min(&full.schedule, n, DPM_LAMBDA_MIN)?
            .with_clip(self.settings.clip_denoised);
        for i in 0..n {
            let t = solver.current_timestep().expect("n steps");
            let t_model = vec![t; b];
            let out = guided_model_output(model, full, guidance, &x, &t_model, labels)?;
            let mut slot = None;
            let g = self.grad(guidance, &x, &t_model, labels, &mut slot)?;
            let eps = guided_eps(full, &out, &x, &t_model, g)?;
            x = solver.step(&eps, &x)?.x_next;
            progress(Progress {
                evals: i + 1,
                total: n,
                sample: Some(&x),
            });
        }
        Ok(x)
    }

    /// Heun (EDM Algorithm 1) and, where a level's `hat` is above it, EDM Algorithm 2: the sample is
    /// first raised to `sigma_hat` with noise step `i + 1`, then the same Euler / Heun step is taken
    /// from there.
    #[allow(clippy::too_many_arguments)]
    fn sample_karras(
        &self,
        (timesteps, sigmas, hats): (&[usize], &[f64], &[(usize, f64)]),
        model: &dyn Denoiser,
        guidance: &Guidance<'_>,
        batch: &BatchSpec<'_>,
        labels: Option<&Tensor>,
        x_vp: Tensor,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Tensor> {
        let full = &self.full;
        let b = x_vp.dim(0)?;
        let total = self.num_model_evals();
        let mut evals = 0usize;
        // d x_ve / d sigma at (x_ve, sigma): the model sees the VP sample x_ve / sqrt(1 + sigma^2).
        let vp = |x_ve: &Tensor, sigma: f64| x_ve.affine(1.0 / (1.0 + sigma * sigma).sqrt(), 0.0);
        let slope = |x_ve: &Tensor, t: usize, sigma: f64| -> Result<Tensor> {
            let x_in = vp(x_ve, sigma)?;
            let t_model = vec![t; b];
            let out = guided_model_output(model, full, guidance, &x_in, &t_model, labels)?;
            let mut slot = None;
            let g = self.grad(guidance, &x_in, &t_model, labels, &mut slot)?;
            guided_eps(full, &out, &x_in, &t_model, g)
        };
        let churn = self.settings.churn.unwrap_or(EdmChurn::IDDPM);
        let mut x = x_vp.affine((1.0 + sigmas[0] * sigmas[0]).sqrt(), 0.0)?;
        for i in 0..timesteps.len() {
            let ((t_hat, s), s_next) = (hats[i], sigmas[i + 1]);
            if s > sigmas[i] {
                let z = Self::noise(batch, i as u64 + 1)?;
                x = edm_churn(&x, sigmas[i], s, churn.s_noise, &z)?;
            }
            let d = slope(&x, t_hat, s)?;
            evals += 1;
            let euler = edm_euler(&x, s, s_next, &d)?;
            x = if s_next > 0.0 {
                progress(Progress {
                    evals,
                    total,
                    sample: None,
                });
                let d2 = slope(&euler, timesteps[i + 1], s_next)?;
                evals += 1;
                edm_heun(&x, s, s_next, &d, &d2)?
            } else {
                euler
            };
            let x_now = vp(&x, s_next)?;
            progress(Progress {
                evals,
                total,
                sample: Some(&x_now),
            });
        }
        Ok(x)
    }
}
