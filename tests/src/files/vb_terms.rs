//! `vb_terms.json`: normal_kl, the discretized Gaussian decoder, and improved-diffusion's training
//! losses with a learned-range variance (L_hybrid), term by term.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use ddpm_diffusion::losses::{
    discretized_gaussian_log_likelihood, discretized_gaussian_log_likelihood_f64, normal_kl,
    normal_kl_f64, normal_kl_standard,
};
use ddpm_diffusion::{GaussianDiffusion, LossType, ModelMeanType, ModelVarType};

use super::schedule_of;
use crate::check::{tensor, to_host, FileTally, Path, Tol, TOL_F64};
use crate::refjson::J;

const DECODER_TOL_T_POSITIVE: f64 = 1e-5;

pub fn top(doc: &J, tally: &mut FileTally) -> Result<()> {
    let tol = Tol::Mixed(TOL_F64);
    let f = DType::F64;

    let s = doc.get("normal_kl")?;
    let i = s.get("inputs")?;
    let (m1, l1, m2, l2) = (
        i.get("mean1")?.arr()?,
        i.get("logvar1")?.arr()?,
        i.get("mean2")?.arr()?,
        i.get("logvar2")?.arr()?,
    );
    let e = s.get("expected")?;
    let kl = e.get("kl")?.arr()?;
    let kl_std = e.get("kl_vs_standard_normal")?.arr()?;
    let got = normal_kl(
        &tensor(&m1, f)?,
        &tensor(&l1, f)?,
        &tensor(&m2, f)?,
        &tensor(&l2, f)?,
    )?;
    tally.cmp_tensor("normal_kl.expected.kl (tensor)", Path::F64, &got, &kl, tol)?;
    let host: Vec<f64> = (0..m1.len())
        .map(|k| normal_kl_f64(m1.data[k], l1.data[k], m2.data[k], l2.data[k]))
        .collect();
    tally.cmp_vec(
        "normal_kl.expected.kl (f64 scalar)",
        Path::F64,
        &host,
        &kl,
        tol,
    );
    let got = normal_kl_standard(&tensor(&m1, f)?, &tensor(&l1, f)?)?;
    tally.cmp_tensor(
        "normal_kl.expected.kl_vs_standard_normal (tensor)",
        Path::F64,
        &got,
        &kl_std,
        tol,
    )?;
    let host: Vec<f64> = (0..m1.len())
        .map(|k| normal_kl_f64(m1.data[k], l1.data[k], 0.0, 0.0))
        .collect();
    tally.cmp_vec(
        "normal_kl.expected.kl_vs_standard_normal (f64 scalar)",
        Path::F64,
        &host,
        &kl_std,
        tol,
    );

    let s = doc.get("discretized_gaussian_log_likelihood")?;
    let i = s.get("inputs")?;
    let u8s = i.get("x_uint8")?.arr()?.to_usize()?;
    let x = i.get("x")?.arr()?;
    let means = i.get("means")?.arr()?;
    let log_scales = i.get("log_scales")?.arr()?;
    // The input convention: x = x_uint8 / 255 * 2 - 1.
    let from_u8: Vec<f64> = u8s.iter().map(|&u| u as f64 / 255.0 * 2.0 - 1.0).collect();
    tally.cmp_vec(
        "discretized_gaussian_log_likelihood.inputs.x from x_uint8",
        Path::F64,
        &from_u8,
        &x,
        tol,
    );
    let want = s.get("expected")?.get("log_probs")?.arr()?;
    let got = discretized_gaussian_log_likelihood(
        &tensor(&x, f)?,
        &tensor(&means, f)?,
        &tensor(&log_scales, f)?,
    )?;
    tally.cmp_tensor(
        "discretized_gaussian_log_likelihood.expected.log_probs (tensor)",
        Path::F64,
        &got,
        &want,
        tol,
    )?;
    let host: Vec<f64> = (0..x.len())
        .map(|k| {
            discretized_gaussian_log_likelihood_f64(x.data[k], means.data[k], log_scales.data[k])
        })
        .collect();
    tally.cmp_vec(
        "discretized_gaussian_log_likelihood.expected.log_probs (f64 scalar)",
        Path::F64,
        &host,
        &want,
        tol,
    );
    Ok(())
}

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    let name = c.get("name")?.str()?;
    let var_type = match c.get("model_var_type")?.str()? {
        "learned_range" => ModelVarType::LearnedRange,
        "learned" => ModelVarType::Learned,
        "fixed_small" => ModelVarType::FixedSmall,
        "fixed_large" => ModelVarType::FixedLarge,
        other => bail!("unknown model_var_type {other:?}"),
    };
    let clip = c.get("clip_denoised")?.bool()?;
    let d = GaussianDiffusion::new(
        schedule_of(c)?,
        ModelMeanType::Epsilon,
        var_type,
        LossType::RescaledMse,
    );
    let tol = Tol::Mixed(TOL_F64);
    let f = DType::F64;
    let p = Path::F64;
    let inp = c.get("inputs")?;
    let x0 = tensor(&inp.get("x0")?.arr()?, f)?;
    let noise = tensor(&inp.get("noise")?.arr()?, f)?;
    let t = inp.get("t")?.arr()?.to_usize()?;
    let model_output = tensor(&inp.get("model_output")?.arr()?, f)?;
    // model_output must be the concatenation [model_eps, model_var_values] along channels.
    let ch = x0.dim(1)?;
    let eps_part = model_output.narrow(1, 0, ch)?;
    tally.cmp_tensor(
        &format!("{name}.inputs.model_eps (= model_output[:, :C])"),
        p,
        &eps_part,
        &inp.get("model_eps")?.arr()?,
        Tol::Abs(0.0),
    )?;
    if var_type.is_learned() {
        let var_part = model_output.narrow(1, ch, ch)?;
        tally.cmp_tensor(
            &format!("{name}.inputs.model_var_values (= model_output[:, C:])"),
            p,
            &var_part,
            &inp.get("model_var_values")?.arr()?,
            Tol::Abs(0.0),
        )?;
    }

    let e = c.get("expected")?;
    let arr = |k: &str| e.get(k)?.arr();
    let x_t = d.q_sample(&x0, &t, &noise)?;
    tally.cmp_tensor(&format!("{name}.expected.x_t"), p, &x_t, &arr("x_t")?, tol)?;

    let vb = d.vb_terms(&model_output, &x0, &x_t, &t, clip)?;
    tally.cmp_tensor(
        &format!("{name}.expected.true_mean"),
        p,
        &vb.true_mean,
        &arr("true_mean")?,
        tol,
    )?;
    tally.cmp_tensor(
        &format!("{name}.expected.true_log_variance_clipped"),
        p,
        &vb.true_log_variance_clipped,
        &arr("true_log_variance_clipped")?,
        tol,
    )?;
    tally.cmp_tensor(
        &format!("{name}.expected.pred_xstart"),
        p,
        &vb.pred_xstart,
        &arr("pred_xstart")?,
        tol,
    )?;
    tally.cmp_tensor(
        &format!("{name}.expected.model_mean"),
        p,
        &vb.model_mean,
        &arr("model_mean")?,
        tol,
    )?;
    let mlv = vb.model_log_variance.broadcast_as(x0.shape())?;
    tally.cmp_tensor(
        &format!("{name}.expected.model_log_variance"),
        p,
        &mlv,
        &arr("model_log_variance")?,
        tol,
    )?;
    tally.cmp_tensor(
        &format!("{name}.expected.kl_bpd"),
        p,
        &vb.kl_bpd,
        &arr("kl_bpd")?,
        tol,
    )?;
    // README: the decoder term of samples with t > 0 cancels two tanh-CDF values near 0 or 1; 1e-5 there.
    let dec = arr("decoder_nll_bpd")?;
    let got = to_host(&vb.decoder_nll_bpd)?;
    tally.cmp(
        &format!("{name}.expected.decoder_nll_bpd"),
        p,
        &got,
        &dec.data,
        |k| {
            if t[k] == 0 {
                tol
            } else {
                Tol::Mixed(DECODER_TOL_T_POSITIVE)
            }
        },
    );
    tally.cmp_tensor(
        &format!("{name}.expected.vb_bpd"),
        p,
        &vb.output,
        &arr("vb_bpd")?,
        tol,
    )?;
    // vb_terms_bpd is the same function; check its two outputs too.
    let (bpd, px) = d.vb_terms_bpd(&model_output, &x0, &x_t, &t, clip)?;
    tally.cmp_tensor(
        &format!("{name}.expected.vb_bpd (vb_terms_bpd)"),
        p,
        &bpd,
        &arr("vb_bpd")?,
        tol,
    )?;
    tally.cmp_tensor(
        &format!("{name}.expected.pred_xstart (vb_terms_bpd)"),
        p,
        &px,
        &arr("pred_xstart")?,
        tol,
    )?;
    tally.cmp_tensor(
        &format!("{name}.expected.prior_bpd"),
        p,
        &d.prior_bpd(&x0)?,
        &arr("prior_bpd")?,
        tol,
    )?;

    let losses = d.training_losses(&model_output, &x0, &x_t, &noise, &t)?;
    tally.cmp_tensor(
        &format!("{name}.expected.mse"),
        p,
        &losses.mse,
        &arr("mse")?,
        tol,
    )?;
    let vb_rescaled = losses
        .vb
        .clone()
        .ok_or_else(|| anyhow::anyhow!("training_losses returned no vb term"))?;
    tally.cmp_tensor(
        &format!("{name}.expected.vb_rescaled"),
        p,
        &vb_rescaled,
        &arr("vb_rescaled")?,
        tol,
    )?;
    tally.cmp_tensor(
        &format!("{name}.expected.loss"),
        p,
        &losses.loss,
        &arr("loss")?,
        tol,
    )?;
    let mean: Tensor = losses.loss.mean_all()?;
    tally.cmp_scalar(
        &format!("{name}.expected.loss_mean"),
        p,
        mean.to_scalar::<f64>()?,
        e.get("loss_mean")?.f64()?,
        tol,
    );
    // lambda * L_vlb with L_vlb ~ T * L_t is the T/1000 factor applied to the vb term.
    let lambda = e.get("lambda")?.f64()?;
    tally.cmp_scalar(
        &format!("{name}.expected.lambda (vb factor = lambda * T)"),
        p,
        d.vb_rescale_factor(),
        lambda * d.num_timesteps() as f64,
        tol,
    );
    Ok(())
}
