//! Every sampler against a case with a known answer: data distributed as N(0, s^2 I), for which the
//! optimal prediction is closed-form, `E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a)` (a = abar_t).
//! Driven by it, every sampler is a linear map of its Gaussian inputs, so its output distribution is
//! known exactly:
//! - deterministic samplers (DDIM eta = 0, DPM-Solver++, Heun) map x_T to `c x_T`; the exact
//!   probability-flow ODE gives `c* = s / sqrt(a0 s^2 + 1 - a0)` from the first timestep a0, and the
//!   solver must get within its discretisation error of it, and DDIM and Heun must match their
//!   discrete schemes computed independently here;
//! - stochastic samplers (DDPM, DDIM eta > 0) give N(0, v) where v follows from the variance
//!   recursion `v <- A_k^2 v + sigma_k^2` of their update; the sample standard deviation must match
//!   sqrt(v) to sampling error, and with all 1000 steps sqrt(v) must be close to s.
//!
//! The eps-, v- and x0-parameterised versions of the same model must agree.

use candle_core::{DType, Device, Tensor};
use ddpm_diffusion::{
    BetaSchedule, GaussianDiffusion, LossType, ModelMeanType, ModelVarType, NoiseSchedule,
};
use ddpm_sampler::{
    edm_churned_levels, heun_timesteps, respacing_for, BatchSpec, Denoiser, EdmChurn, Guidance,
    Predictor, Result, Sampler, SamplerKind, SamplerSettings,
};

const S: f64 = 0.5;

/// The exact denoiser, answering in the parameterisation of `d`.
fn exact_model(d: &GaussianDiffusion) -> impl Denoiser {
    let ac = d.schedule.alphas_cumprod.clone();
    let mean = d.mean_type;
    move |x: &Tensor, t: &[usize], _y: Option<&Tensor>| -> Result<Tensor> {
        let a = ac[t[0]];
        assert!(t.iter().all(|&v| v == t[0]));
        let eps = x.affine((1.0 - a).sqrt() / (a * S * S + 1.0 - a), 0.0)?;
        let x0 = x
            .sub(&eps.affine((1.0 - a).sqrt(), 0.0)?)?
            .affine(1.0 / a.sqrt(), 0.0)?;
        Ok(match mean {
            ModelMeanType::Epsilon => eps,
            ModelMeanType::StartX => x0,
            ModelMeanType::V => eps
                .affine(a.sqrt(), 0.0)?
                .sub(&x0.affine((1.0 - a).sqrt(), 0.0)?)?,
        })
    }
}

fn moments(x: &Tensor) -> (f64, f64) {
    let v: Vec<f64> = x
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

/// x0 = g(a) x_t: the exact posterior mean of x0.
fn g(a: f64) -> f64 {
    a.sqrt() * S * S / (a * S * S + 1.0 - a)
}

/// Output variance of a DDPM / DDIM chain from x_T ~ N(0, 1) on the respaced process `d`.
fn predicted_variance(d: &GaussianDiffusion, ddim_eta: Option<f64>) -> f64 {
    let s = &d.schedule;
    let mut v = 1.0;
    for k in (0..d.num_timesteps()).rev() {
        let (a, ap) = (s.alphas_cumprod[k], s.alphas_cumprod_prev[k]);
        let (coef, var) = match ddim_eta {
            None => {
                let var = match d.var_type {
                    ModelVarType::FixedSmall => s.posterior_variance[k],
                    _ => s.fixed_large_variance[k],
                };
                (
                    s.posterior_mean_coef1[k] * g(a) + s.posterior_mean_coef2[k],
                    var,
                )
            }
            Some(eta) => {
                let h = (1.0 - a.sqrt() * g(a)) / (1.0 - a).sqrt();
                let sigma = eta * ((1.0 - ap) / (1.0 - a)).sqrt() * (1.0 - a / ap).sqrt();
                (
                    ap.sqrt() * g(a) + (1.0 - ap - sigma * sigma).sqrt() * h,
                    sigma * sigma,
                )
            }
        };
        v = coef * coef * v + if k > 0 { var } else { 0.0 };
    }
    v
}

fn batch(dtype: DType, x_init: Option<Tensor>) -> BatchSpec<'static> {
    BatchSpec {
        shape: [16, 1, 16, 16],
        first_index: 0,
        seed: 3,
        labels: None,
        device: Device::Cpu,
        dtype,
        x_init,
    }
}

