//! The score-SDE samplers (Song et al. 2021) on a respaced DDPM chain: `sde` (a reverse-SDE predictor
//! alone) and `pc` (predictor + Langevin corrector), and the checks of the stochastic samplers'
//! options (including EDM's churn).
//!
//! The chain's step k is the VP-SDE stepped back by `beta(t) dt = beta'_k` (ddpm-diffusion
//! `steps::sde`); the model is evaluated at the original timestep `timestep_map[k]` and its eps,
//! guided exactly as for DPM-Solver++ and Heun (classifier-free guidance on the output, then
//! `condition_score`), becomes the score `-eps / sqrt(1 - abar'_k)`. At each k, `pc` runs its
//! corrector steps first and the predictor last, as Song et al.'s `pc_sampler` does.
//!
//! Noise: the j-th noise tensor the loop draws (j = 1, 2, ... in sampling order: corrector draws, then
//! the predictor's, for each k from N-1 down to 0) is `Sampler::noise(batch, j)`; the predictor's draw
//! at k = 0 is taken but not added (no noise at the last step).

use candle_core::Tensor;
use ddpm_diffusion::steps::{euler_maruyama_step, langevin_step, reverse_diffusion_step};
use ddpm_diffusion::GaussianDiffusion;

use crate::denoiser::Denoiser;
use crate::error::{Result, SamplerError};
use crate::guidance::{guided_model_output, Guidance};
use crate::sampler::{BatchSpec, Progress, Sampler, SamplerKind, SamplerSettings};
use crate::steps::guided_eps;

/// Which reverse-SDE predictor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predictor {
    /// Euler-Maruyama on the reverse VP-SDE (`sde`'s default).
    EulerMaruyama,
    /// Song et al.'s reverse-diffusion predictor (`pc`'s default, their PC sampler's).
    ReverseDiffusion,
}

impl std::str::FromStr for Predictor {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "euler-maruyama" | "em" | "euler" => Ok(Predictor::EulerMaruyama),
            "reverse-diffusion" | "rd" => Ok(Predictor::ReverseDiffusion),
            other => Err(SamplerError::Config(format!(
                "unknown predictor {other:?} (expected euler-maruyama or reverse-diffusion)"
            ))),
        }
    }
}

/// Langevin signal-to-noise ratio when none is given: score_sde's default config (`sampling.snr`).
pub const DEFAULT_SNR: f64 = 0.16;
/// Corrector steps per noise level when none are given: score_sde's `n_steps_each`.
pub const DEFAULT_CORRECTOR_STEPS: usize = 1;

/// The options of `sde` and `pc`; `None` = the default for the sampler. Other samplers take none.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ScoreSdeOptions {
    pub predictor: Option<Predictor>,
    /// Langevin steps per noise level (`pc` only, at least 1).
    pub corrector_steps: Option<usize>,
    /// The Langevin step-size rule's signal-to-noise ratio r (`pc` only).
    pub snr: Option<f64>,
}

impl ScoreSdeOptions {
    /// `(predictor, corrector steps, snr)` with the defaults of `kind` filled in.
    pub fn resolved(&self, kind: SamplerKind) -> (Predictor, usize, f64) {
        let pc = kind == SamplerKind::Pc;
        let default_predictor = if pc {
            Predictor::ReverseDiffusion
        } else {
            Predictor::EulerMaruyama
        };
        (
            self.predictor.unwrap_or(default_predictor),
            if pc {
                self.corrector_steps.unwrap_or(DEFAULT_CORRECTOR_STEPS)
            } else {
                0
            },
            self.snr.unwrap_or(DEFAULT_SNR),
        )
    }
}

/// Rejects options given to a sampler that does not take them, and out-of-range values.
pub(crate) fn validate_options(s: &SamplerSettings) -> Result<()> {
    let o = &s.score_sde;
    let bad = |what: &str, takes: &str| {
        Err(SamplerError::Config(format!(
            "{what} applies to {takes} only, not {}",
            s.kind
        )))
    };
    let sde = matches!(s.kind, SamplerKind::Sde | SamplerKind::Pc);
    if o.predictor.is_some() && !sde {
        return bad("--predictor", "sde and pc");
    }
    if (o.corrector_steps.is_some() || o.snr.is_some()) && s.kind != SamplerKind::Pc {
        return bad("the Langevin corrector (corrector steps, snr)", "pc");
    }
    if o.corrector_steps == Some(0) {
        return Err(SamplerError::Config(
            "pc needs at least one corrector step (sde is the predictor alone)".into(),
        ));
    }
    if let Some(r) = o.snr.filter(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(SamplerError::Config(format!(
            "the Langevin snr must be > 0, got {r}"
        )));
    }
    if let Some(c) = &s.churn {
        if s.kind != SamplerKind::Edm {
            return bad("S_churn / S_tmin / S_tmax / S_noise", "edm");
        }
        c.validate()?;
    }
    Ok(())
}

