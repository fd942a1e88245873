//! Per-example training timesteps: uniform, or loss-aware importance sampling.
//!
//! The loss-aware sampler is improved-diffusion's `LossSecondMomentResampler` (Nichol & Dhariwal
//! 2021, sec. 3.3): it keeps the last 10 losses seen at every `t`, draws `t` with probability
//! proportional to `sqrt(E[L_t^2])` (mixed with 0.1% uniform), and returns importance weights
//! `1 / (T p_t)` so the expected gradient is unchanged. Until every `t` has 10 losses it samples
//! uniformly.
//!
//! Draws are keyed by `(seed, step, global example index)` through ddpm-rng, so they are identical
//! whatever the rank layout and after a resume. The history is updated with the losses of *all*
//! ranks in rank order, so every rank holds the same sampler state.

use ddpm_rng::{Stream, StreamKey};

pub const HISTORY_PER_TERM: usize = 10;
pub const UNIFORM_PROB: f64 = 0.001;

#[derive(Debug, Clone, PartialEq)]
pub enum TimestepSampler {
    Uniform { num_timesteps: usize },
    LossAware(LossSecondMoment),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LossSecondMoment {
    /// Row-major `[T, HISTORY_PER_TERM]`, oldest first.
    pub history: Vec<f64>,
    /// How many losses are stored for each `t` (saturates at `HISTORY_PER_TERM`).
    pub counts: Vec<u64>,
}

impl LossSecondMoment {
    pub fn new(num_timesteps: usize) -> Self {
        Self {
            history: vec![0.0; num_timesteps * HISTORY_PER_TERM],
            counts: vec![0; num_timesteps],
        }
    }

    pub fn num_timesteps(&self) -> usize {
        self.counts.len()
    }

    pub fn warmed_up(&self) -> bool {
        self.counts.iter().all(|&c| c as usize == HISTORY_PER_TERM)
    }

    /// Unnormalised sampling weights (all ones before warm-up).
    pub fn weights(&self) -> Vec<f64> {
        let t = self.num_timesteps();
        if !self.warmed_up() {
            return vec![1.0; t];
        }
        let mut w: Vec<f64> = self
            .history
            .chunks(HISTORY_PER_TERM)
            .map(|h| (h.iter().map(|x| x * x).sum::<f64>() / HISTORY_PER_TERM as f64).sqrt())
            .collect();
        let s: f64 = w.iter().sum();
        for x in &mut w {
            *x = *x / s * (1.0 - UNIFORM_PROB) + UNIFORM_PROB / t as f64;
        }
        w
    }

    pub fn update(&mut self, ts: &[usize], losses: &[f64]) {
        for (&t, &l) in ts.iter().zip(losses) {
            let row = &mut self.history[t * HISTORY_PER_TERM..(t + 1) * HISTORY_PER_TERM];
            let c = &mut self.counts[t];
            if *c as usize == HISTORY_PER_TERM {
                row.rotate_left(1);
                row[HISTORY_PER_TERM - 1] = l;
            } else {
                row[*c as usize] = l;
                *c += 1;
            }
        }
    }
}

impl TimestepSampler {
    pub fn new(num_timesteps: usize, loss_aware: bool) -> Self {
        if loss_aware {
            Self::LossAware(LossSecondMoment::new(num_timesteps))
        } else {
            Self::Uniform { num_timesteps }
        }
    }

    pub fn num_timesteps(&self) -> usize {
        match self {
            Self::Uniform { num_timesteps } => *num_timesteps,
            Self::LossAware(s) => s.num_timesteps(),
        }
    }

    /// Timesteps and importance weights for local examples `first_example .. first_example + n`
    /// (global batch indices) of step `step`.
    pub fn sample(
        &self,
        seed: u64,
        step: u64,
        first_example: u64,
        n: usize,
    ) -> (Vec<usize>, Vec<f32>) {
        match self {
            Self::Uniform { num_timesteps } => {
                let ts = (0..n as u64)
                    .map(|i| {
                        StreamKey::new(seed, Stream::Timestep, step, first_example + i)
                            .below(0, *num_timesteps as u32) as usize
                    })
                    .collect();
                (ts, vec![1.0; n])
            }
            Self::LossAware(s) => {
                let w = s.weights();
                let total: f64 = w.iter().sum();
                let mut cdf = Vec::with_capacity(w.len());
                let mut acc = 0.0;
                for x in &w {
                    acc += x / total;
                    cdf.push(acc);
                }
                let t_len = w.len();
                let mut ts = Vec::with_capacity(n);
                let mut weights = Vec::with_capacity(n);
                for i in 0..n as u64 {
                    let u =
                        StreamKey::new(seed, Stream::ImportanceTimestep, step, first_example + i)
                            .uniform(0) as f64
                            * acc;
                    let t = cdf.partition_point(|&c| c <= u).min(t_len - 1);
                    ts.push(t);
                    weights.push((1.0 / (t_len as f64 * (w[t] / total))) as f32);
                }
                (ts, weights)
            }
        }
    }

    /// Feeds back the per-example losses of the whole global batch (all ranks, rank order).
    pub fn update(&mut self, ts: &[usize], losses: &[f64]) {
        if let Self::LossAware(s) = self {
            s.update(ts, losses);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_depends_only_on_global_index() {
        let s = TimestepSampler::new(1000, false);
        let (all, w) = s.sample(7, 3, 0, 8);
        let (lo, _) = s.sample(7, 3, 0, 4);
        let (hi, _) = s.sample(7, 3, 4, 4);
        assert_eq!([lo, hi].concat(), all);
        assert!(w.iter().all(|&x| x == 1.0));
        assert!(all.iter().all(|&t| t < 1000));
    }

    #[test]
    fn loss_aware_is_uniform_until_warm_then_favours_high_loss() {
        let mut s = TimestepSampler::new(4, true);
        let (_, w) = s.sample(1, 0, 0, 16);
        assert!(w.iter().all(|&x| (x - 1.0).abs() < 1e-6));
        // t = 3 has a loss 10x the others.
        for _ in 0..HISTORY_PER_TERM {
            s.update(&[0, 1, 2, 3], &[1.0, 1.0, 1.0, 10.0]);
        }
        let (ts, w) = s.sample(1, 1, 0, 4000);
        let frac3 = ts.iter().filter(|&&t| t == 3).count() as f64 / ts.len() as f64;
        // p_3 = (10/13)(1 - 0.001) + 0.00025 ~ 0.769
        assert!((frac3 - 0.769).abs() < 0.03, "{frac3}");
        // importance weights undo the bias: E_p[w] = 1
        let mean_w = w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
        assert!((mean_w - 1.0).abs() < 0.1, "{mean_w}");
    }

    #[test]
    fn history_keeps_the_latest_losses() {
        let mut s = LossSecondMoment::new(1);
        for k in 0..15 {
            s.update(&[0], &[k as f64]);
        }
        assert_eq!(s.counts, vec![10]);
        assert_eq!(s.history, (5..15).map(|k| k as f64).collect::<Vec<_>>());
    }
}
