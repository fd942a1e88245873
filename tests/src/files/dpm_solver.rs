//! `dpm_solver.json`: full multi-step trajectories (DPM-Solver++(2M) and diffusers-style DDIM, eta = 0)
//! driven by the file's deterministic fake eps model, in f64 (1e-10) and f32 (README: 1e-3 for these
//! trajectories). `samples_diffusers` is diffusers' own float32 output; it is compared with our f64
//! trajectory at the README's f32 trajectory tolerance (1e-3 mixed), which is what it can support.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use ddpm_diffusion::schedule::linspace;
use ddpm_diffusion::steps::{DiffusersDdim, DpmSolverPp2m};
use ddpm_diffusion::NoiseSchedule;
use serde_json::{json, Value};

use crate::check::{tensor, to_host, tols, FileTally, Path, Tol, TOL_F32_LOOSE, TOL_F64};
use crate::refjson::{Arr, J};

/// The fake model exactly as the file states it; any other text is a failure (we would compute
/// something else).
pub const FAKE_MODEL: &str =
    "eps(x, t) = 0.1 * x * cos(t / 100) + 0.05 * sin(t)   (t = integer scheduler timestep, radians)";

fn fake_eps(x: &Tensor, t: usize) -> Result<Tensor> {
    let t = t as f64;
    Ok(x.affine(0.1 * (t / 100.0).cos(), 0.05 * t.sin())?)
}

/// Checks each setting in `expected` against the file's config table (settings this implementation
/// hard-codes); settings used as inputs are read by the caller.
fn check_config(cfg: &J, expected: &[(&str, Value)], tally: &mut FileTally) -> Result<()> {
    for (key, want) in expected {
        let j = cfg.get(key)?;
        let got = j.v.clone();
        j.note();
        let same = match (got.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => &got == want,
        };
        tally.values += 1;
        if !same {
            tally.fail(format!(
                "{}: file has {got}, this implementation does {want}",
                j.full()
            ));
        }
    }
    Ok(())
}

fn stack(ts: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::stack(ts, 0)?)
}

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    let name = c.get("name")?.str()?.to_string();
    let big_t = c.get("T")?.usize()?;
    if c.get("schedule")?.str()? != "linear" {
        bail!("{name}: only the linear schedule is described for this file");
    }
    let n = c.get("num_inference_steps")?.usize()?;
    // Compared with whitespace collapsed: the formula is what matters, not its alignment.
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    tally.expect_eq(
        &format!("{name}.fake_model"),
        squash(FAKE_MODEL),
        squash(c.get("fake_model")?.str()?),
    );

    let cfg = c.get("diffusers_config")?;
    let dpm_cfg = cfg.get("DPMSolverMultistepScheduler")?;
    check_config(
        &dpm_cfg,
        &[
            ("num_train_timesteps", json!(big_t)),
            ("beta_schedule", json!("linear")),
            ("algorithm_type", json!("dpmsolver++")),
            ("solver_order", json!(2)),
            ("solver_type", json!("midpoint")),
            ("prediction_type", json!("epsilon")),
            ("lower_order_final", json!(true)),
            ("euler_at_final", json!(false)),
            ("final_sigmas_type", json!("zero")),
            ("timestep_spacing", json!("linspace")),
            ("steps_offset", json!(0)),
            ("use_karras_sigmas", json!(false)),
            ("lambda_min_clipped", json!("-inf")),
            ("thresholding", json!(false)),
        ],
        tally,
    )?;
    let ddim_cfg = cfg.get("DDIMScheduler")?;
    check_config(
        &ddim_cfg,
        &[
            ("num_train_timesteps", json!(big_t)),
            ("beta_schedule", json!("linear")),
            ("timestep_spacing", json!("leading")),
            ("steps_offset", json!(0)),
            ("set_alpha_to_one", json!(true)),
            ("clip_sample_range", json!(1.0)),
            ("use_clipped_model_output", json!(false)),
            ("prediction_type", json!("epsilon")),
            ("thresholding", json!(false)),
        ],
        tally,
    )?;
    // Describes that both clip settings are given (as the clip_sample_true / _false keys checked below).
    ddim_cfg.get("clip_sample")?.str()?;
    let eta = ddim_cfg.get("eta")?.f64()?;

    // diffusers' linear schedule: linspace(beta_start, beta_end, T) with the configured endpoints.
    let schedule_from = |j: &J| -> Result<NoiseSchedule> {
        let start = j.get("beta_start")?.f64()?;
        let end = j.get("beta_end")?.f64()?;
        Ok(NoiseSchedule::from_betas(linspace(start, end, big_t))?)
    };
    let dpm_schedule = schedule_from(&dpm_cfg)?;
    let ddim_schedule = schedule_from(&ddim_cfg)?;
    let x_t_arr = c.get("inputs")?.get("x_T")?.arr()?;

    for dtype in [DType::F64, DType::F32] {
        let x_t = tensor(&x_t_arr, dtype)?;
        dpm(c, &name, &dpm_schedule, n, &x_t, dtype, tally)?;
        let de = c.get("ddim_eta0")?;
        for key in de.keys()? {
            let clip = match key.as_str() {
                "clip_sample_true" => true,
                "clip_sample_false" => false,
                other => bail!("unknown key ddim_eta0.{other}"),
            };
            ddim(
                &de.get(&key)?,
                &name,
                &ddim_schedule,
                n,
                clip,
                eta,
                &x_t,
                dtype,
                tally,
            )?;
        }
    }
    Ok(())
}

/// The trajectory tolerance: 1e-10 in f64, the README's 1e-3 in f32.
fn traj_tol(dtype: DType) -> (Tol, Path) {
    let (_, loose, path) = tols(dtype);
    (loose, path)
}

