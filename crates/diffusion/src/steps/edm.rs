//! Karras et al. 2022 (EDM) samplers in sigma space, for a VP model.
//!
//! A VP sample `x` at `abar` is `x_ve / sqrt(1 + sigma^2)` with `sigma = sqrt(1 / abar - 1)`, and the
//! probability-flow ODE is `dx_ve / dsigma = d` with `d = (x_ve - D(x_ve; sigma)) / sigma`, which for an
//! eps-predicting VP model is exactly the model's eps at the VP sample. Every function takes that `d`,
//! so it is computed (and guided) as for any other sampler.
//!
//! Algorithm 1 (deterministic) is [`edm_euler`] then, unless the next level is 0, [`edm_heun`];
//! Algorithm 2 (stochastic) first raises the noise level from `sigma` to `sigma_hat = sigma (1 + gamma)`
//! with [`edm_churn`] ("churn"), then takes the same two steps from `sigma_hat`.

use candle_core::Tensor;

use crate::error::{DiffusionError, Result};
use crate::tensor::same_shape;

/// Algorithm 2's stochasticity settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EdmChurn {
    /// Total churn: each level in range gets `gamma = min(S_churn / N, sqrt(2) - 1)`.
    pub s_churn: f64,
    /// Churn only levels with `S_tmin <= sigma <= S_tmax`.
    pub s_tmin: f64,
    pub s_tmax: f64,
    /// The added noise is scaled by S_noise (slightly above 1 offsets the detail the denoiser removes).
    pub s_noise: f64,
}

impl EdmChurn {
    /// No churn: Algorithm 2 is then Algorithm 1.
    pub const NONE: EdmChurn = EdmChurn {
        s_churn: 0.0,
        s_tmin: 0.0,
        s_tmax: f64::INFINITY,
        s_noise: 1.0,
    };

    /// EDM's Table 5 settings for the ADM ImageNet-64 model, a discrete-time VP (iDDPM) network like
    /// this project's: S_churn 80, S_tmin 0.05, S_tmax 50, S_noise 1.003.
    pub const IDDPM: EdmChurn = EdmChurn {
        s_churn: 80.0,
        s_tmin: 0.05,
        s_tmax: 50.0,
        s_noise: 1.003,
    };

    /// All settings finite (S_tmax may be +inf), non-negative, and S_tmin <= S_tmax.
    pub fn validate(&self) -> Result<()> {
        let ok = self.s_churn.is_finite()
            && self.s_churn >= 0.0
            && self.s_tmin.is_finite()
            && self.s_tmin >= 0.0
            && !self.s_tmax.is_nan()
            && self.s_tmax >= self.s_tmin
            && self.s_noise.is_finite()
            && self.s_noise >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(DiffusionError::InvalidUse(format!(
                "EDM churn settings need S_churn >= 0, 0 <= S_tmin <= S_tmax and S_noise >= 0, got {self:?}"
            )))
        }
    }

    /// `gamma` for noise level `sigma` of an `n`-level schedule.
    pub fn gamma(&self, sigma: f64, n: usize) -> f64 {
        if n > 0 && self.s_tmin <= sigma && sigma <= self.s_tmax {
            (self.s_churn / n as f64).min(std::f64::consts::SQRT_2 - 1.0)
        } else {
            0.0
        }
    }
}

/// Raises the noise level of `x_ve` from `sigma` to `sigma_hat >= sigma`:
/// `x_hat = x_ve + sqrt(sigma_hat^2 - sigma^2) * s_noise * noise`.
pub fn edm_churn(
    x_ve: &Tensor,
    sigma: f64,
    sigma_hat: f64,
    s_noise: f64,
    noise: &Tensor,
) -> Result<Tensor> {
    same_shape(x_ve, "x", noise, "noise")?;
    if !(sigma_hat >= sigma && sigma >= 0.0) {
        return Err(DiffusionError::InvalidUse(format!(
            "churn must raise the noise level: sigma {sigma} -> {sigma_hat}"
        )));
    }
    let amp = (sigma_hat * sigma_hat - sigma * sigma).sqrt() * s_noise;
    Ok(x_ve.add(&noise.affine(amp, 0.0)?)?)
}

/// The Euler step from `sigma` to `sigma_next` with slope `d`: `x + (sigma_next - sigma) d`.
pub fn edm_euler(x_ve: &Tensor, sigma: f64, sigma_next: f64, d: &Tensor) -> Result<Tensor> {
    same_shape(x_ve, "x", d, "d")?;
    Ok(x_ve.add(&d.affine(sigma_next - sigma, 0.0)?)?)
}

/// Heun's correction: `x + (sigma_next - sigma) (d + d_next) / 2`, `d_next` being the slope at the
/// Euler step's result.
pub fn edm_heun(
    x_ve: &Tensor,
    sigma: f64,
    sigma_next: f64,
    d: &Tensor,
    d_next: &Tensor,
) -> Result<Tensor> {
    same_shape(x_ve, "x", d, "d")?;
    same_shape(d, "d", d_next, "d_next")?;
    Ok(x_ve.add(&d.add(d_next)?.affine(0.5 * (sigma_next - sigma), 0.0)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn gamma_is_capped_and_limited_to_its_range() {
        let c = EdmChurn::IDDPM;
        assert_eq!(c.gamma(80.0, 18), 0.0, "above S_tmax");
        assert_eq!(c.gamma(0.01, 18), 0.0, "below S_tmin");
        assert_eq!(
            c.gamma(1.0, 18),
            std::f64::consts::SQRT_2 - 1.0,
            "80 / 18 is capped"
        );
        let small = EdmChurn { s_churn: 2.0, ..c };
        assert_eq!(small.gamma(1.0, 10), 0.2);
        assert_eq!(EdmChurn::NONE.gamma(1.0, 10), 0.0);
        assert!(EdmChurn::NONE.validate().is_ok() && c.validate().is_ok());
        for bad in [
            EdmChurn { s_churn: -1.0, ..c },
            EdmChurn { s_tmin: 60.0, ..c },
            EdmChurn {
                s_noise: f64::NAN,
                ..c
            },
            EdmChurn {
                s_tmax: f64::NAN,
                ..c
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn churn_only_raises_the_noise_level() {
        let x = Tensor::ones((2, 3), DType::F64, &Device::Cpu).unwrap();
        let z = Tensor::ones((2, 3), DType::F64, &Device::Cpu).unwrap();
        // sqrt(5^2 - 3^2) = 4, times S_noise 0.5
        let y = edm_churn(&x, 3.0, 5.0, 0.5, &z).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap()[1], vec![3.0; 3]);
        assert_eq!(
            edm_churn(&x, 3.0, 3.0, 1.0, &z)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap(),
            x.to_vec2::<f64>().unwrap()
        );
        assert!(edm_churn(&x, 3.0, 2.0, 1.0, &z).is_err());
        let wrong = Tensor::ones((2, 2), DType::F64, &Device::Cpu).unwrap();
        assert!(edm_churn(&x, 1.0, 2.0, 1.0, &wrong).is_err());
        assert!(edm_heun(&x, 1.0, 0.5, &x, &wrong).is_err());
    }
}
