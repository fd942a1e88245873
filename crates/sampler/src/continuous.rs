//! Continuous-time (VDM) models: sampling at any number of steps and the ELBO in bits/dim.
//!
//! The step math is `ddpm_diffusion::vdm` (ancestral posterior, DDIM) and the DPM-Solver++(2M)
//! of `ddpm_diffusion::steps`, run on the schedule's own log-SNR; this module owns the loops, the
//! randomness (ddpm-rng streams keyed by seed, step and global image index) and the model calls.

use candle_core::{DType, Device, Tensor};
use ddpm_config::{ContinuousSchedule, ContinuousSpec};
use ddpm_diffusion::steps::dpm_solver::DpmSolverPp2m;
use ddpm_diffusion::vdm::{self, loss::q_sample, sample, FixedGamma, MonotoneGammaInit};
use ddpm_kernels::{philox_normal, NoiseKey};
use ddpm_rng::{Stream, StreamKey};
use ddpm_unet::{ForwardCtx, UNet};

use crate::error::{Result, SamplerError};

/// A schedule on the host: fixed, or the learned network's parameters from a checkpoint.
#[derive(Debug, Clone)]
pub enum HostGamma {
    Fixed(FixedGamma),
    Learned(MonotoneGammaInit),
}

impl HostGamma {
    /// The schedule of `spec`; `learned` must hold the parameters when the spec's is learned.
    pub fn new(spec: &ContinuousSpec, learned: Option<MonotoneGammaInit>) -> Result<Self> {
        match (spec.schedule, learned) {
            (ContinuousSchedule::Fixed(f), _) => Ok(HostGamma::Fixed(f)),
            (ContinuousSchedule::Learned { .. }, Some(p)) => Ok(HostGamma::Learned(p)),
            (ContinuousSchedule::Learned { .. }, None) => Err(SamplerError::Config(
                "a learned schedule needs its parameters from the checkpoint".into(),
            )),
        }
    }

    pub fn gamma(&self, t: f64) -> f64 {
        self.gamma_dgamma(t).0
    }

    pub fn gamma_dgamma(&self, t: f64) -> (f64, f64) {
        match self {
            HostGamma::Fixed(f) => (f.gamma(t), f.dgamma(t)),
            HostGamma::Learned(p) => p.gamma_dgamma(t),
        }
    }
}

/// A continuous-time eps-prediction U-Net with its schedule.
pub struct ContinuousModel {
    pub unet: UNet,
    pub spec: ContinuousSpec,
    pub gamma: HostGamma,
    /// Classifier-free guidance weight `w` for sampling (`eps = (1 + w) eps_cond - w eps_uncond`,
    /// as the discrete samplers); `None` for the plain model (and always for the ELBO).
    pub cfg: Option<f64>,
}

impl ContinuousModel {
    /// eps prediction at `z` with per-example noise levels `gamma` (the training conditioning),
    /// guided when `cfg` is set and labels are given: one forward pass on `[z, z]` with labels
    /// `[y, null]`, the null label being `num_classes` (what label dropout trained).
    pub fn eps(&self, z: &Tensor, gamma: &[f64], y: Option<&Tensor>) -> Result<Tensor> {
        let num_classes = self.unet.config().num_classes;
        let y = num_classes.and(y);
        let (Some(w), Some(y), Some(null)) = (self.cfg, y, num_classes) else {
            return self.forward(z, gamma, y);
        };
        let b = z.dim(0)?;
        let null_y = Tensor::full(null as u32, b, y.device())?.to_dtype(y.dtype())?;
        let g2: Vec<f64> = gamma.iter().chain(gamma).copied().collect();
        let out = self.forward(
            &Tensor::cat(&[z, z], 0)?,
            &g2,
            Some(&Tensor::cat(&[y, &null_y], 0)?),
        )?;
        let (cond, uncond) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
        Ok(ddpm_diffusion::steps::cfg_combine(&cond, &uncond, w)?)
    }

    fn forward(&self, z: &Tensor, gamma: &[f64], y: Option<&Tensor>) -> Result<Tensor> {
        let c: Vec<f32> = gamma
            .iter()
            .map(|&g| self.spec.model_input(g) as f32)
            .collect();
        let dtype = self.unet.dtype();
        let t = Tensor::from_vec(c, gamma.len(), z.device())?.to_dtype(dtype)?;
        let out = self
            .unet
            .forward(&z.to_dtype(dtype)?, &t, y, &ForwardCtx::eval())?;
        Ok(out.to_dtype(z.dtype())?)
    }
}

