//! Hand-checked behaviour of the process, losses and sampler steps (the reference vectors are checked by
//! the `conformance` test of `ddpm-tests`).

use candle_core::{DType, Device, Tensor, Var};

use crate::steps::{
    cfg_combine, cfg_combine_model_output, condition_mean, ddim_step, ddpm_step, DpmSolverPp2m,
};
use crate::*;

fn dev() -> Device {
    Device::Cpu
}

/// Deterministic pseudo-random values in [-1, 1] (no RNG dependency needed for these tests).
pub(crate) fn pseudo(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(pseudo(n, seed), shape.to_vec(), &dev()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .sub(&b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn diffusion(
    kind: BetaSchedule,
    t: usize,
    mean: ModelMeanType,
    var: ModelVarType,
) -> GaussianDiffusion {
    GaussianDiffusion::new(
        NoiseSchedule::new(&kind, t).unwrap(),
        mean,
        var,
        LossType::Mse,
    )
}

const SHAPE: [usize; 4] = [3, 2, 4, 4];

#[test]
fn q_sample_hand_checked() {
    // betas [0.5, 0.5]: ac = [0.5, 0.25]; at t = 1, x_t = 0.5 x0 + sqrt(0.75) noise.
    let s = NoiseSchedule::from_betas(vec![0.5, 0.5]).unwrap();
    let d = GaussianDiffusion::new(
        s,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
        LossType::Mse,
    );
    let x0 = Tensor::new(&[[2.0f64]], &dev()).unwrap();
    let noise = Tensor::new(&[[1.0f64]], &dev()).unwrap();
    let xt = d
        .q_sample(&x0, &[1], &noise)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()[0][0];
    assert!((xt - (1.0 + 0.75f64.sqrt())).abs() < 1e-15);
    // A tiny first beta leaves x_0 almost untouched.
    let s = NoiseSchedule::from_betas(vec![1e-12, 0.5]).unwrap();
    let d = GaussianDiffusion::new(
        s,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
        LossType::Mse,
    );
    let xt = d
        .q_sample(&x0, &[0], &noise)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()[0][0];
    assert!((xt - 2.0).abs() < 2e-6);
}

#[test]
fn conversions_round_trip() {
    let d = diffusion(
        BetaSchedule::Cosine,
        1000,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
    );
    let x0 = tensor(&SHAPE, 1);
    let eps = tensor(&SHAPE, 2);
    let t = [0, 500, 900];
    let xt = d.q_sample(&x0, &t, &eps).unwrap();
    assert!(max_abs_diff(&d.predict_xstart_from_eps(&xt, &t, &eps).unwrap(), &x0) < 1e-12);
    assert!(max_abs_diff(&d.predict_eps_from_xstart(&xt, &t, &x0).unwrap(), &eps) < 1e-10);
    let v = d.v_target(&x0, &eps, &t).unwrap();
    assert!(max_abs_diff(&d.predict_xstart_from_v(&xt, &t, &v).unwrap(), &x0) < 1e-14);
    assert!(max_abs_diff(&d.predict_eps_from_v(&xt, &t, &v).unwrap(), &eps) < 1e-14);
}

#[test]
fn posterior_at_t0_is_the_data() {
    let d = diffusion(
        BetaSchedule::Linear,
        1000,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
    );
    let x0 = tensor(&SHAPE, 3);
    let xt = tensor(&SHAPE, 4);
    let (mean, var, _) = d.q_posterior_mean_variance(&x0, &xt, &[0, 0, 0]).unwrap();
    // coef1[0] = beta_0 / (1 - (1 - beta_0)) is 1 up to the rounding of 1 - beta_0 (~1e-12 relative).
    assert!(max_abs_diff(&mean, &x0) < 1e-11);
    assert_eq!(
        var.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        vec![0.0; 3]
    );
}

#[test]
fn f32_and_f64_paths_agree() {
    for mean in [
        ModelMeanType::Epsilon,
        ModelMeanType::V,
        ModelMeanType::StartX,
    ] {
        let mut d = diffusion(BetaSchedule::Cosine, 1000, mean, ModelVarType::LearnedRange);
        d.loss_type = LossType::RescaledMse;
        let x0 = tensor(&SHAPE, 5);
        let noise = tensor(&SHAPE, 6);
        let out = tensor(&[3, 4, 4, 4], 7);
        let t = [0, 17, 600];
        let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let xt64 = d.q_sample(&x0, &t, &noise).unwrap();
        let xt32 = d.q_sample(&f(&x0), &t, &f(&noise)).unwrap();
        assert_eq!(xt32.dtype(), DType::F32);
        assert!(max_abs_diff(&xt64, &xt32) < 1e-6);
        let p64 = d.p_mean_variance(&out, &xt64, &t, true).unwrap();
        let p32 = d.p_mean_variance(&f(&out), &xt32, &t, true).unwrap();
        assert!(max_abs_diff(&p64.mean, &p32.mean) < 1e-5);
        assert!(max_abs_diff(&p64.log_variance, &p32.log_variance) < 1e-5);
        // At t = 0 the loss is the decoder NLL of a random prediction far from the data, whose bin
        // masses underflow differently in f32; compare the losses at t > 0.
        let t = [1, 17, 600];
        let xt64 = d.q_sample(&x0, &t, &noise).unwrap();
        let xt32 = d.q_sample(&f(&x0), &t, &f(&noise)).unwrap();
        let l64 = d.training_losses(&out, &x0, &xt64, &noise, &t).unwrap();
        let l32 = d
            .training_losses(&f(&out), &f(&x0), &xt32, &f(&noise), &t)
            .unwrap();
        assert_eq!(l32.loss.dtype(), DType::F32);
        let rel = max_abs_diff(&l64.loss, &l32.loss)
            / l64
                .loss
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
        assert!(rel < 1e-5, "{mean:?}: rel {rel}");
    }
}

#[test]
fn mse_is_zero_for_a_perfect_prediction() {
    for mean in [
        ModelMeanType::Epsilon,
        ModelMeanType::V,
        ModelMeanType::StartX,
    ] {
        let d = diffusion(BetaSchedule::Linear, 1000, mean, ModelVarType::FixedLarge);
        let x0 = tensor(&SHAPE, 8);
        let noise = tensor(&SHAPE, 9);
        let t = [3, 400, 999];
        let xt = d.q_sample(&x0, &t, &noise).unwrap();
        let target = d.training_target(&x0, &noise, &t).unwrap();
        let l = d.training_losses(&target, &x0, &xt, &noise, &t).unwrap();
        assert!(l.vb.is_none());
        assert_eq!(l.loss.to_vec1::<f64>().unwrap(), vec![0.0; 3]);
    }
}

#[test]
fn min_snr_weights_scale_the_mse() {
    let d = diffusion(
        BetaSchedule::Cosine,
        1000,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
    )
    .with_min_snr_gamma(Some(5.0))
    .unwrap();
    let x0 = tensor(&SHAPE, 10);
    let noise = tensor(&SHAPE, 11);
    let out = tensor(&SHAPE, 12);
    let t = [0, 500, 999];
    let xt = d.q_sample(&x0, &t, &noise).unwrap();
    let l = d.training_losses(&out, &x0, &xt, &noise, &t).unwrap();
    let w = d.min_snr_weights(&t, 5.0).unwrap();
    assert!(w[0] < 1e-3 && w[2] == 1.0);
    let mse = l.mse.to_vec1::<f64>().unwrap();
    let loss = l.loss.to_vec1::<f64>().unwrap();
    for i in 0..3 {
        assert!((loss[i] - w[i] * mse[i]).abs() < 1e-15);
    }
    assert!(d.clone().with_min_snr_gamma(Some(0.0)).is_err());
}

#[test]
fn hybrid_loss_detaches_the_mean_in_the_vb_term() {
    let mut d = diffusion(
        BetaSchedule::Cosine,
        1000,
        ModelMeanType::Epsilon,
        ModelVarType::LearnedRange,
    );
    d.loss_type = LossType::RescaledMse;
    let x0 = tensor(&SHAPE, 13);
    let noise = tensor(&SHAPE, 14);
    let t = [0, 10, 700];
    let xt = d.q_sample(&x0, &t, &noise).unwrap();
    let out = Var::from_tensor(&tensor(&[3, 4, 4, 4], 15)).unwrap();
    let l = d
        .training_losses(out.as_tensor(), &x0, &xt, &noise, &t)
        .unwrap();
    let vb = l.vb.unwrap();
    let grads = vb.sum_all().unwrap().backward().unwrap();
    let g = grads.get(out.as_tensor()).unwrap();
    let g_mean = g.narrow(1, 0, 2).unwrap().abs().unwrap().sum_all().unwrap();
    let g_var = g.narrow(1, 2, 2).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(g_mean.to_scalar::<f64>().unwrap(), 0.0);
    assert!(g_var.to_scalar::<f64>().unwrap() > 0.0);
    // The full loss trains the mean through the MSE term.
    let grads = l.loss.sum_all().unwrap().backward().unwrap();
    let g = grads.get(out.as_tensor()).unwrap();
    let g_mean = g.narrow(1, 0, 2).unwrap().abs().unwrap().sum_all().unwrap();
    assert!(g_mean.to_scalar::<f64>().unwrap() > 0.0);
}

#[test]
fn sharp_decoder_at_the_data_has_zero_bits_per_dim() {
    // x0 on the 8-bit grid, model predicts x0 with log-variance -30 (std 3e-7): L_0 ~ 0 bits/dim.
    let mut d = diffusion(
        BetaSchedule::Cosine,
        1000,
        ModelMeanType::StartX,
        ModelVarType::Learned,
    );
    d.loss_type = LossType::Kl;
    let vals: Vec<f64> = pseudo(96, 16)
        .iter()
        .map(|v| ((v + 1.0) * 127.5).round() / 127.5 - 1.0)
        .collect();
    let x0 = Tensor::from_vec(vals, SHAPE.to_vec(), &dev()).unwrap();
    let xt = d.q_sample(&x0, &[0; 3], &tensor(&SHAPE, 17)).unwrap();
    let out = Tensor::cat(
        &[&x0, &x0.ones_like().unwrap().affine(-30.0, 0.0).unwrap()],
        1,
    )
    .unwrap();
    let v = d.vb_terms(&out, &x0, &xt, &[0; 3], false).unwrap();
    for b in v.output.to_vec1::<f64>().unwrap() {
        assert!(b.abs() < 1e-9, "{b}");
    }
    // The prior term of a 1000-step cosine schedule is ~5e-10 bits/dim.
    let prior = d.prior_bpd(&x0).unwrap().to_vec1::<f64>().unwrap();
    assert!(prior.iter().all(|&p| (0.0..1e-8).contains(&p)));
}

#[test]
fn oracle_model_has_zero_kl_terms_and_a_complete_bound() {
    // With the true noise as eps prediction the model mean is the true posterior mean, so every
    // L_{t-1} (t >= 1) vanishes and the bound is prior + decoder.
    let d = diffusion(
        BetaSchedule::Cosine,
        20,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
    );
    let x0 = tensor(&SHAPE, 18);
    let noise = tensor(&SHAPE, 19);
    let mut acc = ElboAccumulator::new(20, 3);
    for t in (0..20).rev() {
        let ts = [t; 3];
        let xt = d.q_sample(&x0, &ts, &noise).unwrap();
        let term = d
            .calc_bpd_term(&noise, &x0, &xt, &noise, &ts, false)
            .unwrap();
        assert!(term
            .mse
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .all(|&m| m < 1e-20));
        acc.add(t, &term.vb.to_vec1::<f64>().unwrap()).unwrap();
    }
    let prior = d.prior_bpd(&x0).unwrap().to_vec1::<f64>().unwrap();
    let e = acc.finish(&prior).unwrap();
    for i in 0..3 {
        assert!(e.kl_bpd[i].abs() < 1e-9, "{}", e.kl_bpd[i]);
        assert!(e.decoder_bpd[i] > 0.0);
        assert!((e.total_bpd[i] - (e.prior_bpd[i] + e.decoder_bpd[i] + e.kl_bpd[i])).abs() < 1e-12);
    }
}

#[test]
fn respacing_maps_model_timesteps() {
    let d = diffusion(
        BetaSchedule::Linear,
        1000,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
    );
    let r = d.respace("ddim10").unwrap();
    assert_eq!(r.num_timesteps(), 10);
    assert_eq!(r.model_timesteps(&[0, 9]).unwrap(), vec![0.0, 900.0]);
    let rr = r.respace("5").unwrap();
    // 5 of 10: positions 0, 2.25, 4.5, 6.75, 9 round (half to even) to 0, 2, 4, 7, 9.
    assert_eq!(rr.timestep_map, vec![0, 200, 400, 700, 900]);
    let scaled = r.clone().with_rescale_timesteps(true);
    assert_eq!(scaled.model_timesteps(&[9]).unwrap(), vec![900.0]);
    let d4000 = diffusion(
        BetaSchedule::Cosine,
        4000,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
    )
    .with_rescale_timesteps(true);
    assert_eq!(d4000.model_timesteps(&[2000]).unwrap(), vec![500.0]);
    assert!(r.model_timesteps(&[10]).is_err());
    let tt = r
        .model_timestep_tensor(&[1, 2], DType::F32, &dev())
        .unwrap();
    assert_eq!(tt.to_vec1::<f32>().unwrap(), vec![100.0, 200.0]);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let d = diffusion(
        BetaSchedule::Linear,
        100,
        ModelMeanType::Epsilon,
        ModelVarType::LearnedRange,
    );
    let x = tensor(&SHAPE, 20);
    // Wrong channel count for a learned variance, t out of range, wrong number of timesteps.
    assert!(d.p_mean_variance(&x, &x, &[0, 1, 2], false).is_err());
    let out = tensor(&[3, 4, 4, 4], 21);
    assert!(d.p_mean_variance(&out, &x, &[0, 1, 100], false).is_err());
    assert!(d.p_mean_variance(&out, &x, &[0, 1], false).is_err());
    assert!(d
        .q_sample(&x, &[0, 1, 2], &tensor(&[3, 2, 4, 5], 22))
        .is_err());
}

#[test]
fn ddpm_step_adds_no_noise_at_t0() {
    let d = diffusion(
        BetaSchedule::Cosine,
        100,
        ModelMeanType::Epsilon,
        ModelVarType::FixedLarge,
    );
    let x = tensor(&SHAPE, 23);
    let eps = tensor(&SHAPE, 24);
    let z = tensor(&SHAPE, 25);
    let s = ddpm_step(&d, &eps, &x, &[0, 0, 0], &z, true, None).unwrap();
    assert_eq!(max_abs_diff(&s.x_prev, &s.out.mean), 0.0);
    let s = ddpm_step(&d, &eps, &x, &[5, 5, 5], &z, true, None).unwrap();
    assert!(max_abs_diff(&s.x_prev, &s.out.mean) > 1e-3);
}

#[test]
fn ddim_eta0_with_the_true_noise_walks_the_forward_marginals() {
    let d = diffusion(
        BetaSchedule::Cosine,
        1000,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
    )
    .respace("ddim20")
    .unwrap();
    let x0 = tensor(&SHAPE, 26);
    let eps = tensor(&SHAPE, 27);
    let k = [19, 7, 1];
    let xt = d.q_sample(&x0, &k, &eps).unwrap();
    let s = ddim_step(&d, &eps, &xt, &k, false, 0.0, None).unwrap();
    let want = d.q_sample(&x0, &[18, 6, 0], &eps).unwrap();
    assert!(max_abs_diff(&s.x_prev, &want) < 1e-10);
    assert_eq!(s.sigma, vec![0.0; 3]);
    assert!(ddim_step(&d, &eps, &xt, &k, false, 1.0, None).is_err());
}

#[test]
fn dpm_solver_with_the_true_noise_is_exact() {
    // With the exact eps of a fixed (x0, noise) pair the x0 prediction is exact at every step, so the
    // solver lands on x0 with no discretisation error.
    let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000).unwrap();
    let x0 = tensor(&SHAPE, 28);
    let noise = tensor(&SHAPE, 29);
    let mut solver = DpmSolverPp2m::new(&s, 10).unwrap();
    let a0 = solver.alpha_t[0];
    let s0 = solver.sigma_t[0];
    let mut x = x0
        .affine(a0, 0.0)
        .unwrap()
        .add(&noise.affine(s0, 0.0).unwrap())
        .unwrap();
    let mut orders = Vec::new();
    while solver.current_timestep().is_some() {
        let i = solver.step_index();
        let (a, sg) = (solver.alpha_t[i], solver.sigma_t[i]);
        let eps = x
            .sub(&x0.affine(a, 0.0).unwrap())
            .unwrap()
            .affine(1.0 / sg, 0.0)
            .unwrap();
        let step = solver.step(&eps, &x).unwrap();
        assert!(max_abs_diff(&step.x0_pred, &x0) < 1e-9);
        orders.push(step.order);
        x = step.x_next;
    }
    assert_eq!(orders, vec![1, 2, 2, 2, 2, 2, 2, 2, 2, 1]);
    assert!(max_abs_diff(&x, &x0) < 1e-9);
    assert!(solver.step(&x, &x).is_err());
}

#[test]
fn guidance_special_cases() {
    let c = tensor(&SHAPE, 30);
    let u = tensor(&SHAPE, 31);
    assert_eq!(max_abs_diff(&cfg_combine(&c, &u, 0.0).unwrap(), &c), 0.0);
    let zero = c.zeros_like().unwrap();
    let var = tensor(&SHAPE, 32).abs().unwrap();
    assert_eq!(
        max_abs_diff(&condition_mean(&c, &var, &zero, 3.0).unwrap(), &c),
        0.0
    );
    // Learned-sigma outputs: the mean half is guided, the variance half comes from the conditional pass.
    let d = diffusion(
        BetaSchedule::Linear,
        100,
        ModelMeanType::Epsilon,
        ModelVarType::LearnedRange,
    );
    let oc = tensor(&[3, 4, 4, 4], 33);
    let ou = tensor(&[3, 4, 4, 4], 34);
    let g = cfg_combine_model_output(&d, &oc, &ou, &c, 2.0).unwrap();
    assert_eq!(
        max_abs_diff(&g.narrow(1, 2, 2).unwrap(), &oc.narrow(1, 2, 2).unwrap()),
        0.0
    );
    let want = cfg_combine(
        &oc.narrow(1, 0, 2).unwrap(),
        &ou.narrow(1, 0, 2).unwrap(),
        2.0,
    )
    .unwrap();
    assert_eq!(max_abs_diff(&g.narrow(1, 0, 2).unwrap(), &want), 0.0);
}
