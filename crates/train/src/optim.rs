//! AdamW with linear warmup and global-norm gradient clipping, on candle tensors.
//!
//! Written here rather than taken from `candle_nn::AdamW` because the moments must be saved in and
//! restored from checkpoints bit for bit (exact resume), and candle's optimizer keeps them private.
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay, Loshchilov & Hutter):
//!
//! ```text
//! p <- p * (1 - lr * wd)
//! m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
//! p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! where `t` counts *applied* updates (a skipped non-finite step does not advance it).

use candle_core::{DType, Result, Tensor, Var};

/// Hyper-parameters (validated by the config layer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
}

impl AdamWParams {
    /// Learning rate for 0-based step `step`: linear ramp over the first `warmup_steps` steps so
    /// that the first updates, taken with badly estimated second moments, stay small.
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps == 0 {
            self.lr
        } else {
            self.lr * ((step + 1) as f64 / self.warmup_steps as f64).min(1.0)
        }
    }
}

pub struct AdamW {
    pub params: AdamWParams,
    /// First moments (`exp_avg` in PyTorch), one per parameter, same order as the parameters.
    pub m: Vec<Tensor>,
    /// Second moments (`exp_avg_sq`).
    pub v: Vec<Tensor>,
    /// Number of updates applied so far (bias-correction exponent).
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: &[Var], params: AdamWParams) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            params,
            m: vars.iter().map(zeros).collect::<Result<_>>()?,
            v: vars.iter().map(zeros).collect::<Result<_>>()?,
            t: 0,
        })
    }

    /// One update with learning rate `lr` (already warmed up by the caller).
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        assert_eq!(vars.len(), grads.len());
        assert_eq!(vars.len(), self.m.len());
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        let step_size = lr / bc1;
        let inv_sqrt_bc2 = 1.0 / bc2.sqrt();
        let decay = 1.0 - lr * p.weight_decay;
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            // Detached so the moments (kept across steps) never hold a computation graph.
            let g = g.detach().to_dtype(var.dtype())?;
            let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = v.sqrt()?.affine(inv_sqrt_bc2, p.eps)?;
            let upd = (m.div(&denom)? * step_size)?;
            let w = var.as_tensor();
            let w = if p.weight_decay != 0.0 {
                (w * decay)?
            } else {
                w.clone()
            };
            var.set(&(w - upd)?)?;
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }
}

/// Global L2 norm of a gradient set, accumulated in f64 so it does not depend on tensor order
/// beyond rounding of the per-tensor f32 sums.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        let s = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        total += s as f64;
    }
    Ok(total.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (PyTorch `clip_grad_norm_`).
/// Returns the gradients unchanged when within the bound or when clipping is disabled.
pub fn clip_by_global_norm(
    grads: Vec<Tensor>,
    norm: f64,
    max_norm: Option<f64>,
) -> Result<Vec<Tensor>> {
    match max_norm {
        Some(max) if norm > max => {
            let scale = max / (norm + 1e-6);
            grads.into_iter().map(|g| g * scale).collect()
        }
        _ => Ok(grads),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Scalar AdamW written out by hand (PyTorch semantics) to check the tensor implementation.
    fn reference(p0: f64, grads: &[f64], hp: AdamWParams) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (k, &g) in grads.iter().enumerate() {
            let t = (k + 1) as i32;
            let lr = hp.lr_at(k as u64);
            p *= 1.0 - lr * hp.weight_decay;
            m = hp.beta1 * m + (1.0 - hp.beta1) * g;
            v = hp.beta2 * v + (1.0 - hp.beta2) * g * g;
            let mh = m / (1.0 - hp.beta1.powi(t));
            let vh = v / (1.0 - hp.beta2.powi(t));
            p -= lr * mh / (vh.sqrt() + hp.eps);
        }
        p
    }

    #[test]
    fn matches_scalar_reference() {
        let hp = AdamWParams {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.05,
            warmup_steps: 3,
        };
        let var = Var::from_vec(vec![1.0f64, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&var), hp).unwrap();
        let gs = [[0.5, -1.0], [0.25, 3.0], [-0.1, 0.2], [1.0, 1.0]];
        for (k, g) in gs.iter().enumerate() {
            // a gradient that records an op, as candle's backward produces
            let gt = (Tensor::new(&g[..], &Device::Cpu).unwrap()
                + (var.as_tensor() * 0.0).unwrap())
            .unwrap();
            assert!(gt.track_op());
            opt.step(std::slice::from_ref(&var), &[gt], hp.lr_at(k as u64))
                .unwrap();
        }
        // moments hold no computation graph, even from gradients that carry one
        assert!(opt.m.iter().chain(&opt.v).all(|t| !t.track_op()));
        let got = var.as_tensor().to_vec1::<f64>().unwrap();
        let exp0 = reference(1.0, &gs.iter().map(|g| g[0]).collect::<Vec<_>>(), hp);
        let exp1 = reference(-2.0, &gs.iter().map(|g| g[1]).collect::<Vec<_>>(), hp);
        assert!((got[0] - exp0).abs() < 1e-12, "{} vs {exp0}", got[0]);
        assert!((got[1] - exp1).abs() < 1e-12, "{} vs {exp1}", got[1]);
        assert_eq!(opt.t, 4);
    }

    #[test]
    fn warmup_is_linear_then_flat() {
        let hp = AdamWParams {
            lr: 1.0,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 4,
        };
        let lrs: Vec<f64> = (0..6).map(|s| hp.lr_at(s)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(
            AdamWParams {
                warmup_steps: 0,
                ..hp
            }
            .lr_at(0),
            1.0
        );
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let d = Device::Cpu;
        let g = vec![
            Tensor::new(&[3f32, 0.0], &d).unwrap(),
            Tensor::new(&[4f32], &d).unwrap(),
        ];
        let n = global_norm(&g).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let c = clip_by_global_norm(g.clone(), n, Some(1.0)).unwrap();
        assert!((global_norm(&c).unwrap() - 1.0).abs() < 1e-5);
        let u = clip_by_global_norm(g, n, Some(10.0)).unwrap();
        assert!((global_norm(&u).unwrap() - 5.0).abs() < 1e-9);
    }
}
