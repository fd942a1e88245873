//! Continuous-time training (`[diffusion] time = "continuous"`, Kingma et al. 2021): the
//! per-step ELBO estimate and, for `schedule = "learned"`, the schedule's gradients.
//!
//! One step: low-discrepancy times `t_p = (u + p/N) mod 1` over the global batch (`u` shared by
//! all ranks, `p` the global example index), `z_t = alpha_t x + sigma_t eps`, the U-Net's eps
//! prediction conditioned on the noise level, and the loss = prior + diffusion + reconstruction
//! terms in bits/dim, averaged over the batch.
//!
//! The learned schedule gets two gradients, as in VDM (sec. 5.2 and appendix I.2):
//! * its endpoints `gamma_0`, `gamma_1` the gradient of the loss (they set the prior and
//!   reconstruction terms and the range of the diffusion term);
//! * the parameters that shape the curve the gradient of the *variance* of the diffusion term's
//!   estimate: the continuous-time loss does not depend on the shape in expectation, so its
//!   gradient would only be noise; `d/d eta mean_i(L_i^2) = mean_i(2 L_i dL_i/d eta)`.
//!
//! Both come from one backward pass through the U-Net: the loss is built on *detached copies*
//! (leaf variables) of `gamma(t_i)`, `gamma'(t_i)`, `gamma(0)`, `gamma(1)`; their gradients are then
//! pushed through the small schedule network by two cheap surrogate backward passes.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, TensorId, Var};
use ddpm_config::{ContinuousSchedule, ContinuousSpec};
use ddpm_diffusion::vdm::loss::q_sample;
use ddpm_diffusion::vdm::schedule::is_endpoint_param;
use ddpm_diffusion::vdm::{self, FixedGamma, GammaEval, MonotoneGamma, MonotoneGammaInit};
use ddpm_kernels::{philox_normal, NoiseKey};
use ddpm_rng::{Stream, StreamKey};
use ddpm_unet::{ForwardCtx, UNet};

use crate::metrics::StepStats;

/// Buckets of `t` for the per-quarter loss statistics (`StepStats` takes an integer timestep).
const T_BUCKETS: usize = 1000;
/// Scale of the learned schedule's initial hidden weights (VDM's N(0, 0.01^2)).
const INIT_SCALE: f64 = 0.01;

/// The continuous-time process of a run, with the learned schedule's variables if any.
pub(crate) struct Continuous {
    pub(crate) spec: ContinuousSpec,
    learned: Option<MonotoneGamma>,
}

/// What the schedule's backward passes need from one forward.
pub(crate) struct ScheduleGraph {
    /// The schedule evaluated on the step's times, as a function of its variables.
    eval: GammaEval,
    /// Leaf copies that the loss was built on: gamma, gamma', gamma(0), gamma(1).
    leaves: [Var; 4],
    /// Per-example diffusion term (bits/dim), detached.
    diffusion: Tensor,
}

/// One micro-batch's loss and what is logged about it.
pub(crate) struct ContinuousStep {
    pub(crate) loss: Tensor,
    pub(crate) per_example: Vec<f64>,
    pub(crate) buckets: Vec<usize>,
    pub(crate) stats: StepStats,
    pub(crate) graph: Option<ScheduleGraph>,
}

impl Continuous {
    /// The learned schedule's initial values for a seed (VDM's initialisation, our RNG).
    pub(crate) fn initial_params(
        spec: &ContinuousSpec,
        hidden: usize,
        seed: u64,
    ) -> MonotoneGammaInit {
        let mut z = vec![0f32; 3 * hidden];
        StreamKey::new(seed, Stream::ScheduleInit, 0, 0).fill_normal(&mut z);
        let z: Vec<f64> = z.into_iter().map(f64::from).collect();
        MonotoneGammaInit::vdm(hidden, spec.gamma_min, spec.gamma_max, &z, INIT_SCALE)
    }

