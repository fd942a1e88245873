//! Continuous-time training end to end on the tiny dataset: the learned schedule is trained and
//! saved with the model, `schedule.png` is written, and the sampler and the bound read the
//! checkpoint back.

mod common;

use candle_core::Device;
use ddpm_checkpoint::Checkpoint;
use ddpm_config::Overrides;
use ddpm_dist::SingleProcess;
use ddpm_sampler::continuous::{elbo_batch, sample_continuous, ContinuousBatch, ContinuousKind};
use ddpm_sampler::continuous_cmd::load_model;
use ddpm_sampler::Weights;
use ddpm_train::trainer::{train, TrainOptions};

#[test]
fn learned_schedule_trains_saves_plots_and_samples() {
    let f = common::fixture(16);
    let out = f.dir.path().join("run");
    let text = common::tiny_config_text(
        &f.data,
        &out,
        "",
        "[diffusion]\ntime = \"continuous\"\nschedule = \"learned\"\nschedule_hidden = 8\n\
         loss = \"vlb\"\ngamma_min = -10.0\ngamma_max = 6.0\n\n\
         [schedule]\ntotal_steps = 6\nlog_every = 2\ncheckpoint_every = 1000\n",
    );
    let cfg = common::load(&text, &Overrides::default());
    let outcome = train(&cfg, &SingleProcess::new(), TrainOptions::default()).unwrap();
    assert_eq!(outcome.step, 6);
    assert!(outcome
        .step_losses
        .iter()
        .all(|l| l.is_finite() && *l > 0.0));
    assert!(out.join("schedule.png").is_file(), "schedule.png missing");

    let ck = Checkpoint::open_verified(outcome.checkpoint.as_ref().unwrap()).unwrap();
    let spec = ck.config().unwrap().diffusion.continuous().unwrap();
    let learned = ck.load_schedule(Weights::Model).unwrap().unwrap();
    // The run started from gamma_min / gamma_max and a nearly linear curve; six AdamW steps
    // must have moved both the endpoints and the shape.
    assert_ne!(learned.gamma_0, -10.0);
    assert_ne!(learned.gamma_1, 6.0);
    let init = ddpm_diffusion::vdm::MonotoneGammaInit::vdm(8, -10.0, 6.0, &[0.0; 24], 0.0);
    assert_ne!(learned.w2, init.w2);
    let (g_mid, dg_mid) = learned.gamma_dgamma(0.5);
    assert!(g_mid > learned.gamma_0 && g_mid < learned.gamma_1 && dg_mid > 0.0);

    let mut model = load_model(&ck, spec, Weights::Ema(None), &Device::Cpu).unwrap();
    let labels = candle_core::Tensor::new(&[0u32, 1, 0], &Device::Cpu).unwrap();
    guided_eps_is_the_cfg_combination(&mut model, &labels);
    for kind in [
        ContinuousKind::Ancestral,
        ContinuousKind::Ddim,
        ContinuousKind::DpmSolverPp,
    ] {
        let b = ContinuousBatch {
            chw: [1, 8, 8],
            n: 3,
            first_index: 0,
            seed: 1,
            labels: Some(&labels),
            device: Device::Cpu,
        };
        let x = sample_continuous(&model, kind, 5, true, &b).unwrap();
        assert_eq!(x.dims(), &[3, 1, 8, 8]);
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v.iter().all(|p| p.is_finite() && p.abs() <= 1.0),
            "{kind:?}"
        );
    }
    let x0 = candle_core::Tensor::rand(-1f32, 1f32, (3, 1, 8, 8), &Device::Cpu).unwrap();
    let x0 = ((x0 * 127.5).unwrap().round().unwrap() / 127.5).unwrap();
    let s = elbo_batch(&model, &x0, Some(&labels), 0, 0, 4).unwrap();
    assert_eq!(s.count, 3.0);
    assert_eq!(s.draws, 12.0);
    assert!(s.total > 0.0 && s.prior > 0.0 && s.diffusion > 0.0 && s.reconstruction > 0.0);
}

/// Classifier-free guidance in continuous time: the guided eps is `(1 + w) eps(y) - w eps(null)`
/// with the null label `num_classes` (2 here), from one forward pass on the doubled batch.
fn guided_eps_is_the_cfg_combination(
    model: &mut ddpm_sampler::continuous::ContinuousModel,
    labels: &candle_core::Tensor,
) {
    let z = candle_core::Tensor::randn(0f32, 1f32, (3, 1, 8, 8), &Device::Cpu).unwrap();
    let gamma = [-2.0, 0.5, 3.0];
    let null = candle_core::Tensor::new(&[2u32, 2, 2], &Device::Cpu).unwrap();
    model.cfg = None;
    let cond = model.eps(&z, &gamma, Some(labels)).unwrap();
    let uncond = model.eps(&z, &gamma, Some(&null)).unwrap();
    model.cfg = Some(2.0);
    let guided = model.eps(&z, &gamma, Some(labels)).unwrap();
    model.cfg = None;
    let want = ((cond.clone() * 3.0).unwrap() - (uncond.clone() * 2.0).unwrap()).unwrap();
    let max_abs = |t: candle_core::Tensor| -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    };
    let err = max_abs((guided - want).unwrap());
    assert!(
        err < 1e-5,
        "guided eps differs from 3 cond - 2 uncond by {err}"
    );
    let gap = max_abs((cond - uncond).unwrap());
    assert!(
        gap > 1e-4,
        "the labels do not change eps ({gap}): the check is empty"
    );
}
