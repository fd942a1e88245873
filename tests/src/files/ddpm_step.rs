//! `ddpm_step.json`: one ancestral step with fixed-small / fixed-large variance, with and without
//! clipping, in f64 and f32.

use anyhow::{bail, Result};
use candle_core::DType;
use ddpm_diffusion::steps::ddpm_step;
use ddpm_diffusion::{GaussianDiffusion, LossType, ModelMeanType, ModelVarType};

use super::schedule_of;
use crate::check::{tensor, tols, FileTally};
use crate::refjson::J;

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        run(c, tally, dtype)?;
    }
    Ok(())
}

fn var_type(key: &str) -> Result<ModelVarType> {
    Ok(match key {
        "fixed_small" => ModelVarType::FixedSmall,
        "fixed_large" => ModelVarType::FixedLarge,
        other => bail!("unknown variance type {other:?}"),
    })
}

fn clip_flag(key: &str) -> Result<bool> {
    Ok(match key {
        "clip_denoised_true" => true,
        "clip_denoised_false" => false,
        other => bail!("unknown key {other:?}"),
    })
}

fn run(c: &J, tally: &mut FileTally, dtype: DType) -> Result<()> {
    let name = c.get("name")?.str()?;
    let schedule = schedule_of(c)?;
    let (tol, loose, path) = tols(dtype);
    let inp = c.get("inputs")?;
    let x_t = tensor(&inp.get("x_t")?.arr()?, dtype)?;
    let model_eps = tensor(&inp.get("model_eps")?.arr()?, dtype)?;
    let noise = tensor(&inp.get("noise")?.arr()?, dtype)?;
    let t = inp.get("t")?.arr()?.to_usize()?;
    let e = c.get("expected")?;
    let diff =
        |v| GaussianDiffusion::new(schedule.clone(), ModelMeanType::Epsilon, v, LossType::Mse);

    let var = e.get("variance")?;
    for vkey in var.keys()? {
        let d = diff(var_type(&vkey)?);
        let out = d.p_mean_variance(&model_eps, &x_t, &t, true)?;
        let ve = var.get(&vkey)?;
        let what = format!("{name}.expected.variance.{vkey}");
        tally.tensor_at(&what, &ve, "variance", path, &out.variance, tol)?;
        tally.tensor_at(&what, &ve, "log_variance", path, &out.log_variance, tol)?;
    }
    for ckey in e.keys()? {
        if ckey == "variance" {
            continue;
        }
        let clip = clip_flag(&ckey)?;
        let ce = e.get(&ckey)?;
        for vkey in ce.keys()? {
            if vkey == "pred_xstart" || vkey == "mean" {
                continue;
            }
            let d = diff(var_type(&vkey)?);
            let step = ddpm_step(&d, &model_eps, &x_t, &t, &noise, clip, None)?;
            let what = format!("{name}.expected.{ckey}");
            // The unclipped x0 at t = T-1 is ~1e5 and amplifies f32 rounding (README: loose f32 tolerance).
            let x0_tol = if clip { tol } else { loose };
            tally.cmp_tensor(
                &format!("{what}.pred_xstart ({vkey} run)"),
                path,
                &step.out.pred_xstart,
                &ce.get("pred_xstart")?.arr()?,
                x0_tol,
            )?;
            tally.cmp_tensor(
                &format!("{what}.mean ({vkey} run)"),
                path,
                &step.out.mean,
                &ce.get("mean")?.arr()?,
                tol,
            )?;
            tally.cmp_tensor(
                &format!("{what}.{vkey}.x_prev"),
                path,
                &step.x_prev,
                &ce.get(&vkey)?.get("x_prev")?.arr()?,
                tol,
            )?;
        }
    }
    Ok(())
}
