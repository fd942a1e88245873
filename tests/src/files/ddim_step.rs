//! `ddim_step.json`: improved-diffusion respacing (`space_timesteps`, respaced tables) and the DDIM step
//! on the respaced process, eta 0 and 1, with and without clipping, in f64 and f32.

use anyhow::{anyhow, bail, Result};
use candle_core::DType;
use ddpm_diffusion::steps::ddim_step;
use ddpm_diffusion::{space_timesteps, GaussianDiffusion, LossType, ModelMeanType, ModelVarType};

use super::schedule_of;
use crate::check::{tensor, tols, FileTally, Path, Tol, TOL_F64};
use crate::refjson::J;

/// `respacing_examples`: `space_timesteps(T, section_counts)` must give `use_timesteps` exactly.
pub fn top(doc: &J, tally: &mut FileTally) -> Result<()> {
    for ex in doc.get("respacing_examples")?.items()? {
        let t = ex.get("T")?.usize()?;
        let spec = ex.get("section_counts")?.str()?;
        let want = ex.get("use_timesteps")?.arr()?;
        let got: Vec<f64> = space_timesteps(t, spec)?
            .iter()
            .map(|&v| v as f64)
            .collect();
        tally.cmp_vec(
            &format!("{}: space_timesteps({t}, {spec:?})", ex.full()),
            Path::F64,
            &got,
            &want,
            Tol::Abs(0.0),
        );
    }
    Ok(())
}

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        run(c, tally, dtype)?;
    }
    Ok(())
}

fn run(c: &J, tally: &mut FileTally, dtype: DType) -> Result<()> {
    let name = c.get("name")?.str()?;
    let base = GaussianDiffusion::new(
        schedule_of(c)?,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
        LossType::Mse,
    );
    let d = base.respace(c.get("section_counts")?.str()?)?;
    let (tol, loose, path) = tols(dtype);
    let exact = Tol::Abs(0.0);
    let f64tol = Tol::Mixed(TOL_F64);

    if dtype == DType::F64 {
        let r = c.get("respacing")?;
        let map: Vec<f64> = d.timestep_map.iter().map(|&v| v as f64).collect();
        tally.cmp_vec(
            &format!("{name}.respacing.use_timesteps"),
            Path::F64,
            &map,
            &r.get("use_timesteps")?.arr()?,
            exact,
        );
        let s = &d.schedule;
        tally.cmp_vec(
            &format!("{name}.respacing.respaced_betas"),
            Path::F64,
            &s.betas,
            &r.get("respaced_betas")?.arr()?,
            f64tol,
        );
        tally.cmp_vec(
            &format!("{name}.respacing.respaced_alphas_cumprod"),
            Path::F64,
            &s.alphas_cumprod,
            &r.get("respaced_alphas_cumprod")?.arr()?,
            f64tol,
        );
        tally.cmp_vec(
            &format!("{name}.respacing.respaced_alphas_cumprod_prev"),
            Path::F64,
            &s.alphas_cumprod_prev,
            &r.get("respaced_alphas_cumprod_prev")?.arr()?,
            f64tol,
        );
    }

    let inp = c.get("inputs")?;
    let x_t = tensor(&inp.get("x_t")?.arr()?, dtype)?;
    let model_eps = tensor(&inp.get("model_eps")?.arr()?, dtype)?;
    let noise = tensor(&inp.get("noise")?.arr()?, dtype)?;
    let k = inp.get("k")?.arr()?.to_usize()?;
    if dtype == DType::F64 {
        let t_orig = d.model_timesteps(&k)?;
        tally.cmp_vec(
            &format!("{name}.inputs.t_original (model timesteps of k)"),
            Path::F64,
            &t_orig,
            &inp.get("t_original")?.arr()?,
            exact,
        );
    }

    let e = c.get("expected")?;
    for ckey in e.keys()? {
        let clip = match ckey.as_str() {
            "clip_denoised_true" => true,
            "clip_denoised_false" => false,
            other => bail!("unknown key expected.{other}"),
        };
        let ce = e.get(&ckey)?;
        let what = format!("{name}.expected.{ckey}");
        let mut ran = false;
        for ekey in ce.keys()? {
            let Some(eta) = ekey.strip_prefix("eta_") else {
                continue;
            };
            let eta: f64 = eta
                .parse()
                .map_err(|_| anyhow!("cannot read eta from {ekey:?}"))?;
            let step = ddim_step(&d, &model_eps, &x_t, &k, clip, eta, Some(&noise))?;
            let ee = ce.get(&ekey)?;
            tally.cmp_vec(
                &format!("{what}.{ekey}.sigma"),
                path,
                &step.sigma,
                &ee.get("sigma")?.arr()?,
                f64tol,
            );
            tally.cmp_tensor(
                &format!("{what}.{ekey}.x_prev"),
                path,
                &step.x_prev,
                &ee.get("x_prev")?.arr()?,
                tol,
            )?;
            // pred_xstart / eps_rederived do not depend on eta; check them from every run.
            let x0_tol = if clip { tol } else { loose };
            tally.cmp_tensor(
                &format!("{what}.pred_xstart ({ekey} run)"),
                path,
                &step.pred_xstart,
                &ce.get("pred_xstart")?.arr()?,
                x0_tol,
            )?;
            tally.cmp_tensor(
                &format!("{what}.eps_rederived ({ekey} run)"),
                path,
                &step.eps,
                &ce.get("eps_rederived")?.arr()?,
                tol,
            )?;
            ran = true;
        }
        if !ran {
            bail!("{what} has no eta_* entries");
        }
    }
    Ok(())
}