impl Sampler {
    /// The `sde` / `pc` loop on the respaced chain `d` (see the module documentation).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sample_sde(
        &self,
        d: &GaussianDiffusion,
        model: &dyn Denoiser,
        guidance: &Guidance<'_>,
        batch: &BatchSpec<'_>,
        labels: Option<&Tensor>,
        mut x: Tensor,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Tensor> {
        let full = &self.full;
        let (predictor, corrector_steps, snr) =
            self.settings.score_sde.resolved(self.settings.kind);
        let b = x.dim(0)?;
        let total = self.num_model_evals();
        let (mut evals, mut draw) = (0usize, 0u64);
        for k in (0..d.num_timesteps()).rev() {
            let t = vec![k; b];
            let t_model = vec![d.timestep_map[k]; b];
            let eps_at = |x: &Tensor| -> Result<Tensor> {
                let out = guided_model_output(model, full, guidance, x, &t_model, labels)?;
                let mut slot = None;
                let g = self.grad(guidance, x, &t_model, labels, &mut slot)?;
                guided_eps(full, &out, x, &t_model, g)
            };
            for _ in 0..corrector_steps {
                let eps = eps_at(&x)?;
                draw += 1;
                let z = Self::noise(batch, draw)?;
                x = langevin_step(&d.schedule, &x, &t, &eps, &z, snr)?.x;
                evals += 1;
                progress(Progress {
                    evals,
                    total,
                    sample: None,
                });
            }
            let eps = eps_at(&x)?;
            draw += 1;
            let z = Self::noise(batch, draw)?;
            x = match predictor {
                Predictor::EulerMaruyama => euler_maruyama_step(&d.schedule, &x, &t, &eps, &z)?,
                Predictor::ReverseDiffusion => {
                    reverse_diffusion_step(&d.schedule, &x, &t, &eps, &z)?
                }
            }
            .x_prev;
            evals += 1;
            progress(Progress {
                evals,
                total,
                sample: Some(&x),
            });
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_diffusion::steps::EdmChurn;
    use ddpm_diffusion::{BetaSchedule, LossType, ModelMeanType, ModelVarType, NoiseSchedule};

    fn full() -> GaussianDiffusion {
        GaussianDiffusion::new(
            NoiseSchedule::new(&BetaSchedule::Cosine, 100).unwrap(),
            ModelMeanType::Epsilon,
            ModelVarType::FixedSmall,
            LossType::Mse,
        )
    }

    fn err(s: SamplerSettings) -> String {
        Sampler::new(full(), s).unwrap_err().to_string()
    }

    #[test]
    fn options_are_checked_against_the_sampler() {
        let mut s = SamplerSettings::new(SamplerKind::Sde);
        s.score_sde.snr = Some(0.1);
        assert!(err(s).contains("applies to pc only"));
        let mut s = SamplerSettings::new(SamplerKind::Ddim);
        s.score_sde.predictor = Some(Predictor::ReverseDiffusion);
        assert!(err(s).contains("sde and pc"));
        let mut s = SamplerSettings::new(SamplerKind::Pc);
        s.score_sde.corrector_steps = Some(0);
        assert!(err(s).contains("at least one corrector step"));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut s = SamplerSettings::new(SamplerKind::Pc);
            s.score_sde.snr = Some(bad);
            assert!(err(s).contains("snr must be > 0"), "{bad}");
        }
        let mut s = SamplerSettings::new(SamplerKind::Heun);
        s.churn = Some(EdmChurn::IDDPM);
        assert!(err(s).contains("applies to edm only"));
        let mut s = SamplerSettings::new(SamplerKind::Edm);
        s.churn = Some(EdmChurn {
            s_tmin: 2.0,
            s_tmax: 1.0,
            ..EdmChurn::IDDPM
        });
        assert!(err(s).contains("S_tmin <= S_tmax"));
        for kind in [SamplerKind::Sde, SamplerKind::Pc, SamplerKind::Edm] {
            let mut s = SamplerSettings::new(kind);
            s.clip_denoised = true;
            assert!(err(s).contains("clipping"), "{kind}");
        }
        let s = SamplerSettings::new(SamplerKind::Edm).steps("10,20");
        assert!(err(s).contains("plain step count"));
        assert!("rd".parse::<Predictor>().is_ok());
        assert!("heun".parse::<Predictor>().is_err());
        for name in ["sde", "pc", "edm"] {
            assert_eq!(name.parse::<SamplerKind>().unwrap().name(), name);
        }
    }

    #[test]
    fn evaluation_counts_and_levels() {
        // sde / pc: respaced like ddpm ("10" includes T-1), corrector steps + 1 evaluations per step
        let sde = Sampler::new(full(), SamplerSettings::new(SamplerKind::Sde).steps("10")).unwrap();
        let ts = sde.model_timesteps();
        assert_eq!((ts.len(), ts[0], ts[9]), (10, 99, 0));
        let mut s = SamplerSettings::new(SamplerKind::Pc).steps("10");
        s.score_sde.corrector_steps = Some(2);
        let pc = Sampler::new(full(), s).unwrap();
        assert_eq!(pc.num_model_evals(), 30);
        assert_eq!(pc.model_timesteps()[..3], [99, 99, 99]);
        let all = Sampler::new(full(), SamplerSettings::new(SamplerKind::Pc)).unwrap();
        assert_eq!(all.num_model_evals(), 200);
        // edm without churn evaluates exactly where heun does; with churn, never at a lower level
        let heun =
            Sampler::new(full(), SamplerSettings::new(SamplerKind::Heun).steps("8")).unwrap();
        let mut s = SamplerSettings::new(SamplerKind::Edm).steps("8");
        s.churn = Some(EdmChurn::NONE);
        let edm0 = Sampler::new(full(), s).unwrap();
        assert_eq!(heun.model_timesteps(), edm0.model_timesteps());
        let edm = Sampler::new(full(), SamplerSettings::new(SamplerKind::Edm).steps("8")).unwrap();
        let (h, e) = (heun.model_timesteps(), edm.model_timesteps());
        assert_eq!(h.len(), e.len());
        assert!(h.iter().zip(&e).all(|(a, b)| b >= a));
        assert!(h.iter().zip(&e).any(|(a, b)| b > a), "no level was churned");
    }
}