/// The continuous-time samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContinuousKind {
    /// VDM's ancestral sampler: the exact posterior `q(z_s | z_t, x = x_hat)` at every step.
    Ancestral,
    /// Deterministic DDIM (eta = 0) between the grid's noise levels.
    Ddim,
    /// DPM-Solver++(2M) in the schedule's log-SNR.
    DpmSolverPp,
}

impl std::str::FromStr for ContinuousKind {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "ddpm" | "ancestral" => ContinuousKind::Ancestral,
            "ddim" => ContinuousKind::Ddim,
            "dpm-solver" | "dpm_solver" | "dpm-solver++" => ContinuousKind::DpmSolverPp,
            other => bail_usage!(
                "--sampler {other:?}: a continuous-time model samples with ddpm (ancestral), ddim or dpm-solver"
            ),
        })
    }
}

/// What to sample: `n` images of `chw` starting at global index `first_index`.
pub struct ContinuousBatch<'a> {
    pub chw: [usize; 3],
    pub n: usize,
    pub first_index: u64,
    pub seed: u64,
    pub labels: Option<&'a Tensor>,
    pub device: Device,
}

/// Samples `[n, C, H, W]` in [-1, 1] with `steps` model evaluations on the uniform time grid
/// `1 -> 0`. DDIM and DPM-Solver++ clamp their x estimates to [-1, 1] when `clip`.
pub fn sample_continuous(
    model: &ContinuousModel,
    kind: ContinuousKind,
    steps: usize,
    clip: bool,
    b: &ContinuousBatch,
) -> Result<Tensor> {
    let grid = sample::time_grid(steps)?;
    let gammas: Vec<f64> = grid.iter().map(|&t| model.gamma.gamma(t)).collect();
    let [c, h, w] = b.chw;
    let shape = [b.n, c, h, w];
    let key = |step: u64| NoiseKey {
        seed: b.seed,
        step,
        first_example: b.first_index,
    };
    let mut z = philox_normal(
        shape.to_vec(),
        Stream::Sampler as u32,
        key(u64::MAX),
        &b.device,
    )?;
    let at = |g: f64| vec![g; b.n];
    if kind == ContinuousKind::DpmSolverPp {
        let mut solver = DpmSolverPp2m::from_gammas(&gammas[..steps])?.with_clip(clip);
        for &g in &gammas[..steps] {
            let eps = model.eps(&z, &at(g), b.labels)?;
            z = solver.step(&eps, &z)?.x_next;
        }
        return Ok(z.clamp(-1f32, 1f32)?);
    }
    for i in 0..steps {
        let (gt, gs) = (gammas[i], gammas[i + 1]);
        let eps = model.eps(&z, &at(gt), b.labels)?;
        z = match kind {
            ContinuousKind::Ancestral => {
                let noise = philox_normal(
                    shape.to_vec(),
                    Stream::Sampler as u32,
                    key(i as u64),
                    &b.device,
                )?;
                sample::ancestral_step(&z, &eps, &noise, gt, gs)?
            }
            _ => sample::ddim_step(&z, &eps, gt, gs, clip)?,
        };
    }
    Ok(sample::final_mean(&z, gammas[steps])?)
}

/// Per-example sums of the continuous-time ELBO terms (bits/dim), for adding over ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ContinuousBpdSums {
    pub count: f64,
    pub prior: f64,
    pub diffusion: f64,
    pub reconstruction: f64,
    pub total: f64,
    pub total_sq: f64,
    /// Over (example, time draw) pairs: the single-draw loss `prior + recon + diffusion(t)`.
    pub draws: f64,
    pub draw_sum: f64,
    pub draw_sq: f64,
    /// Sum over examples of the variance of the diffusion term across that example's draws.
    pub within_var: f64,
}

impl ContinuousBpdSums {
    pub fn to_vec(self) -> Vec<f64> {
        vec![
            self.count,
            self.prior,
            self.diffusion,
            self.reconstruction,
            self.total,
            self.total_sq,
            self.draws,
            self.draw_sum,
            self.draw_sq,
            self.within_var,
        ]
    }

    pub fn from_slice(v: &[f64]) -> Self {
        Self {
            count: v[0],
            prior: v[1],
            diffusion: v[2],
            reconstruction: v[3],
            total: v[4],
            total_sq: v[5],
            draws: v[6],
            draw_sum: v[7],
            draw_sq: v[8],
            within_var: v[9],
        }
    }

