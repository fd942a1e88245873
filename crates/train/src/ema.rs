//! Exponential moving averages of the parameters, one per configured rate.
//!
//! Sampling quality of diffusion models depends strongly on EMA weights (Ho et al. use 0.9999), and
//! which rate is best depends on the run length, so several rates can be tracked at once and each is
//! checkpointed separately (`ema_<rate>.safetensors`).

use candle_core::{Result, Tensor, Var};

pub struct Ema {
    pub rate: f64,
    /// Averaged parameters, in the same order as the model's parameter list.
    pub params: Vec<Tensor>,
}

impl Ema {
    /// Starts from a copy of the current parameters (improved-diffusion does the same).
    pub fn new(rate: f64, vars: &[Var]) -> Result<Self> {
        Ok(Self {
            rate,
            params: vars
                .iter()
                .map(|v| Ok(v.as_tensor().copy()?.detach()))
                .collect::<Result<_>>()?,
        })
    }

    /// Effective decay for update number `n` (0-based). With `warmup`, `min(rate, (1+n)/(10+n))`
    /// lets the average forget the random initialisation quickly in short runs; without it this is
    /// the plain rate.
    pub fn decay(&self, n: u64, warmup: bool) -> f64 {
        if warmup {
            self.rate.min((1.0 + n as f64) / (10.0 + n as f64))
        } else {
            self.rate
        }
    }

    /// `ema <- d * ema + (1 - d) * p`.
    pub fn update(&mut self, vars: &[Var], decay: f64) -> Result<()> {
        for (e, v) in self.params.iter_mut().zip(vars) {
            // detach: the parameter is a variable, so the result would otherwise record an op
            // referencing the previous average, and the chain would keep every average alive
            *e = ((&*e * decay)? + (v.as_tensor() * (1.0 - decay))?)?.detach();
        }
        Ok(())
    }
}

// Part of the file names of the checkpoint format, so it is defined with the format.
pub use ddpm_checkpoint::rate_label;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn update_is_the_convex_combination() {
        let v = Var::from_vec(vec![1.0f64, 2.0], 2, &Device::Cpu).unwrap();
        let mut e = Ema::new(0.9, std::slice::from_ref(&v)).unwrap();
        v.set(&Tensor::new(&[11.0f64, 2.0], &Device::Cpu).unwrap())
            .unwrap();
        e.update(std::slice::from_ref(&v), 0.9).unwrap();
        let got = e.params[0].to_vec1::<f64>().unwrap();
        assert!(
            (got[0] - 2.0).abs() < 1e-12 && (got[1] - 2.0).abs() < 1e-12,
            "{got:?}"
        );
    }

    #[test]
    fn warmup_decay_ramps_to_rate() {
        let v = Var::from_vec(vec![0f32], 1, &Device::Cpu).unwrap();
        let e = Ema::new(0.999, &[v]).unwrap();
        assert!((e.decay(0, true) - 0.1).abs() < 1e-12);
        assert_eq!(e.decay(1_000_000, true), 0.999);
        assert_eq!(e.decay(0, false), 0.999);
        assert_eq!(rate_label(0.9999), "0.9999");
    }
}
