//! `schedules.json`: betas and every derived table.

use anyhow::{bail, Result};
use ddpm_diffusion::schedule::{
    cosine_betas, linear_beta_range, BetaSchedule, NoiseSchedule, COSINE_MAX_BETA, COSINE_S,
};

use crate::check::{FileTally, Path, Tol, TOL_F64};
use crate::refjson::J;

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    let name = c.get("name")?.str()?;
    let p = c.get("params")?;
    let t = p.get("T")?.usize()?;
    let tol = Tol::Mixed(TOL_F64);
    let s = match c.get("schedule")?.str()? {
        "linear" => {
            let (start, end) = linear_beta_range(t);
            tally.cmp_scalar(
                &format!("{name}.params.scale"),
                Path::F64,
                1000.0 / t as f64,
                p.get("scale")?.f64()?,
                tol,
            );
            tally.cmp_scalar(
                &format!("{name}.params.beta_start"),
                Path::F64,
                start,
                p.get("beta_start")?.f64()?,
                tol,
            );
            tally.cmp_scalar(
                &format!("{name}.params.beta_end"),
                Path::F64,
                end,
                p.get("beta_end")?.f64()?,
                tol,
            );
            NoiseSchedule::new(&BetaSchedule::Linear, t)?
        }
        "cosine" => {
            let s = p.get("s")?.f64()?;
            let max_beta = p.get("max_beta")?.f64()?;
            if s == COSINE_S && max_beta == COSINE_MAX_BETA {
                // The defaults: go through the public named schedule.
                tally.expect_eq(&format!("{name}.params.s"), COSINE_S, s);
                tally.expect_eq(
                    &format!("{name}.params.max_beta"),
                    COSINE_MAX_BETA,
                    max_beta,
                );
                NoiseSchedule::new(&BetaSchedule::Cosine, t)?
            } else {
                // Non-default parameters are inputs here; the tables below check their effect.
                NoiseSchedule::from_betas(cosine_betas(t, s, max_beta))?
            }
        }
        other => bail!("unknown schedule {other:?}"),
    };
    tally.expect_eq(
        &format!("{name}: number of timesteps"),
        s.num_timesteps(),
        t,
    );
    let tables: [(&str, &Vec<f64>); 16] = [
        ("betas", &s.betas),
        ("alphas", &s.alphas),
        ("alphas_cumprod", &s.alphas_cumprod),
        ("alphas_cumprod_prev", &s.alphas_cumprod_prev),
        ("alphas_cumprod_next", &s.alphas_cumprod_next),
        ("sqrt_alphas_cumprod", &s.sqrt_alphas_cumprod),
        (
            "sqrt_one_minus_alphas_cumprod",
            &s.sqrt_one_minus_alphas_cumprod,
        ),
        (
            "log_one_minus_alphas_cumprod",
            &s.log_one_minus_alphas_cumprod,
        ),
        ("sqrt_recip_alphas_cumprod", &s.sqrt_recip_alphas_cumprod),
        (
            "sqrt_recipm1_alphas_cumprod",
            &s.sqrt_recipm1_alphas_cumprod,
        ),
        ("posterior_variance", &s.posterior_variance),
        (
            "posterior_log_variance_clipped",
            &s.posterior_log_variance_clipped,
        ),
        ("posterior_mean_coef1", &s.posterior_mean_coef1),
        ("posterior_mean_coef2", &s.posterior_mean_coef2),
        ("fixed_large_variance", &s.fixed_large_variance),
        ("fixed_large_log_variance", &s.fixed_large_log_variance),
    ];
    for (field, got) in tables {
        let exp = c.get(field)?.arr()?;
        tally.cmp_vec(&format!("{name}.{field}"), Path::F64, got, &exp, tol);
    }
    Ok(())
}
