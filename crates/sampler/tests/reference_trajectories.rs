//! Full multi-step trajectories of `dpm_solver.json` run through this crate's sampler loops with the
//! file's deterministic fake model `eps(x, t) = 0.1 x cos(t / 100) + 0.05 sin(t)`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{flatten, load_json, max_mixed_err, tensor, usizes};
use ddpm_diffusion::{
    BetaSchedule, GaussianDiffusion, LossType, ModelMeanType, ModelVarType, NoiseSchedule,
};
use ddpm_sampler::{
    BatchSpec, Denoiser, Guidance, Progress, Result, Sampler, SamplerKind, SamplerSettings,
};

fn fake_model() -> impl Denoiser {
    |x: &Tensor, t: &[usize], y: Option<&Tensor>| -> Result<Tensor> {
        assert!(y.is_none());
        assert!(
            t.iter().all(|&v| v == t[0]),
            "one timestep per batch in these loops"
        );
        let tf = t[0] as f64;
        Ok(x.affine(0.1 * (tf / 100.0).cos(), 0.05 * tf.sin())?)
    }
}

fn linear_1000() -> GaussianDiffusion {
    let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000).unwrap();
    GaussianDiffusion::new(
        s,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
        LossType::Mse,
    )
}

/// Runs `sampler` from `x_T` and returns the sample after each step (`x_T` first).
fn trajectory(sampler: &Sampler, x_t: &Tensor, dtype: DType) -> Vec<Tensor> {
    let dims = x_t.dims();
    let batch = BatchSpec {
        shape: [dims[0], dims[1], dims[2], dims[3]],
        first_index: 0,
        seed: 0,
        labels: None,
        device: Device::Cpu,
        dtype,
        x_init: Some(x_t.clone()),
    };
    let mut traj = vec![x_t.to_dtype(dtype).unwrap()];
    let model = fake_model();
    let last = sampler
        .sample_observed(&model, &Guidance::none(), &batch, &mut |p: Progress<'_>| {
            if let Some(s) = p.sample {
                traj.push(s.clone());
            }
        })
        .unwrap();
    assert_eq!(
        traj.last().unwrap().to_vec1::<f64>().ok(),
        last.to_vec1::<f64>().ok()
    );
    traj
}

fn check_trajectory(name: &str, traj: &[Tensor], samples: &serde_json::Value, tol: f64) -> usize {
    let expected = samples.as_array().unwrap();
    assert_eq!(traj.len(), expected.len(), "{name}: number of samples");
    let mut worst = 0.0f64;
    for (i, (got, exp)) in traj.iter().zip(expected).enumerate() {
        let (e, _) = flatten(exp);
        let err = max_mixed_err(got, &e);
        assert!(
            err <= tol,
            "{name}: sample {i} differs by {err:e} (tolerance {tol:e})"
        );
        worst = worst.max(err);
    }
    eprintln!(
        "{name}: {} samples, worst mixed error {worst:e}",
        traj.len()
    );
    traj.len()
}

#[test]
fn dpm_solver_pp_2m_trajectory_matches_reference() {
    let refs = load_json("dpm_solver.json");
    let cases = refs["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        assert_eq!(case["schedule"], "linear");
        assert_eq!(case["T"], 1000);
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        let p = &case["dpm_solver_pp_2m"];
        let sampler = Sampler::new(
            linear_1000(),
            SamplerSettings::new(SamplerKind::DpmSolver).steps(n.to_string()),
        )
        .unwrap();
        assert_eq!(
            sampler.model_timesteps(),
            usizes(&p["timesteps"]),
            "timesteps"
        );
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-3)] {
            let x_t = tensor(&case["inputs"]["x_T"], dtype);
            let traj = trajectory(&sampler, &x_t, dtype);
            check_trajectory(
                &format!("{} dpm-solver++ {dtype:?}", case["name"]),
                &traj,
                &p["samples"],
                tol,
            );
        }
    }
}

/// diffusers' DDIM ("leading" spacing, eta = 0) without clipping is improved-diffusion's DDIM on the
/// `ddimN` respacing: with an unclipped x0, re-deriving eps from it changes nothing but rounding.
#[test]
fn ddim_eta0_unclipped_trajectory_matches_reference() {
    let refs = load_json("dpm_solver.json");
    for case in refs["cases"].as_array().unwrap() {
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        let d = &case["ddim_eta0"]["clip_sample_false"];
        let mut settings = SamplerSettings::new(SamplerKind::Ddim).steps(format!("ddim{n}"));
        settings.fused_update = false;
        let sampler = Sampler::new(linear_1000(), settings).unwrap();
        assert_eq!(
            sampler.model_timesteps(),
            usizes(&d["timesteps"]),
            "timesteps"
        );
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-3)] {
            let x_t = tensor(&case["inputs"]["x_T"], dtype);
            let traj = trajectory(&sampler, &x_t, dtype);
            check_trajectory(
                &format!("{} ddim eta=0 {dtype:?}", case["name"]),
                &traj,
                &d["samples"],
                tol,
            );
        }
    }
}
