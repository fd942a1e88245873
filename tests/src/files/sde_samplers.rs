//! `sde_samplers.json`: score-SDE trajectories (reverse-SDE Euler-Maruyama, reverse diffusion,
//! predictor-corrector with the Langevin corrector) on respaced DDPM chains, and EDM Algorithm 2 in
//! sigma space, each driven by the exact eps of Gaussian data with the file's stored noise. The
//! trajectories are chained here from `ddpm-diffusion`'s step functions; f64 at 1e-10, f32 at the
//! README's trajectory tolerance (1e-3).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use ddpm_diffusion::steps::{
    edm_churn, edm_euler, edm_heun, euler_maruyama_step, langevin_step, reverse_diffusion_step,
    EdmChurn,
};
use ddpm_diffusion::{GaussianDiffusion, LossType, ModelMeanType, ModelVarType};

use super::schedule_of;
use crate::check::{tensor, tols, FileTally, Path, Tol};
use crate::refjson::{Arr, J};

/// The toy models exactly as the file states them.
pub const TOY_VP: &str = "eps(x, t) = sqrt(1 - a) * (x - sqrt(a) * mu) / (a * s^2 + 1 - a), a = alphas_cumprod[t] of the full schedule";
pub const TOY_VE: &str = "d(x, sigma) = sigma * (x - mu) / (s^2 + sigma^2)";

/// The Gaussian data's per-element mean and std, broadcast over the batch.
struct Toy {
    mu: Tensor,
    s2: Tensor,
}

impl Toy {
    fn new(inp: &J, dtype: DType) -> Result<Self> {
        let mu = tensor(&inp.get("data_mean")?.arr()?, DType::F64)?;
        let s = tensor(&inp.get("data_std")?.arr()?, DType::F64)?;
        Ok(Self {
            mu: mu.unsqueeze(0)?.to_dtype(dtype)?,
            s2: s.sqr()?.unsqueeze(0)?.to_dtype(dtype)?,
        })
    }

    /// E[eps | x_t] at alpha_bar `a`.
    fn eps(&self, x: &Tensor, a: f64) -> Result<Tensor> {
        let num = x.broadcast_sub(&self.mu.affine(a.sqrt(), 0.0)?)?;
        let den = self.s2.affine(a, 1.0 - a)?;
        Ok(num.broadcast_div(&den)?.affine((1.0 - a).sqrt(), 0.0)?)
    }

    /// The ODE slope in sigma space, `(x - D) / sigma`.
    fn d(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let den = self.s2.affine(1.0, sigma * sigma)?;
        Ok(x.broadcast_sub(&self.mu)?
            .broadcast_div(&den)?
            .affine(sigma, 0.0)?)
    }
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    let name = c.get("name")?.str()?.to_string();
    let sampler = c.get("sampler")?.str()?;
    let want = if sampler == "edm" { TOY_VE } else { TOY_VP };
    tally.expect_eq(
        &format!("{name}.toy_model"),
        squash(want),
        squash(c.get("toy_model")?.str()?),
    );
    for dtype in [DType::F64, DType::F32] {
        match sampler {
            "euler_maruyama" | "reverse_diffusion" | "pc" => sde(c, &name, sampler, dtype, tally)?,
            "edm" => edm(c, &name, dtype, tally)?,
            other => bail!("unknown sampler {other:?}"),
        }
    }
    Ok(())
}

/// f64: 1e-10; f32: the README's 1e-3 for multi-step trajectories.
fn traj_tol(dtype: DType) -> (Tol, Path) {
    let (_, loose, path) = tols(dtype);
    (loose, path)
}

fn stack(ts: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::stack(ts, 0)?)
}

/// The predictor, the number of corrector steps and the snr of a case.
fn sde_params(c: &J, sampler: &str) -> Result<(String, usize, f64)> {
    if sampler != "pc" {
        return Ok((sampler.to_string(), 0, 0.0));
    }
    let p = c.get("params")?;
    Ok((
        p.get("predictor")?.str()?.to_string(),
        p.get("corrector_steps")?.usize()?,
        p.get("snr")?.f64()?,
    ))
}