/// The gain of Karras et al.'s Heun scheme on the scalar ODE `dx/dsigma = eps(x / sqrt(1 + sigma^2))`,
/// written out independently of the sampler, on the sampler's own noise levels.
fn heun_gain(full: &GaussianDiffusion, n: usize) -> f64 {
    let (ts, sigmas) = heun_timesteps(full, n).unwrap();
    let ac = &full.schedule.alphas_cumprod;
    let eps = |x_ve: f64, t: usize, sigma: f64| {
        let a = ac[t];
        (1.0 - a).sqrt() / (a * S * S + 1.0 - a) * x_ve / (1.0 + sigma * sigma).sqrt()
    };
    let mut x = (1.0 + sigmas[0] * sigmas[0]).sqrt();
    for i in 0..ts.len() {
        let (s0, s1) = (sigmas[i], sigmas[i + 1]);
        let d = eps(x, ts[i], s0);
        let euler = x + (s1 - s0) * d;
        x = if s1 > 0.0 {
            x + (s1 - s0) * 0.5 * (d + eps(euler, ts[i + 1], s1))
        } else {
            euler
        };
    }
    x
}

#[test]
fn deterministic_samplers_follow_the_probability_flow() {
    for schedule in [BetaSchedule::Linear, BetaSchedule::Cosine] {
        // (sampler, steps, bound on the discretisation error against the exact ODE)
        for (kind, steps, ode_tol) in [
            (SamplerKind::Ddim, "50", 0.06),
            (SamplerKind::Ddim, "250", 0.015),
            (SamplerKind::DpmSolver, "20", 0.05),
            (SamplerKind::DpmSolver, "50", 0.002),
            (SamplerKind::Heun, "18", 0.06),
            (SamplerKind::Heun, "50", 0.006),
        ] {
            let mut cs = Vec::new();
            for mean in [
                ModelMeanType::Epsilon,
                ModelMeanType::V,
                ModelMeanType::StartX,
            ] {
                let d = GaussianDiffusion::new(
                    NoiseSchedule::new(&schedule, 1000).unwrap(),
                    mean,
                    ModelVarType::FixedSmall,
                    LossType::Mse,
                );
                let ac = d.schedule.alphas_cumprod.clone();
                let model = exact_model(&d);
                let sampler =
                    Sampler::new(d.clone(), SamplerSettings::new(kind).steps(steps)).unwrap();
                let a0 = ac[sampler.model_timesteps()[0]];
                let exact = S / (a0 * S * S + 1.0 - a0).sqrt();
                // the linear map's gain, in f64 from x_T = 1
                let ones = Tensor::ones((16, 1, 16, 16), DType::F64, &Device::Cpu).unwrap();
                let out = sampler
                    .sample(&model, &Guidance::none(), &batch(DType::F64, Some(ones)))
                    .unwrap();
                let (c, spread) = moments(&out);
                assert!(spread < 1e-9, "not a uniform linear map: {spread}");
                // the discrete scheme, computed independently where we can
                let discrete = match kind {
                    SamplerKind::Ddim => {
                        let r = d
                            .respaced(&respacing_for(kind, 1000, Some(steps)).unwrap())
                            .unwrap();
                        Some(predicted_variance(&r, Some(0.0)).sqrt())
                    }
                    SamplerKind::Heun => Some(heun_gain(&d, steps.parse().unwrap())),
                    _ => None, // DPM-Solver++: checked step by step against dpm_solver.json
                };
                let rel = (c - exact).abs() / exact;
                eprintln!("{schedule:?} {kind} {steps:>3} {mean:?}: gain {c:.6}, scheme {discrete:?}, exact ODE {exact:.6}, rel error {rel:.2e}");
                if let Some(p) = discrete {
                    assert!(
                        (c - p).abs() < 1e-9 * p,
                        "{schedule:?} {kind} {steps} {mean:?}: gain {c} vs scheme {p}"
                    );
                }
                assert!(rel < ode_tol, "{schedule:?} {kind} {steps} {mean:?}: gain {c} vs {exact} ({rel:e} > {ode_tol})");
                // and the f32 sampler from seeded noise: std = gain * std(x_T)
                let x = sampler
                    .sample(&model, &Guidance::none(), &batch(DType::F32, None))
                    .unwrap();
                let (_, sz) = moments(&Sampler::noise(&batch(DType::F32, None), 0).unwrap());
                let (m, sd) = moments(&x);
                assert!(
                    m.abs() < 0.04 && (sd / sz - c).abs() < 1e-3 * c,
                    "{kind} {mean:?}: mean {m} std {sd} vs {}",
                    c * sz
                );
                cs.push(c);
            }
            assert!(
                cs.iter().all(|c| (c - cs[0]).abs() < 1e-6 * cs[0]),
                "{kind}: parameterisations differ: {cs:?}"
            );
        }
    }
}