    pub(crate) fn new(spec: ContinuousSpec, seed: u64, device: &Device) -> Result<Self> {
        let learned = match spec.schedule {
            ContinuousSchedule::Learned { hidden } => {
                let p = Self::initial_params(&spec, hidden, seed);
                Some(MonotoneGamma::new(&p, DType::F32, device)?)
            }
            ContinuousSchedule::Fixed(f) => {
                f.validate()?;
                None
            }
        };
        Ok(Self { spec, learned })
    }

    /// The learned schedule's `(name, variable)` pairs (none for a fixed schedule); the trainer
    /// treats them as model parameters (optimiser, EMA, checkpoint, all-reduce).
    pub(crate) fn vars(&self) -> Vec<(String, Var)> {
        self.learned.as_ref().map(|m| m.vars()).unwrap_or_default()
    }

    /// The times of local examples `first..first + b` of a global batch of `n` at `step`.
    pub(crate) fn times(seed: u64, step: u64, first: u64, n: u64, b: usize) -> Vec<f64> {
        let u = StreamKey::new(seed, Stream::Timestep, step, u64::MAX).uniform(0) as f64;
        vdm::low_discrepancy_times(u, first, n, b)
    }

    fn eval(&self, t: &[f64], device: &Device) -> Result<GammaEval> {
        Ok(match &self.learned {
            Some(m) => {
                let tt: Vec<f32> = t.iter().map(|&x| x as f32).collect();
                m.eval(&Tensor::new(tt.as_slice(), device)?)?
            }
            None => self.fixed().eval(t, DType::F32, device)?,
        })
    }

    fn fixed(&self) -> FixedGamma {
        self.spec.initial_fixed()
    }

