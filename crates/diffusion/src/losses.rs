//! Likelihood pieces of the variational bound (improved-diffusion `losses.py`), for tensors and for f64.
//!
//! All values are in nats; callers divide by ln 2 for bits.

use candle_core::Tensor;

use crate::error::Result;

/// `ln(1e-12)`: the floor improved-diffusion puts on bin masses before taking logs.
pub const LOG_PROB_FLOOR: f64 = 1e-12;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)

/// KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise with broadcasting.
pub fn normal_kl(
    mean1: &Tensor,
    logvar1: &Tensor,
    mean2: &Tensor,
    logvar2: &Tensor,
) -> Result<Tensor> {
    let diff = mean1.broadcast_sub(mean2)?;
    let ratio = logvar1.broadcast_sub(logvar2)?.exp()?;
    let sq = diff.sqr()?.broadcast_mul(&logvar2.neg()?.exp()?)?;
    let lv = logvar2.broadcast_sub(logvar1)?;
    let sum = lv.broadcast_add(&ratio)?.broadcast_add(&sq)?;
    Ok(sum.affine(0.5, -0.5)?)
}

/// KL(N(mean1, exp(logvar1)) || N(0, 1)): the prior term, whose second Gaussian is fixed.
pub fn normal_kl_standard(mean1: &Tensor, logvar1: &Tensor) -> Result<Tensor> {
    // 0.5 * (-1 - logvar1 + exp(logvar1) + mean1^2)
    let lv = logvar1.broadcast_as(mean1.shape())?;
    let s = lv.exp()?.sub(&lv)?.add(&mean1.sqr()?)?;
    Ok(s.affine(0.5, -0.5)?)
}

/// f64 `normal_kl`, with the operation order of improved-diffusion.
pub fn normal_kl_f64(mean1: f64, logvar1: f64, mean2: f64, logvar2: f64) -> f64 {
    0.5 * (-1.0 + logvar2 - logvar1
        + (logvar1 - logvar2).exp()
        + (mean1 - mean2) * (mean1 - mean2) * (-logvar2).exp())
}

/// The tanh approximation of the standard normal CDF used by improved-diffusion (not `erf`): matching
/// it keeps bits/dim comparable with published numbers.
pub fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let cube = x.sqr()?.mul(x)?;
    let inner = x
        .add(&cube.affine(0.044715, 0.0)?)?
        .affine(SQRT_2_OVER_PI, 0.0)?;
    Ok(inner.tanh()?.affine(0.5, 0.5)?)
}

/// f64 `approx_standard_normal_cdf`.
pub fn approx_standard_normal_cdf_f64(x: f64) -> f64 {
    0.5 * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x))).tanh())
}

/// Log-likelihood (nats) of 8-bit data `x` (scaled to [-1, 1]) under a Gaussian discretized into 256 bins
/// of width 2/255; the outermost bins extend to infinity. `log_scales` is the log standard deviation.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Result<Tensor> {
    let centered = x.broadcast_sub(means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    let half_bin = 1.0 / 255.0;
    let plus_in = centered.affine(1.0, half_bin)?.broadcast_mul(&inv_stdv)?;
    let min_in = centered.affine(1.0, -half_bin)?.broadcast_mul(&inv_stdv)?;
    let cdf_plus = approx_standard_normal_cdf(&plus_in)?;
    let cdf_min = approx_standard_normal_cdf(&min_in)?;
    let log_cdf_plus = cdf_plus.maximum(LOG_PROB_FLOOR)?.log()?;
    let log_one_minus_cdf_min = cdf_min.affine(-1.0, 1.0)?.maximum(LOG_PROB_FLOOR)?.log()?;
    let log_delta = cdf_plus.sub(&cdf_min)?.maximum(LOG_PROB_FLOOR)?.log()?;
    let x = x.broadcast_as(log_delta.shape())?;
    let upper = x
        .gt(0.999)?
        .where_cond(&log_one_minus_cdf_min, &log_delta)?;
    Ok(x.lt(-0.999)?.where_cond(&log_cdf_plus, &upper)?)
}