#[test]
fn stochastic_samplers_have_the_predicted_variance() {
    for schedule in [BetaSchedule::Linear, BetaSchedule::Cosine] {
        for (kind, steps, eta, var) in [
            (SamplerKind::Ddpm, "", 0.0, ModelVarType::FixedSmall),
            (SamplerKind::Ddpm, "", 0.0, ModelVarType::FixedLarge),
            (SamplerKind::Ddpm, "250", 0.0, ModelVarType::FixedSmall),
            (SamplerKind::Ddpm, "50", 0.0, ModelVarType::FixedLarge),
            (SamplerKind::Ddim, "50", 1.0, ModelVarType::FixedSmall),
            (SamplerKind::Ddim, "ddim100", 0.5, ModelVarType::FixedSmall),
        ] {
            for mean in [
                ModelMeanType::Epsilon,
                ModelMeanType::V,
                ModelMeanType::StartX,
            ] {
                let full = GaussianDiffusion::new(
                    NoiseSchedule::new(&schedule, 1000).unwrap(),
                    mean,
                    var,
                    LossType::Mse,
                );
                let respaced = full
                    .respaced(&respacing_for(kind, 1000, Some(steps)).unwrap())
                    .unwrap();
                let sd_pred =
                    predicted_variance(&respaced, (kind == SamplerKind::Ddim).then_some(eta))
                        .sqrt();
                let model = exact_model(&full);
                let mut settings = SamplerSettings::new(kind).steps(steps);
                settings.eta = eta;
                let sampler = Sampler::new(full, settings).unwrap();
                let x = sampler
                    .sample(&model, &Guidance::none(), &batch(DType::F32, None))
                    .unwrap();
                let (m, sd) = moments(&x);
                eprintln!("{schedule:?} {kind} {steps:>7} eta={eta} {var:?} {mean:?}: mean {m:+.4} std {sd:.4}, predicted {sd_pred:.4}");
                // 4096 values: standard error of the std ~0.0055 s, of the mean ~0.008.
                assert!(m.abs() < 0.04, "mean {m}");
                assert!(
                    (sd - sd_pred).abs() < 0.03 * sd_pred,
                    "{schedule:?} {kind} {steps} {var:?} {mean:?}: std {sd} vs predicted {sd_pred}"
                );
                if steps.is_empty() {
                    assert!(
                        (sd_pred - S).abs() < 0.015 * S,
                        "{kind} full chain: predicted std {sd_pred}"
                    );
                }
            }
        }
    }
}

/// Output variance of the `sde` chain (Euler-Maruyama or reverse-diffusion predictor) from
/// x_T ~ N(0, 1), written out from Song et al.'s update independently of the sampler: with the exact
/// eps = c_e x every step is `x <- A x + sqrt(beta) z`.
fn sde_variance(full: &GaussianDiffusion, chain: &GaussianDiffusion, predictor: Predictor) -> f64 {
    let mut v = 1.0;
    for k in (0..chain.num_timesteps()).rev() {
        let a_model = full.schedule.alphas_cumprod[chain.timestep_map[k]];
        let c_e = (1.0 - a_model).sqrt() / (a_model * S * S + 1.0 - a_model);
        let beta = chain.schedule.betas[k];
        let score = -c_e / (1.0 - chain.schedule.alphas_cumprod[k]).sqrt();
        let a = match predictor {
            Predictor::EulerMaruyama => 1.0 + 0.5 * beta + beta * score,
            Predictor::ReverseDiffusion => 2.0 - (1.0 - beta).sqrt() + beta * score,
        };
        v = a * a * v + if k > 0 { beta } else { 0.0 };
    }
    v
}