    /// The means and variances as a JSON object.
    pub fn report(&self) -> serde_json::Value {
        let n = self.count.max(1.0);
        let mean = self.total / n;
        let var = (self.total_sq / n - mean * mean).max(0.0) * n / (n - 1.0).max(1.0);
        let d = self.draws.max(1.0);
        let dm = self.draw_sum / d;
        let dvar = (self.draw_sq / d - dm * dm).max(0.0) * d / (d - 1.0).max(1.0);
        serde_json::json!({
            "num_examples": self.count,
            "total_bpd": mean,
            "total_bpd_stderr": (var / n).sqrt(),
            "prior_bpd": self.prior / n,
            "diffusion_bpd": self.diffusion / n,
            "reconstruction_bpd": self.reconstruction / n,
            "time_draws": self.draws,
            "single_draw_loss_variance": dvar,
            "diffusion_variance_over_t": self.within_var / n,
        })
    }
}

/// The ELBO of one batch `x0` (`[B, C, H, W]` in [-1, 1], global indices from `first_index`):
/// the prior and reconstruction terms once, the diffusion term averaged over `draws` times
/// `t ~ U(0, 1)` per example (independent draws, so their spread measures the estimator's
/// variance). Noise and times are keyed by `(seed, draw, global index)`.
pub fn elbo_batch(
    model: &ContinuousModel,
    x0: &Tensor,
    labels: Option<&Tensor>,
    first_index: u64,
    seed: u64,
    draws: usize,
) -> Result<ContinuousBpdSums> {
    let b = x0.dim(0)?;
    let x = x0.to_dtype(DType::F32)?;
    let (g0, g1) = (model.gamma.gamma(0.0), model.gamma.gamma(1.0));
    let dev = x.device();
    let key = |step: u64| NoiseKey {
        seed,
        step,
        first_example: first_index,
    };
    let prior = host(&vdm::prior_bpd(
        &x.to_dtype(DType::F64)?,
        &Tensor::new(&[g1], dev)?,
    )?)?;
    let eps0 = philox_normal(x.dims(), Stream::DecoderNoise as u32, key(0), dev)?;
    let z0 = q_sample(&x, &eps0, &Tensor::new(vec![g0 as f32; b].as_slice(), dev)?)?;
    let recon = host(&vdm::reconstruction_bpd(
        &x,
        &z0,
        &Tensor::new(&[g0 as f32], dev)?,
    )?)?;
    let mut diff = vec![Vec::with_capacity(draws); b];
    for k in 0..draws {
        let t: Vec<f64> = (0..b as u64)
            .map(|i| {
                StreamKey::new(seed, Stream::Timestep, k as u64, first_index + i).uniform(0) as f64
            })
            .collect();
        let (g, dg): (Vec<f64>, Vec<f64>) = t.iter().map(|&x| model.gamma.gamma_dgamma(x)).unzip();
        let eps = philox_normal(x.dims(), Stream::Noise as u32, key(k as u64), dev)?;
        let gt = Tensor::new(
            g.iter().map(|&v| v as f32).collect::<Vec<_>>().as_slice(),
            dev,
        )?;
        let z = q_sample(&x, &eps, &gt)?;
        let eps_hat = model.eps(&z, &g, labels)?;
        let dgt = Tensor::new(
            dg.iter().map(|&v| v as f32).collect::<Vec<_>>().as_slice(),
            dev,
        )?;
        let d = host(&vdm::diffusion_bpd_continuous(&eps, &eps_hat, &dgt)?)?;
        for i in 0..b {
            diff[i].push(d[i]);
        }
    }
    let mut s = ContinuousBpdSums {
        count: b as f64,
        ..Default::default()
    };
    for i in 0..b {
        let m = diff[i].iter().sum::<f64>() / draws as f64;
        let v = diff[i].iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (draws.max(2) - 1) as f64;
        let total = prior[i] + recon[i] + m;
        if !total.is_finite() {
            return Err(SamplerError::NonFinite {
                what: format!("the bound of example {}", first_index + i as u64),
                step: 0,
            });
        }
        s.prior += prior[i];
        s.reconstruction += recon[i];
        s.diffusion += m;
        s.total += total;
        s.total_sq += total * total;
        s.within_var += v;
        for d in &diff[i] {
            let l = prior[i] + recon[i] + d;
            s.draws += 1.0;
            s.draw_sum += l;
            s.draw_sq += l * l;
        }
    }
    Ok(s)
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}