/// f64 `discretized_gaussian_log_likelihood` for one value.
pub fn discretized_gaussian_log_likelihood_f64(x: f64, mean: f64, log_scale: f64) -> f64 {
    let centered = x - mean;
    let inv_stdv = (-log_scale).exp();
    let cdf_plus = approx_standard_normal_cdf_f64(inv_stdv * (centered + 1.0 / 255.0));
    let cdf_min = approx_standard_normal_cdf_f64(inv_stdv * (centered - 1.0 / 255.0));
    if x < -0.999 {
        cdf_plus.max(LOG_PROB_FLOOR).ln()
    } else if x > 0.999 {
        (1.0 - cdf_min).max(LOG_PROB_FLOOR).ln()
    } else {
        (cdf_plus - cdf_min).max(LOG_PROB_FLOOR).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn kl_of_identical_gaussians_is_zero() {
        let m = t(&[0.3, -2.0, 5.0]);
        let lv = t(&[-1.0, 0.0, 2.5]);
        let kl = normal_kl(&m, &lv, &m, &lv)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(kl.iter().all(|&k| k.abs() < 1e-15), "{kl:?}");
        assert_eq!(normal_kl_f64(0.3, -1.0, 0.3, -1.0), 0.0);
        let z = normal_kl_standard(&t(&[0.0]), &t(&[0.0])).unwrap();
        assert_eq!(z.to_vec1::<f64>().unwrap(), vec![0.0]);
    }

    #[test]
    fn kl_hand_checked() {
        // KL(N(1, 1) || N(0, 1)) = 0.5; KL(N(0, e) || N(0, 1)) = 0.5 * (e - 2).
        assert!((normal_kl_f64(1.0, 0.0, 0.0, 0.0) - 0.5).abs() < 1e-15);
        let e = std::f64::consts::E;
        assert!((normal_kl_f64(0.0, 1.0, 0.0, 0.0) - 0.5 * (e - 2.0)).abs() < 1e-15);
        let kl = normal_kl_standard(&t(&[1.0, 0.0]), &t(&[0.0, 1.0])).unwrap();
        let kl = kl.to_vec1::<f64>().unwrap();
        assert!((kl[0] - 0.5).abs() < 1e-15 && (kl[1] - 0.5 * (e - 2.0)).abs() < 1e-15);
    }

    #[test]
    fn cdf_is_symmetric_and_close_to_exact() {
        assert_eq!(approx_standard_normal_cdf_f64(0.0), 0.5);
        for x in [0.1, 0.7, 1.3, 2.2] {
            let s = approx_standard_normal_cdf_f64(x) + approx_standard_normal_cdf_f64(-x);
            assert!((s - 1.0).abs() < 1e-15);
        }
        // Phi(1) = 0.8413447460685429; the tanh approximation is good to about 1e-4 there.
        assert!((approx_standard_normal_cdf_f64(1.0) - 0.841_344_746_068_542_9).abs() < 2e-4);
    }

    #[test]
    fn sharp_decoder_at_the_data_has_zero_nll() {
        // A decoder with a tiny scale centred on the bin puts all mass in it: log-likelihood ~ 0.
        let xs: Vec<f64> = [0u8, 1, 77, 128, 254, 255]
            .iter()
            .map(|&u| u as f64 / 255.0 * 2.0 - 1.0)
            .collect();
        let x = t(&xs);
        let ls = t(&vec![-12.0; xs.len()]);
        let ll = discretized_gaussian_log_likelihood(&x, &x, &ls).unwrap();
        for (i, v) in ll.to_vec1::<f64>().unwrap().into_iter().enumerate() {
            assert!(v.abs() < 1e-12, "entry {i}: {v}");
            assert!(discretized_gaussian_log_likelihood_f64(xs[i], xs[i], -12.0).abs() < 1e-12);
        }
        // A decoder far from the data hits the 1e-12 floor.
        let far = discretized_gaussian_log_likelihood_f64(0.0, 0.9, -12.0);
        assert!((far - LOG_PROB_FLOOR.ln()).abs() < 1e-12);
    }

    #[test]
    fn bin_masses_sum_to_one() {
        // Summing exp(log-likelihood) over all 256 bins gives 1 for any mean and scale.
        for (mean, ls) in [(0.1, -2.0), (-0.7, -4.0), (0.0, 0.5)] {
            let total: f64 = (0..256)
                .map(|u| {
                    discretized_gaussian_log_likelihood_f64(u as f64 / 127.5 - 1.0, mean, ls).exp()
                })
                .sum();
            assert!((total - 1.0).abs() < 1e-9, "mean {mean} ls {ls}: {total}");
        }
    }

    #[test]
    fn tensor_and_scalar_agree() {
        let xs = [-1.0, -0.5, 0.0, 0.3, 1.0];
        let ms = [-0.9, -0.45, 0.1, 0.2, 0.95];
        let ls = [-3.0, -2.0, -1.0, -4.0, -2.5];
        let got = discretized_gaussian_log_likelihood(&t(&xs), &t(&ms), &t(&ls))
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in 0..xs.len() {
            let want = discretized_gaussian_log_likelihood_f64(xs[i], ms[i], ls[i]);
            assert!((got[i] - want).abs() < 1e-12, "{i}: {} vs {want}", got[i]);
        }
    }
}
