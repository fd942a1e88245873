//! Hand-checked values and finite-difference gradient checks (f64) of the continuous-time math.

use crate::tests::pseudo;
use candle_core::{DType, Device, Tensor};

use super::loss::{alpha_sigma, q_sample};
use super::sample::{ancestral_coefficients, ddim_step, time_grid};
use super::schedule::{is_endpoint_param, PARAM_NAMES};
use super::*;

const CPU: Device = Device::Cpu;

fn t64(v: &[f64]) -> Tensor {
    Tensor::new(v, &CPU).unwrap()
}

fn v64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn params(h: usize, seed: u64) -> MonotoneGammaInit {
    let z = pseudo(3 * h, seed);
    let mut p = MonotoneGammaInit::vdm(h, -9.0, 4.0, &z, 1.5);
    p.w1 = -0.7; // negative raw weights must still give an increasing gamma
    p
}

#[test]
fn variances_and_snr_hand_checked() {
    for g in [-13.3, -2.0, 0.0, 0.5, 5.0, 40.0] {
        assert!((alpha2(g) + sigma2(g) - 1.0).abs() < 1e-15);
        assert!((alpha2(g) / sigma2(g) - snr(g)).abs() <= 1e-13 * snr(g));
        assert!((log_sigmoid(g) - sigma2(g).ln()).abs() < 1e-14);
    }
    assert_eq!(sigma2(0.0), 0.5);
    // sigmoid(-40) is about 4.2e-18 and must not round to 0.
    assert!((sigmoid(-40.0) / (-40.0f64).exp() - 1.0).abs() < 1e-15);
}

#[test]
fn fixed_schedules_hit_their_endpoints_and_derivatives_match() {
    for f in [
        FixedGamma::LinearLogSnr {
            gamma_min: -13.3,
            gamma_max: 5.0,
        },
        FixedGamma::Cosine {
            gamma_min: -13.3,
            gamma_max: 5.0,
        },
    ] {
        assert!((f.gamma(0.0) + 13.3).abs() < 1e-12, "{f:?}");
        assert!((f.gamma(1.0) - 5.0).abs() < 1e-12, "{f:?}");
        for t in [0.01, 0.3, 0.5, 0.77, 0.99] {
            let h = 1e-6;
            let fd = (f.gamma(t + h) - f.gamma(t - h)) / (2.0 * h);
            assert!(
                (fd - f.dgamma(t)).abs() < 1e-6 * fd.abs().max(1.0),
                "{f:?} t={t}"
            );
            assert!(f.dgamma(t) > 0.0);
        }
    }
    // The cosine one is alpha = cos(u), sigma = sin(u) on the truncated range.
    let f = FixedGamma::Cosine {
        gamma_min: -13.3,
        gamma_max: 5.0,
    };
    let (a, b) = ((-6.65f64).exp().atan(), 2.5f64.exp().atan());
    let u = a + (b - a) * 0.4;
    assert!((alpha2(f.gamma(0.4)) - u.cos().powi(2)).abs() < 1e-14);
    let bad = FixedGamma::LinearLogSnr {
        gamma_min: 1.0,
        gamma_max: 1.0,
    };
    assert!(bad.validate().is_err());
}

#[test]
fn monotone_gamma_tensor_matches_host_and_is_increasing() {
    let p = params(16, 3);
    let m = MonotoneGamma::new(&p, DType::F64, &CPU).unwrap();
    let ts: Vec<f64> = (0..=20).map(|i| i as f64 / 20.0).collect();
    let e = m.eval(&t64(&ts)).unwrap();
    let (g, dg) = (v64(&e.gamma), v64(&e.dgamma));
    for (i, &t) in ts.iter().enumerate() {
        let (hg, hdg) = p.gamma_dgamma(t);
        assert!(
            (g[i] - hg).abs() < 1e-12 && (dg[i] - hdg).abs() < 1e-12,
            "t={t}"
        );
        assert!(dg[i] > 0.0);
        if i > 0 {
            assert!(g[i] > g[i - 1]);
        }
    }
    assert!((g[0] + 9.0).abs() < 1e-12 && (g[20] - 4.0).abs() < 1e-12);
    assert_eq!(v64(&e.gamma_0), vec![-9.0]);
    assert_eq!(v64(&e.gamma_1), vec![4.0]);
    // Checkpoint round trip.
    let back = m.params().unwrap();
    assert_eq!(back, p);
    let names: Vec<String> = m.vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, PARAM_NAMES.map(String::from).to_vec());
}