    /// Forward and loss of one micro-batch. `key` keys the noise like the discrete path's;
    /// `n` is the global batch (for the low-discrepancy times).
    pub(crate) fn forward(
        &self,
        unet: &UNet,
        x0: &Tensor,
        y: Option<&Tensor>,
        ctx: &ForwardCtx,
        key: NoiseKey,
        n: u64,
    ) -> Result<ContinuousStep> {
        let (b, device) = (x0.dim(0)?, x0.device());
        let t = Self::times(key.seed, key.step, key.first_example, n, b);
        let eval = self.eval(&t, device)?;
        let leaf = |x: &Tensor| Var::from_tensor(&x.detach());
        let leaves = [
            leaf(&eval.gamma)?,
            leaf(&eval.dgamma)?,
            leaf(&eval.gamma_0)?,
            leaf(&eval.gamma_1)?,
        ];
        let [g, dg, g0, g1] = leaves.each_ref().map(|v| v.as_tensor().clone());
        let eps = philox_normal(x0.dims(), Stream::Noise as u32, key, device)?;
        let eps0 = philox_normal(x0.dims(), Stream::DecoderNoise as u32, key, device)?;
        let z_t = q_sample(x0, &eps, &g)?;
        let s = &self.spec;
        let scale = 1000.0 / (s.gamma_max - s.gamma_min);
        let t_model = g.affine(scale, -s.gamma_min * scale)?;
        // the loss in f32 whatever the compute precision (`train.precision`)
        let eps_hat = unet.forward(&z_t, &t_model, y, ctx)?.to_dtype(DType::F32)?;
        let prior = vdm::prior_bpd(x0, &g1)?;
        let diffusion = vdm::diffusion_bpd_continuous(&eps, &eps_hat, &dg)?;
        let z0 = q_sample(x0, &eps0, &g0.broadcast_as(b)?.contiguous()?)?;
        let recon = vdm::reconstruction_bpd(x0, &z0, &g0)?;
        let total = prior.add(&diffusion)?.add(&recon)?;
        let mse = ddpm_diffusion::tensor::mean_flat(&eps.sub(&eps_hat)?.sqr()?)?;
        let host =
            |x: &Tensor| -> Result<Vec<f64>> { Ok(x.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
        let (per, mse_h, diff_h) = (host(&total)?, host(&mse)?, host(&diffusion)?);
        let buckets: Vec<usize> = t
            .iter()
            .map(|&x| ((x * T_BUCKETS as f64) as usize).min(T_BUCKETS - 1))
            .collect();
        let mut stats = StepStats::default();
        for i in 0..b {
            stats.add(
                buckets[i],
                T_BUCKETS,
                per[i],
                Some(mse_h[i]),
                Some(diff_h[i]),
            );
        }
        let graph = self.learned.as_ref().map(|_| ScheduleGraph {
            eval,
            leaves,
            diffusion: diffusion.detach(),
        });
        Ok(ContinuousStep {
            loss: total.mean_all()?,
            per_example: per,
            buckets,
            stats,
            graph,
        })
    }

    /// The learned schedule's gradients after the loss's backward pass `gs`: the loss gradient
    /// for the endpoints, the variance gradient for the rest (see the module docs). Returned by
    /// variable id, to be merged with the U-Net's.
    pub(crate) fn schedule_grads(
        &self,
        graph: &ScheduleGraph,
        gs: &GradStore,
    ) -> Result<Vec<(TensorId, Tensor)>> {
        let Some(m) = &self.learned else {
            return Ok(Vec::new());
        };
        let grad = |v: &Var| -> Result<Tensor> {
            Ok(match gs.get(v.as_tensor()) {
                Some(g) => g.detach(),
                None => v.as_tensor().zeros_like()?,
            })
        };
        let [gg, gdg, gg0, gg1] = [
            grad(&graph.leaves[0])?,
            grad(&graph.leaves[1])?,
            grad(&graph.leaves[2])?,
            grad(&graph.leaves[3])?,
        ];
        let e = &graph.eval;
        let dot = |a: &Tensor, b: &Tensor| -> Result<Tensor> { Ok(a.mul(b)?.sum_all()?) };
        // Chain rule of the loss into the schedule: what the endpoints follow.
        let elbo = (dot(&gg, &e.gamma)? + dot(&gdg, &e.dgamma)?)?
            .add(&dot(&gg0, &e.gamma_0)?)?
            .add(&dot(&gg1, &e.gamma_1)?)?;
        // Per-example: d loss / d gamma_i = (1/b) d L_i / d gamma_i, so this surrogate's gradient
        // is (1/b) sum_i 2 L_i dL_i/d eta = d/d eta mean_i(L_i^2).
        let two_l = graph.diffusion.affine(2.0, 0.0)?;
        let var = dot(&two_l, &gg.mul(&e.gamma)?.add(&gdg.mul(&e.dgamma)?)?)?;
        let (ge, gv) = (elbo.backward()?, var.backward()?);
        let mut out = Vec::new();
        for (name, v) in m.vars() {
            let store = if is_endpoint_param(&name) { &ge } else { &gv };
            let g = match store.get(v.as_tensor()) {
                Some(g) => g.detach(),
                None => v.as_tensor().zeros_like()?,
            };
            out.push((v.as_tensor().id(), g));
        }
        Ok(out)
    }
}

/// log-SNR curves for `schedule.png`: the run's schedule (learned: from `params`) and, for
/// reference, the fixed linear and cosine ones between the same initial endpoints.
pub(crate) fn schedule_curves(
    spec: &ContinuousSpec,
    params: Option<&MonotoneGammaInit>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let ts: Vec<f64> = (0..=200).map(|i| i as f64 / 200.0).collect();
    let curve = |f: &dyn Fn(f64) -> f64| ts.iter().map(|&t| (t, -f(t))).collect::<Vec<_>>();
    let (lo, hi) = (spec.gamma_min, spec.gamma_max);
    let lin = FixedGamma::LinearLogSnr {
        gamma_min: lo,
        gamma_max: hi,
    };
    let cos = FixedGamma::Cosine {
        gamma_min: lo,
        gamma_max: hi,
    };
    let mut out = Vec::new();
    if let Some(p) = params {
        out.push(("learned".to_string(), curve(&|t| p.gamma_dgamma(t).0)));
    }
    out.push(("linear".to_string(), curve(&|t| lin.gamma(t))));
    out.push(("cosine".to_string(), curve(&|t| cos.gamma(t))));
    out
}