fn sde(c: &J, name: &str, sampler: &str, dtype: DType, tally: &mut FileTally) -> Result<()> {
    let full = GaussianDiffusion::new(
        schedule_of(c)?,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
        LossType::Mse,
    );
    let use_ts = c.get("use_timesteps")?.arr()?.to_usize()?;
    let chain = full.respaced(&use_ts)?;
    let (predictor, nc, snr) = sde_params(c, sampler)?;
    let (tol, path) = traj_tol(dtype);
    let inp = c.get("inputs")?;
    let toy = Toy::new(&inp, dtype)?;
    let noise: Arr = inp.get("noise")?.arr()?;
    let mut x = tensor(&inp.get("x_T")?.arr()?, dtype)?;
    let b = x.dim(0)?;
    let e = c.get("expected")?;
    if dtype == DType::F64 {
        tally.cmp_vec(
            &format!("{name}.respaced_betas"),
            Path::F64,
            &chain.schedule.betas,
            &e.get("respaced_betas")?.arr()?,
            Tol::Mixed(1e-10),
        );
    }
    let (mut samples, mut eps_all, mut t_model, mut sizes) =
        (vec![x.clone()], vec![], vec![], vec![]);
    let mut draw = 0usize;
    for k in (0..chain.num_timesteps()).rev() {
        let tm = chain.timestep_map[k];
        let a = full.schedule.alphas_cumprod[tm];
        let t = vec![k; b];
        for _ in 0..nc {
            let eps = toy.eps(&x, a)?;
            let z = tensor(&noise.row(draw), dtype)?;
            draw += 1;
            let step = langevin_step(&chain.schedule, &x, &t, &eps, &z, snr)?;
            x = step.x;
            sizes.extend(step.step_size);
            eps_all.push(eps);
            t_model.push(tm as f64);
        }
        let eps = toy.eps(&x, a)?;
        let z = tensor(&noise.row(draw), dtype)?;
        draw += 1;
        x = match predictor.as_str() {
            "euler_maruyama" => euler_maruyama_step(&chain.schedule, &x, &t, &eps, &z)?,
            "reverse_diffusion" => reverse_diffusion_step(&chain.schedule, &x, &t, &eps, &z)?,
            other => bail!("unknown predictor {other:?}"),
        }
        .x_prev;
        eps_all.push(eps);
        t_model.push(tm as f64);
        samples.push(x.clone());
    }
    if draw != noise.shape[0] {
        bail!(
            "{name}: used {draw} noise draws, the file has {}",
            noise.shape[0]
        );
    }
    if dtype == DType::F64 {
        tally.cmp_vec(
            &format!("{name}.t_model"),
            Path::F64,
            &t_model,
            &e.get("t_model")?.arr()?,
            Tol::Abs(0.0),
        );
    }
    let what = |f: &str| format!("{name}.expected.{f}");
    tally.cmp_tensor(
        &what("model_eps"),
        path,
        &stack(&eps_all)?,
        &e.get("model_eps")?.arr()?,
        tol,
    )?;
    tally.cmp_tensor(
        &what("samples"),
        path,
        &stack(&samples)?,
        &e.get("samples")?.arr()?,
        tol,
    )?;
    if sampler == "pc" {
        tally.cmp_vec(
            &what("langevin_step_sizes"),
            path,
            &sizes,
            &e.get("langevin_step_sizes")?.arr()?,
            tol,
        );
    }
    Ok(())
}

fn edm(c: &J, name: &str, dtype: DType, tally: &mut FileTally) -> Result<()> {
    let p = c.get("params")?;
    let churn = EdmChurn {
        s_churn: p.get("s_churn")?.f64()?,
        s_tmin: p.get("s_tmin")?.f64()?,
        s_tmax: p.get("s_tmax")?.f64()?,
        s_noise: p.get("s_noise")?.f64()?,
    };
    churn.validate()?;
    let (tol, path) = traj_tol(dtype);
    let inp = c.get("inputs")?;
    let toy = Toy::new(&inp, dtype)?;
    let sigmas = inp.get("sigmas")?.arr()?.data;
    let noise = inp.get("noise")?.arr()?;
    let mut x = tensor(&inp.get("x_init")?.arr()?, dtype)?;
    let n = sigmas.len() - 1;
    let (mut samples, mut ds, mut gammas, mut hats) = (vec![x.clone()], vec![], vec![], vec![]);
    for i in 0..n {
        let (sig, next) = (sigmas[i], sigmas[i + 1]);
        let gamma = churn.gamma(sig, n);
        let hat = sig + gamma * sig;
        let z = tensor(&noise.row(i), dtype)?;
        let x_hat = edm_churn(&x, sig, hat, churn.s_noise, &z)?;
        let d = toy.d(&x_hat, hat)?;
        x = edm_euler(&x_hat, hat, next, &d)?;
        ds.push(d.clone());
        if next != 0.0 {
            let d2 = toy.d(&x, next)?;
            x = edm_heun(&x_hat, hat, next, &d, &d2)?;
            ds.push(d2);
        }
        gammas.push(gamma);
        hats.push(hat);
        samples.push(x.clone());
    }
    let e = c.get("expected")?;
    let what = |f: &str| format!("{name}.expected.{f}");
    if dtype == DType::F64 {
        let f = Tol::Mixed(1e-10);
        tally.cmp_vec(
            &what("gammas"),
            Path::F64,
            &gammas,
            &e.get("gammas")?.arr()?,
            f,
        );
        tally.cmp_vec(
            &what("sigma_hats"),
            Path::F64,
            &hats,
            &e.get("sigma_hats")?.arr()?,
            f,
        );
    }
    tally.cmp_tensor(&what("d"), path, &stack(&ds)?, &e.get("d")?.arr()?, tol)?;
    tally.cmp_tensor(
        &what("samples"),
        path,
        &stack(&samples)?,
        &e.get("samples")?.arr()?,
        tol,
    )?;
    Ok(())
}
