//! `guidance.json`: classifier-free guidance (both parameterisations), guided-diffusion's
//! condition_mean and condition_score (with the DDIM eta = 0 step that follows it).

use anyhow::{bail, Result};
use candle_core::DType;
use ddpm_diffusion::steps::{
    cfg_combine, cfg_combine_scale, condition_mean, condition_score, ddim_update,
};
use ddpm_diffusion::tensor::extract;
use ddpm_diffusion::{GaussianDiffusion, LossType, ModelMeanType, ModelVarType};

use super::schedule_of;
use crate::check::{tensor, FileTally, Path, Tol, TOL_F64};
use crate::refjson::J;

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    match c.get("name")?.str()? {
        "classifier_free_guidance" => cfg(c, tally),
        "condition_mean" => cond_mean(c, tally),
        "condition_score" => cond_score(c, tally),
        other => bail!("unknown guidance case {other:?}"),
    }
}

const F: DType = DType::F64;
const P: Path = Path::F64;
const TOL: Tol = Tol::Mixed(TOL_F64);

fn cfg(c: &J, tally: &mut FileTally) -> Result<()> {
    let inp = c.get("inputs")?;
    let ec = tensor(&inp.get("eps_cond")?.arr()?, F)?;
    let eu = tensor(&inp.get("eps_uncond")?.arr()?, F)?;
    for pw in c.get("expected")?.get("per_w")?.items()? {
        let w = pw.get("w")?.f64()?;
        let s = pw.get("s")?.f64()?;
        let what = pw.full();
        tally.cmp_scalar(&format!("{what}.s (= 1 + w)"), P, 1.0 + w, s, TOL);
        tally.cmp_tensor(
            &format!("{what}.eps_w_form"),
            P,
            &cfg_combine(&ec, &eu, w)?,
            &pw.get("eps_w_form")?.arr()?,
            TOL,
        )?;
        tally.cmp_tensor(
            &format!("{what}.eps_s_form"),
            P,
            &cfg_combine_scale(&ec, &eu, s)?,
            &pw.get("eps_s_form")?.arr()?,
            TOL,
        )?;
    }
    Ok(())
}

fn cond_mean(c: &J, tally: &mut FileTally) -> Result<()> {
    let inp = c.get("inputs")?;
    let mean = tensor(&inp.get("mean")?.arr()?, F)?;
    let var = tensor(&inp.get("variance")?.arr()?, F)?;
    let grad = tensor(&inp.get("grad")?.arr()?, F)?;
    let scales = inp.get("scales")?.arr()?;
    let per = c.get("expected")?.get("per_scale")?.items()?;
    tally.expect_eq(
        &format!("{}: number of scales", c.full()),
        per.len(),
        scales.len(),
    );
    for (i, ps) in per.iter().enumerate() {
        let scale = ps.get("scale")?.f64()?;
        let what = ps.full();
        let Some(&listed) = scales.data.get(i) else {
            bail!("{what} has no matching inputs.scales entry")
        };
        tally.cmp_scalar(
            &format!("{what}.scale (= inputs.scales[{i}])"),
            P,
            scale,
            listed,
            Tol::Abs(0.0),
        );
        tally.cmp_tensor(
            &format!("{what}.new_mean"),
            P,
            &condition_mean(&mean, &var, &grad, scale)?,
            &ps.get("new_mean")?.arr()?,
            TOL,
        )?;
    }
    Ok(())
}

fn cond_score(c: &J, tally: &mut FileTally) -> Result<()> {
    let d = GaussianDiffusion::new(
        schedule_of(c)?,
        ModelMeanType::Epsilon,
        ModelVarType::FixedSmall,
        LossType::Mse,
    );
    let clip = c.get("clip_denoised")?.bool()?;
    let inp = c.get("inputs")?;
    let x_t = tensor(&inp.get("x_t")?.arr()?, F)?;
    let model_eps = tensor(&inp.get("model_eps")?.arr()?, F)?;
    let grad = tensor(&inp.get("grad")?.arr()?, F)?;
    let t = inp.get("t")?.arr()?.to_usize()?;
    let scales = inp.get("scales")?.arr()?;
    let e = c.get("expected")?;
    let name = c.full();
    tally.cmp_tensor(
        &format!("{name}.expected.alphas_cumprod_t"),
        P,
        &extract(&d.schedule.alphas_cumprod, &t, &x_t)?,
        &e.get("alphas_cumprod_t")?.arr()?,
        TOL,
    )?;
    tally.cmp_tensor(
        &format!("{name}.expected.alphas_cumprod_prev_t"),
        P,
        &extract(&d.schedule.alphas_cumprod_prev, &t, &x_t)?,
        &e.get("alphas_cumprod_prev_t")?.arr()?,
        TOL,
    )?;
    let out = d.p_mean_variance(&model_eps, &x_t, &t, clip)?;
    let per = e.get("per_scale")?.items()?;
    tally.expect_eq(
        &format!("{name}: number of scales"),
        per.len(),
        scales.len(),
    );
    for (i, ps) in per.iter().enumerate() {
        let scale = ps.get("scale")?.f64()?;
        let what = ps.full();
        let Some(&listed) = scales.data.get(i) else {
            bail!("{what} has no matching inputs.scales entry")
        };
        tally.cmp_scalar(
            &format!("{what}.scale (= inputs.scales[{i}])"),
            P,
            scale,
            listed,
            Tol::Abs(0.0),
        );
        let cs = condition_score(&d, &x_t, &t, &out.pred_xstart, &grad, scale)?;
        tally.tensor_at(&what, ps, "eps_guided", P, &cs.eps, TOL)?;
        tally.tensor_at(&what, ps, "pred_xstart_guided", P, &cs.pred_xstart, TOL)?;
        tally.tensor_at(&what, ps, "mean_guided", P, &cs.mean, TOL)?;
        let step = ddim_update(&d, &x_t, &t, &cs.pred_xstart, 0.0, None)?;
        tally.tensor_at(&what, ps, "ddim_eta0_x_prev", P, &step.x_prev, TOL)?;
    }
    Ok(())
}