#[test]
fn monotone_gamma_derivative_in_t_matches_finite_differences() {
    let p = params(8, 11);
    for t in [0.0, 0.2, 0.5, 0.9, 1.0] {
        let h = 1e-6;
        let fd = (p.gamma_dgamma(t + h).0 - p.gamma_dgamma(t - h).0) / (2.0 * h);
        let an = p.gamma_dgamma(t).1;
        assert!(
            (fd - an).abs() < 1e-6 * an.abs().max(1.0),
            "t={t}: {fd} vs {an}"
        );
    }
}

/// Perturbs entry `k` of parameter `name` (host copy) by `d`.
fn nudge(p: &MonotoneGammaInit, name: &str, k: usize, d: f64) -> MonotoneGammaInit {
    let mut q = p.clone();
    match name {
        "noise_schedule.gamma_0" => q.gamma_0 += d,
        "noise_schedule.gamma_1" => q.gamma_1 += d,
        "noise_schedule.l1.weight" => q.w1 += d,
        "noise_schedule.l2.bias" => q.b2[k] += d,
        "noise_schedule.l2.weight" => q.w2[k] += d,
        "noise_schedule.l3.weight" => q.w3[k] += d,
        other => panic!("unknown parameter {other}"),
    }
    q
}

/// Compares candle's gradient of `objective(tensor eval)` with central differences of
/// `host(params)` for every entry of every parameter.
fn check_param_grads(
    p: &MonotoneGammaInit,
    objective: impl Fn(&MonotoneGamma) -> Tensor,
    host: impl Fn(&MonotoneGammaInit) -> f64,
    tol: f64,
) {
    let m = MonotoneGamma::new(p, DType::F64, &CPU).unwrap();
    let grads = objective(&m).backward().unwrap();
    for (name, var) in m.vars() {
        let g = v64(grads
            .get(var.as_tensor())
            .expect("every parameter gets a gradient"));
        for (k, &gk) in g.iter().enumerate() {
            let h = 1e-6;
            let fd = (host(&nudge(p, &name, k, h)) - host(&nudge(p, &name, k, -h))) / (2.0 * h);
            assert!(
                (fd - gk).abs() <= tol * fd.abs().max(1.0),
                "{name}[{k}]: autograd {gk}, finite differences {fd}"
            );
        }
    }
}

#[test]
fn monotone_gamma_parameter_gradients_match_finite_differences() {
    let p = params(6, 5);
    let ts = [0.05, 0.4, 0.81];
    let (c, d) = ([0.3, -1.2, 0.7], [0.9, 0.4, -0.25]);
    check_param_grads(
        &p,
        |m| {
            let e = m.eval(&t64(&ts)).unwrap();
            let a = e.gamma.mul(&t64(&c)).unwrap().sum_all().unwrap();
            let b = e.dgamma.mul(&t64(&d)).unwrap().sum_all().unwrap();
            (a + b).unwrap()
        },
        |q| {
            (0..3)
                .map(|i| {
                    let (g, dg) = q.gamma_dgamma(ts[i]);
                    c[i] * g + d[i] * dg
                })
                .sum()
        },
        1e-7,
    );
}

/// A fake denoiser that depends on the noise level: `eps_hat = 0.3 z + 0.1 gamma`.
fn fake_eps_hat(z: &Tensor, gamma: &Tensor) -> Tensor {
    let mut shape = vec![1usize; z.rank()];
    shape[0] = gamma.dim(0).unwrap();
    let g = gamma.reshape(shape).unwrap();
    z.affine(0.3, 0.0)
        .unwrap()
        .broadcast_add(&g.affine(0.1, 0.0).unwrap())
        .unwrap()
}

struct Example {
    x: Vec<f64>,
    eps: Vec<f64>,
    eps0: Vec<f64>,
    t: f64,
}

