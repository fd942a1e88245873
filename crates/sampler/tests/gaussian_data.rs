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
    heun_timesteps, respacing_for, BatchSpec, Denoiser, Guidance, Result, Sampler, SamplerKind,
    SamplerSettings,
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