/// Output variance of EDM Algorithm 2 on the sampler's own (churned) levels, written out from the
/// paper: `x_hat = x + sqrt(sh^2 - s^2) S_noise z`, then Euler / Heun with the exact slope.
fn edm_variance(full: &GaussianDiffusion, n: usize, churn: &EdmChurn) -> f64 {
    let (ts, sigmas) = heun_timesteps(full, n).unwrap();
    let hats = edm_churned_levels(full, &ts, &sigmas, churn);
    let ac = &full.schedule.alphas_cumprod;
    // d = g x_ve with g = eps gain / sqrt(1 + sigma^2)
    let g = |t: usize, sigma: f64| {
        let a = ac[t];
        (1.0 - a).sqrt() / (a * S * S + 1.0 - a) / (1.0 + sigma * sigma).sqrt()
    };
    let mut v = 1.0 + sigmas[0] * sigmas[0];
    for i in 0..ts.len() {
        let ((th, sh), s1) = (hats[i], sigmas[i + 1]);
        v += (sh * sh - sigmas[i] * sigmas[i]) * churn.s_noise * churn.s_noise;
        let h = s1 - sh;
        let g0 = g(th, sh);
        let a = if s1 > 0.0 {
            1.0 + 0.5 * h * (g0 + g(ts[i + 1], s1) * (1.0 + h * g0))
        } else {
            1.0 + h * g0
        };
        v *= a * a;
    }
    v
}

/// The score-SDE and EDM stochastic samplers driven by the exact model are linear Gaussian chains:
/// their output std must match the variance recursion of their update to sampling error, and with
/// all 1000 steps (sde) or many levels (edm) the data's std S, the closed form the reverse SDE
/// targets. `pc`'s Langevin step size depends on the noise drawn, so only its full-chain std is
/// compared with S.
#[test]
fn stochastic_sde_samplers_recover_the_data_variance() {
    for schedule in [BetaSchedule::Linear, BetaSchedule::Cosine] {
        let full = GaussianDiffusion::new(
            NoiseSchedule::new(&schedule, 1000).unwrap(),
            ModelMeanType::Epsilon,
            ModelVarType::FixedSmall,
            LossType::Mse,
        );
        let model = exact_model(&full);
        let mut runs: Vec<(String, SamplerSettings, Option<f64>, f64)> = Vec::new();
        for (predictor, steps, to_s) in [
            (Predictor::EulerMaruyama, "", 0.015),
            (Predictor::ReverseDiffusion, "", 0.015),
            (Predictor::EulerMaruyama, "100", 1.0),
            (Predictor::ReverseDiffusion, "50", 1.0),
        ] {
            let mut s = SamplerSettings::new(SamplerKind::Sde).steps(steps);
            s.score_sde.predictor = Some(predictor);
            let chain = full
                .respaced(&respacing_for(SamplerKind::Sde, 1000, Some(steps)).unwrap())
                .unwrap();
            let sd = sde_variance(&full, &chain, predictor).sqrt();
            runs.push((format!("sde {predictor:?} {steps}"), s, Some(sd), to_s));
        }
        for (n, churn, to_s) in [
            (18, EdmChurn::IDDPM, 1.0),
            (100, EdmChurn::IDDPM, 0.015),
            (
                40,
                EdmChurn {
                    s_churn: 10.0,
                    s_noise: 1.007,
                    ..EdmChurn::IDDPM
                },
                1.0,
            ),
        ] {
            let mut s = SamplerSettings::new(SamplerKind::Edm).steps(n.to_string());
            s.churn = Some(churn);
            let sd = edm_variance(&full, n, &churn).sqrt();
            runs.push((format!("edm {n} {churn:?}"), s, Some(sd), to_s));
        }
        let mut pc = SamplerSettings::new(SamplerKind::Pc);
        pc.score_sde.snr = Some(0.16);
        runs.push(("pc 1000".into(), pc, None, 0.03));
        for (what, settings, sd_pred, to_s) in runs {
            let sampler = Sampler::new(full.clone(), settings).unwrap();
            let x = sampler
                .sample(&model, &Guidance::none(), &batch(DType::F32, None))
                .unwrap();
            let (m, sd) = moments(&x);
            eprintln!(
                "{schedule:?} {what}: mean {m:+.4} std {sd:.4}, recursion {sd_pred:?}, data {S}"
            );
            assert!(m.abs() < 0.04, "{what}: mean {m}");
            if let Some(p) = sd_pred {
                assert!(
                    (sd - p).abs() < 0.03 * p,
                    "{schedule:?} {what}: std {sd} vs {p}"
                );
                assert!(
                    (p - S).abs() < to_s * S,
                    "{schedule:?} {what}: predicted {p} vs S"
                );
            } else {
                assert!(
                    (sd - S).abs() < to_s * S,
                    "{schedule:?} {what}: std {sd} vs S"
                );
            }
        }
    }
}