fn example(seed: u64, t: f64) -> Example {
    let d = 12;
    let x: Vec<f64> = pseudo(d, seed)
        .iter()
        .map(|v| (v * 127.5).round() / 127.5)
        .collect();
    Example {
        x,
        eps: pseudo(d, seed + 1).iter().map(|v| 1.7 * v).collect(),
        eps0: pseudo(d, seed + 2).iter().map(|v| 1.7 * v).collect(),
        t,
    }
}

fn host_elbo(q: &MonotoneGammaInit, ex: &[Example]) -> f64 {
    ex.iter()
        .map(|e| {
            let (g, dg) = q.gamma_dgamma(e.t);
            let (a, s) = (alpha2(g).sqrt(), sigma2(g).sqrt());
            let z: Vec<f64> = e.x.iter().zip(&e.eps).map(|(x, n)| a * x + s * n).collect();
            let eh: Vec<f64> = z.iter().map(|v| 0.3 * v + 0.1 * g).collect();
            let (a0, s0) = (alpha2(q.gamma_0).sqrt(), sigma2(q.gamma_0).sqrt());
            let z0: Vec<f64> =
                e.x.iter()
                    .zip(&e.eps0)
                    .map(|(x, n)| a0 * x + s0 * n)
                    .collect();
            prior_bpd_f64(&e.x, q.gamma_1)
                + diffusion_bpd_continuous_f64(&e.eps, &eh, dg)
                + reconstruction_bpd_f64(&e.x, &z0, q.gamma_0)
        })
        .sum()
}