fn check_samples_diffusers(
    j: &J,
    what: &str,
    ours_f64: &Tensor,
    dtype: DType,
    tally: &mut FileTally,
) -> Result<()> {
    let arr: Arr = j.get("samples_diffusers")?.arr()?;
    if dtype == DType::F64 {
        // diffusers computes in float32: compare at the README's f32 trajectory tolerance.
        tally.cmp_tensor(
            &format!("{what}.samples_diffusers (diffusers float32 vs our f64)"),
            Path::F32,
            ours_f64,
            &arr,
            Tol::Mixed(TOL_F32_LOOSE),
        )?;
    }
    Ok(())
}

fn dpm(
    c: &J,
    name: &str,
    schedule: &NoiseSchedule,
    n: usize,
    x_t: &Tensor,
    dtype: DType,
    tally: &mut FileTally,
) -> Result<()> {
    let j = c.get("dpm_solver_pp_2m")?;
    let what = format!("{name}.dpm_solver_pp_2m");
    let (tol, path) = traj_tol(dtype);
    let mut solver = DpmSolverPp2m::new(schedule, n)?;
    if dtype == DType::F64 {
        let f = Tol::Mixed(TOL_F64);
        let ts: Vec<f64> = solver.timesteps.iter().map(|&t| t as f64).collect();
        tally.vec_at(&what, &j, "timesteps", Path::F64, &ts, Tol::Abs(0.0))?;
        tally.vec_at(&what, &j, "sigmas", Path::F64, &solver.sigmas, f)?;
        tally.vec_at(&what, &j, "alpha_t", Path::F64, &solver.alpha_t, f)?;
        tally.vec_at(&what, &j, "sigma_t", Path::F64, &solver.sigma_t, f)?;
        tally.vec_at(&what, &j, "lambda_t", Path::F64, &solver.lambda_t, f)?;
        let orders: Vec<f64> = (0..n).map(|i| solver.order(i) as f64).collect();
        tally.vec_at(&what, &j, "orders", Path::F64, &orders, Tol::Abs(0.0))?;
    }
    let mut x = x_t.clone();
    let (mut eps_all, mut x0_all, mut samples) = (Vec::new(), Vec::new(), vec![x.clone()]);
    while let Some(t) = solver.current_timestep() {
        let eps = fake_eps(&x, t)?;
        let step = solver.step(&eps, &x)?;
        if dtype == DType::F64 {
            tally.expect_eq(
                &format!("{what}: order of step {}", solver.step_index() - 1),
                step.order,
                solver.order(solver.step_index() - 1),
            );
        }
        x = step.x_next;
        eps_all.push(eps);
        x0_all.push(step.x0_pred);
        samples.push(x.clone());
    }
    let samples = stack(&samples)?;
    tally.tensor_at(&what, &j, "model_eps", path, &stack(&eps_all)?, tol)?;
    tally.tensor_at(&what, &j, "x0_pred", path, &stack(&x0_all)?, tol)?;
    tally.tensor_at(&what, &j, "samples", path, &samples, tol)?;
    check_samples_diffusers(&j, &what, &samples, dtype, tally)?;
    // The final step to sigma = 0 returns the x0 prediction itself.
    if let (DType::F64, Some(last)) = (dtype, x0_all.last()) {
        let last = to_host(last)?;
        tally.cmp(
            &format!("{what}: final sample == last x0_pred"),
            Path::F64,
            &to_host(&x)?,
            &last,
            |_| Tol::Abs(0.0),
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn ddim(
    j: &J,
    name: &str,
    schedule: &NoiseSchedule,
    n: usize,
    clip: bool,
    eta: f64,
    x_t: &Tensor,
    dtype: DType,
    tally: &mut FileTally,
) -> Result<()> {
    let what = format!("{name}.{}", j.rel);
    let (tol, path) = traj_tol(dtype);
    let ddim = DiffusersDdim::new(schedule, n, clip)?;
    if dtype == DType::F64 {
        let f = Tol::Mixed(TOL_F64);
        let ts: Vec<f64> = ddim.timesteps.iter().map(|&t| t as f64).collect();
        let prev: Vec<f64> = ddim.prev_timesteps.iter().map(|&t| t as f64).collect();
        tally.vec_at(&what, j, "timesteps", Path::F64, &ts, Tol::Abs(0.0))?;
        tally.vec_at(&what, j, "prev_timesteps", Path::F64, &prev, Tol::Abs(0.0))?;
        tally.vec_at(&what, j, "alpha_prod_t", Path::F64, &ddim.alpha_prod_t, f)?;
        tally.vec_at(
            &what,
            j,
            "alpha_prod_t_prev",
            Path::F64,
            &ddim.alpha_prod_t_prev,
            f,
        )?;
    }
    let mut x = x_t.clone();
    let (mut eps_all, mut x0_all, mut samples) = (Vec::new(), Vec::new(), vec![x.clone()]);
    for i in 0..ddim.num_steps() {
        let eps = fake_eps(&x, ddim.timesteps[i])?;
        let (next, x0) = ddim.step(i, &eps, &x, eta, None)?;
        x = next;
        eps_all.push(eps);
        x0_all.push(x0);
        samples.push(x.clone());
    }
    let samples = stack(&samples)?;
    tally.tensor_at(&what, j, "model_eps", path, &stack(&eps_all)?, tol)?;
    tally.tensor_at(&what, j, "pred_x0", path, &stack(&x0_all)?, tol)?;
    tally.tensor_at(&what, j, "samples", path, &samples, tol)?;
    check_samples_diffusers(j, &what, &samples, dtype, tally)?;
    Ok(())
}
