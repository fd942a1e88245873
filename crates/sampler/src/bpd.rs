//! The full variational bound of a test set in bits per dimension (improved-diffusion
//! `calc_bpd_loop`): for every example, the prior term L_T, the KL terms L_{t-1} for t = T-1 .. 1 and
//! the decoder term L_0, each from one model evaluation at `x_t = q_sample(x0, t, noise)`.
//!
//! The noise of example g at timestep t is ddpm-rng `Stream::Noise` keyed by `(seed, step = t,
//! example = g)` (g = global index in the test set), so the result does not depend on batching or on
//! the number of ranks (up to float summation order).

use candle_core::{DType, Tensor};
use ddpm_diffusion::{ElboAccumulator, GaussianDiffusion};
use ddpm_kernels::{philox_normal, NoiseKey};
use ddpm_rng::Stream;

use crate::denoiser::Denoiser;
use crate::error::{Result, SamplerError};

/// Sums over examples (so ranks can add them up).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BpdSums {
    pub count: f64,
    pub prior: f64,
    pub kl: f64,
    pub decoder: f64,
    pub total: f64,
    pub total_sq: f64,
}

impl BpdSums {
    pub fn to_vec(self) -> Vec<f64> {
        vec![
            self.count,
            self.prior,
            self.kl,
            self.decoder,
            self.total,
            self.total_sq,
        ]
    }

    pub fn from_slice(v: &[f64]) -> Self {
        Self {
            count: v[0],
            prior: v[1],
            kl: v[2],
            decoder: v[3],
            total: v[4],
            total_sq: v[5],
        }
    }

    pub fn add(&mut self, o: &BpdSums) {
        self.count += o.count;
        self.prior += o.prior;
        self.kl += o.kl;
        self.decoder += o.decoder;
        self.total += o.total;
        self.total_sq += o.total_sq;
    }

    /// Means over examples, and the standard error of the total.
    pub fn report(&self) -> BpdReport {
        let n = self.count.max(1.0);
        let mean = self.total / n;
        let var = (self.total_sq / n - mean * mean).max(0.0) * n / (n - 1.0).max(1.0);
        BpdReport {
            num_examples: self.count as usize,
            prior_bpd: self.prior / n,
            kl_bpd: self.kl / n,
            decoder_bpd: self.decoder / n,
            total_bpd: mean,
            total_bpd_stderr: (var / n).sqrt(),
        }
    }
}

/// Mean bound terms, bits/dim.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BpdReport {
    pub num_examples: usize,
    /// L_T.
    pub prior_bpd: f64,
    /// Sum over t >= 1 of L_{t-1} (the KL terms).
    pub kl_bpd: f64,
    /// L_0 (the discretized Gaussian decoder).
    pub decoder_bpd: f64,
    /// L_T + sum L_{t-1} + L_0.
    pub total_bpd: f64,
    pub total_bpd_stderr: f64,
}

/// The bound of one batch `x0` (f32 `[B, C, H, W]` in [-1, 1], global indices from `first_index`),
/// with `T` model evaluations. `progress(t_done)` after each.
#[allow(clippy::too_many_arguments)]
pub fn bpd_batch(
    model: &dyn Denoiser,
    diffusion: &GaussianDiffusion,
    x0: &Tensor,
    labels: Option<&Tensor>,
    first_index: u64,
    seed: u64,
    clip_denoised: bool,
    progress: &mut dyn FnMut(usize),
) -> Result<BpdSums> {
    if diffusion.num_timesteps() != diffusion.original_num_timesteps {
        return Err(SamplerError::Config(
            "the bound needs the full (not respaced) process".into(),
        ));
    }
    let b = x0.dim(0)?;
    let big_t = diffusion.num_timesteps();
    let mut acc = ElboAccumulator::new(big_t, b);
    for (i, t) in (0..big_t).rev().enumerate() {
        let key = NoiseKey {
            seed,
            step: t as u64,
            first_example: first_index,
        };
        let noise = philox_normal(x0.dims().to_vec(), Stream::Noise as u32, key, x0.device())?
            .to_dtype(x0.dtype())?;
        let ts = vec![t; b];
        let x_t = diffusion.q_sample(x0, &ts, &noise)?;
        let out = model.predict(&x_t, &ts, labels)?;
        let term = diffusion.calc_bpd_term(&out, x0, &x_t, &noise, &ts, clip_denoised)?;
        let vb: Vec<f64> = term.vb.to_dtype(DType::F64)?.to_vec1()?;
        acc.add(t, &vb)?;
        progress(i + 1);
    }
    // in f64: with the cosine schedule 1 - abar_{T-1} rounds to 1 in f32 and the (tiny) prior term to 0
    let prior: Vec<f64> = diffusion.prior_bpd(&x0.to_dtype(DType::F64)?)?.to_vec1()?;
    let e = acc.finish(&prior)?;
    let mut s = BpdSums {
        count: b as f64,
        ..Default::default()
    };
    for i in 0..b {
        if !e.total_bpd[i].is_finite() {
            return Err(SamplerError::NonFinite {
                what: format!("the bound of example {}", first_index + i as u64),
                step: 0,
            });
        }
        s.prior += e.prior_bpd[i];
        s.kl += e.kl_bpd[i];
        s.decoder += e.decoder_bpd[i];
        s.total += e.total_bpd[i];
        s.total_sq += e.total_bpd[i] * e.total_bpd[i];
    }
    Ok(s)
}
