//! `min_snr.json`: SNR and the Min-SNR-gamma weights for eps, v and x0 prediction.

use anyhow::Result;
use ddpm_diffusion::tensor::gather;
use ddpm_diffusion::{GaussianDiffusion, LossType, ModelMeanType, ModelVarType};

use super::schedule_of;
use crate::check::{FileTally, Path, Tol, TOL_F64};
use crate::refjson::J;

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    let name = c.get("name")?.str()?;
    let schedule = schedule_of(c)?;
    let gamma = c.get("gamma")?.f64()?;
    let e = c.get("expected")?;
    let t = e.get("timesteps")?.arr()?.to_usize()?;
    let tol = Tol::Mixed(TOL_F64);
    let snr = gather(&schedule.snr(), &t)?;
    tally.cmp_vec(
        &format!("{name}.expected.snr"),
        Path::F64,
        &snr,
        &e.get("snr")?.arr()?,
        tol,
    );
    for (field, mean_type) in [
        ("weight_epsilon", ModelMeanType::Epsilon),
        ("weight_v_prediction", ModelMeanType::V),
        ("weight_sample", ModelMeanType::StartX),
    ] {
        let d = GaussianDiffusion::new(
            schedule.clone(),
            mean_type,
            ModelVarType::FixedSmall,
            LossType::Mse,
        );
        let w = d.min_snr_weights(&t, gamma)?;
        tally.cmp_vec(
            &format!("{name}.expected.{field}"),
            Path::F64,
            &w,
            &e.get(field)?.arr()?,
            tol,
        );
    }
    Ok(())
}
