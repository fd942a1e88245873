//! Bookkeeping for the full variational bound in bits/dim (improved-diffusion `calc_bpd_loop`).
//!
//! The bound of a batch is `L_T + sum_{t>=1} L_{t-1} + L_0`: the prior term, the KL terms and the
//! decoder term. An evaluator computes each timestep's term with
//! [`crate::GaussianDiffusion::calc_bpd_term`] (any order, any device) and feeds the host values here;
//! this checks that every timestep was seen exactly once, so a partial loop cannot pass as a bound.

use crate::error::{DiffusionError, Result};

/// Per-sample bound terms of one batch, collected timestep by timestep.
#[derive(Debug, Clone)]
pub struct ElboAccumulator {
    batch: usize,
    /// `terms[t][b]`: L_t of sample b in bits/dim (t = 0 is the decoder term).
    terms: Vec<Option<Vec<f64>>>,
}

/// The bound of each sample, split into its parts (all bits/dim, `[B]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ElboBreakdown {
    /// L_T: KL(q(x_T|x_0) || N(0, I)).
    pub prior_bpd: Vec<f64>,
    /// Sum over t >= 1 of KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)).
    pub kl_bpd: Vec<f64>,
    /// L_0: -log p(x_0|x_1) under the discretized Gaussian decoder.
    pub decoder_bpd: Vec<f64>,
    /// prior + kl + decoder.
    pub total_bpd: Vec<f64>,
    /// Batch mean of each L_t, indexed by t.
    pub mean_term_bpd: Vec<f64>,
}

impl ElboAccumulator {
    pub fn new(num_timesteps: usize, batch: usize) -> Self {
        Self {
            batch,
            terms: vec![None; num_timesteps],
        }
    }

    /// Records L_t for every sample of the batch.
    pub fn add(&mut self, t: usize, vb_bpd: &[f64]) -> Result<()> {
        let n = self.terms.len();
        let slot = self
            .terms
            .get_mut(t)
            .ok_or(DiffusionError::TimestepOutOfRange {
                t,
                num_timesteps: n,
            })?;
        if vb_bpd.len() != self.batch {
            return Err(DiffusionError::Shape(format!(
                "{} values for a batch of {}",
                vb_bpd.len(),
                self.batch
            )));
        }
        if slot.is_some() {
            return Err(DiffusionError::InvalidUse(format!(
                "timestep {t} added twice"
            )));
        }
        *slot = Some(vb_bpd.to_vec());
        Ok(())
    }

    /// Adds the prior term and returns the bound; fails if a timestep is missing.
    pub fn finish(&self, prior_bpd: &[f64]) -> Result<ElboBreakdown> {
        if prior_bpd.len() != self.batch {
            return Err(DiffusionError::Shape(format!(
                "{} prior values for a batch of {}",
                prior_bpd.len(),
                self.batch
            )));
        }
        let mut terms = Vec::with_capacity(self.terms.len());
        for (t, v) in self.terms.iter().enumerate() {
            terms.push(v.as_ref().ok_or_else(|| {
                DiffusionError::InvalidUse(format!("bound term for timestep {t} is missing"))
            })?);
        }
        let b = self.batch;
        let decoder_bpd = terms[0].clone();
        let kl_bpd: Vec<f64> = (0..b)
            .map(|i| terms[1..].iter().map(|v| v[i]).sum())
            .collect();
        let total_bpd = (0..b)
            .map(|i| prior_bpd[i] + kl_bpd[i] + decoder_bpd[i])
            .collect();
        let mean_term_bpd = terms
            .iter()
            .map(|v| v.iter().sum::<f64>() / b.max(1) as f64)
            .collect();
        Ok(ElboBreakdown {
            prior_bpd: prior_bpd.to_vec(),
            kl_bpd,
            decoder_bpd,
            total_bpd,
            mean_term_bpd,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_parts_and_requires_every_timestep() {
        let mut acc = ElboAccumulator::new(3, 2);
        acc.add(2, &[0.5, 1.0]).unwrap();
        acc.add(0, &[2.0, 3.0]).unwrap();
        assert!(acc.finish(&[0.0, 0.0]).is_err());
        assert!(acc.add(0, &[1.0, 1.0]).is_err());
        assert!(acc.add(3, &[1.0, 1.0]).is_err());
        assert!(acc.add(1, &[1.0]).is_err());
        acc.add(1, &[0.25, 0.0]).unwrap();
        let e = acc.finish(&[0.125, 0.0]).unwrap();
        assert_eq!(e.kl_bpd, vec![0.75, 1.0]);
        assert_eq!(e.decoder_bpd, vec![2.0, 3.0]);
        assert_eq!(e.total_bpd, vec![2.875, 4.0]);
        assert_eq!(e.mean_term_bpd, vec![2.5, 0.125, 0.75]);
    }
}