fn tensor_elbo(m: &MonotoneGamma, ex: &[Example]) -> Tensor {
    let n = ex.len();
    let stack = |f: &dyn Fn(&Example) -> &Vec<f64>| {
        let v: Vec<f64> = ex.iter().flat_map(|e| f(e).clone()).collect();
        Tensor::from_vec(v, (n, 3, 2, 2), &CPU).unwrap()
    };
    let (x, eps, eps0) = (stack(&|e| &e.x), stack(&|e| &e.eps), stack(&|e| &e.eps0));
    let ts: Vec<f64> = ex.iter().map(|e| e.t).collect();
    let e = m.eval(&t64(&ts)).unwrap();
    let z = q_sample(&x, &eps, &e.gamma).unwrap();
    let eh = fake_eps_hat(&z, &e.gamma);
    let z0 = q_sample(
        &x,
        &eps0,
        &e.gamma_0.broadcast_as(n).unwrap().contiguous().unwrap(),
    )
    .unwrap();
    let terms = [
        prior_bpd(&x, &e.gamma_1).unwrap(),
        diffusion_bpd_continuous(&eps, &eh, &e.dgamma).unwrap(),
        reconstruction_bpd(&x, &z0, &e.gamma_0).unwrap(),
    ];
    (&terms[0] + &terms[1])
        .unwrap()
        .add(&terms[2])
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn continuous_loss_tensor_matches_host_and_its_gradient_matches_finite_differences() {
    // Wide, shallow endpoints so the reconstruction term is smooth (no 1e-12 floor).
    let mut p = params(5, 21);
    p.gamma_0 = -3.0;
    let ex = [example(40, 0.15), example(50, 0.6), example(60, 0.93)];
    let m = MonotoneGamma::new(&p, DType::F64, &CPU).unwrap();
    let got = v64(&tensor_elbo(&m, &ex))[0];
    let want = host_elbo(&p, &ex);
    assert!(
        (got - want).abs() < 1e-12 * want.abs().max(1.0),
        "{got} vs {want}"
    );
    check_param_grads(&p, |m| tensor_elbo(m, &ex), |q| host_elbo(q, &ex), 1e-6);
}

#[test]
fn prior_kl_closed_form() {
    // x = 0: KL = 0.5 (sigma^2 - ln sigma^2 - 1) nats per dimension.
    let g = 2.0;
    let s2 = 1.0 / (1.0 + (-2.0f64).exp());
    let want = 0.5 * (s2 - s2.ln() - 1.0) / std::f64::consts::LN_2;
    assert!((prior_bpd_f64(&[0.0, 0.0], g) - want).abs() < 1e-15);
    let tens = prior_bpd(
        &Tensor::zeros((1, 2), DType::F64, &CPU).unwrap(),
        &t64(&[g]),
    )
    .unwrap();
    assert!((v64(&tens)[0] - want).abs() < 1e-15);
}

#[test]
fn discrete_term_tends_to_the_continuous_one() {
    let f = FixedGamma::Cosine {
        gamma_min: -13.3,
        gamma_max: 5.0,
    };
    let (eps, eh) = ([0.4, -1.0, 2.0], [0.1, -0.7, 1.5]);
    let cont = diffusion_bpd_continuous_f64(&eps, &eh, f.dgamma(0.5));
    // expm1(gamma_t - gamma_s) T = gamma' (1 + gamma' / (2T) + ..): the gap is about
    // gamma'(0.5) / (2T) = 3.1 / T here, and must shrink 100x from T = 1e3 to T = 1e5.
    let mut gaps = Vec::new();
    for big_t in [1000usize, 100_000] {
        let t = discretize_time(0.5, big_t);
        let s = t - 1.0 / big_t as f64;
        let disc = diffusion_bpd_discrete_f64(&eps, &eh, f.gamma(t), f.gamma(s), big_t);
        let gap = disc / cont - 1.0;
        assert!(
            gap > 0.0 && gap < 4.0 / big_t as f64,
            "T={big_t}: {disc} vs {cont}"
        );
        gaps.push(gap);
    }
    assert!((gaps[0] / gaps[1] - 100.0).abs() < 1.0, "{gaps:?}");
    assert_eq!(discretize_time(0.0, 10), 0.1);
    assert_eq!(discretize_time(1.0, 10), 1.0);
    assert_eq!(discretize_time(0.31, 10), 0.4);
}

#[test]
fn low_discrepancy_times_cover_every_bin_once() {
    let n = 16u64;
    let mut all = low_discrepancy_times(0.73, 0, n, 7);
    all.extend(low_discrepancy_times(0.73, 7, n, 9));
    let mut bins: Vec<usize> = all.iter().map(|t| (t * n as f64) as usize).collect();
    bins.sort();
    assert_eq!(bins, (0..n as usize).collect::<Vec<_>>());
    assert!(all.iter().all(|t| (0.0..1.0).contains(t)));
}

#[test]
fn sampler_steps_are_exact_for_the_true_noise() {
    let x = t64(&[0.5, -0.25, 1.0, -1.0]).reshape((1, 4)).unwrap();
    let eps = t64(&[0.3, 1.1, -0.6, 0.2]).reshape((1, 4)).unwrap();
    let (gt, gs) = (1.5, -4.0);
    let zt = q_sample(&x, &eps, &t64(&[gt])).unwrap();
    let zs = ddim_step(&zt, &eps, gt, gs, false).unwrap();
    let want = q_sample(&x, &eps, &t64(&[gs])).unwrap();
    for (a, b) in v64(&zs).iter().zip(v64(&want)) {
        assert!((a - b).abs() < 1e-14);
    }
    // The ancestral posterior has the right variance: a^2 sigma_t^2 ... reduces to sigma_s^2 overall.
    let [a, b, c] = ancestral_coefficients(gt, gs).unwrap();
    let (st2, ss2) = (sigma2(gt), sigma2(gs));
    // Var(z_s | x) = (a sigma_t - b)^2 + c^2 when z_t = alpha_t x + sigma_t eps.
    let var = (a * st2.sqrt() - b).powi(2) + c * c;
    assert!((var - ss2).abs() < 1e-14, "{var} vs {ss2}");
    assert!(ancestral_coefficients(gs, gt).is_err());
    assert_eq!(time_grid(2).unwrap(), vec![1.0, 0.5, 0.0]);
    let (al, si) = alpha_sigma(&t64(&[0.0]), &x).unwrap();
    assert!(
        (v64(&al)[0] - 0.5f64.sqrt()).abs() < 1e-15 && (v64(&si)[0] - 0.5f64.sqrt()).abs() < 1e-15
    );
}

#[test]
fn endpoint_parameters_are_named() {
    assert!(is_endpoint_param("noise_schedule.gamma_0"));
    assert!(is_endpoint_param("noise_schedule.gamma_1"));
    assert!(!is_endpoint_param("noise_schedule.l2.weight"));
}
