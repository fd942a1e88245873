//! `q_sample.json`: forward process, v conversions and the posterior, in f64 and f32.

use anyhow::Result;
use candle_core::DType;
use ddpm_diffusion::tensor::extract;
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

fn run(c: &J, tally: &mut FileTally, dtype: DType) -> Result<()> {
    let name = c.get("name")?.str()?;
    let d = GaussianDiffusion::new(schedule_of(c)?, ModelMeanType::Epsilon, ModelVarType::FixedSmall, LossType::Mse);
    let (tol, loose, path) = tols(dtype);
    let inp = c.get("inputs")?;
    let x0 = tensor(&inp.get("x0")?.arr()?, dtype)?;
    let eps = tensor(&inp.get("eps")?.arr()?, dtype)?;
    let t = inp.get("t")?.arr()?.to_usize()?;
    let e = c.get("expected")?;
    let mut cmp = |field: &str, got: &candle_core::Tensor, tol| -> Result<()> {
        tally.cmp_tensor(&format!("{name}.expected.{field}"), path, got, &e.get(field)?.arr()?, tol)
    };
    cmp("alphas_cumprod_t", &extract(&d.schedule.alphas_cumprod, &t, &x0)?, tol)?;
    let x_t = d.q_sample(&x0, &t, &eps)?;
    cmp("x_t", &x_t, tol)?;
    let v = d.v_target(&x0, &eps, &t)?;
    cmp("v_target", &v, tol)?;
    cmp("x0_from_v", &d.predict_xstart_from_v(&x_t, &t, &v)?, tol)?;
    cmp("eps_from_v", &d.predict_eps_from_v(&x_t, &t, &v)?, tol)?;
    // x0 from eps at t = T-1 multiplies x_t by sqrt(1/ac) ~ 2e4 (cosine): the README's loose f32 case.
    cmp("pred_xstart_from_eps", &d.predict_xstart_from_eps(&x_t, &t, &eps)?, loose)?;
    let (q_mean, q_var, q_log_var) = d.q_mean_variance(&x0, &t)?;
    cmp("q_mean", &q_mean, tol)?;
    cmp("q_variance", &q_var, tol)?;
    cmp("q_log_variance", &q_log_var, tol)?;
    let (p_mean, p_var, p_log_var) = d.q_posterior_mean_variance(&x0, &x_t, &t)?;
    cmp("posterior_mean", &p_mean, tol)?;
    cmp("posterior_variance", &p_var, tol)?;
    cmp("posterior_log_variance_clipped", &p_log_var, tol)?;
    Ok(())
}
