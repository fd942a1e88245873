//! The local part of one training step on one rank: batch -> timesteps, label dropout, fused
//! noising -> forward -> per-example losses (diffusion or classifier) -> gradients, in
//! `train.accumulate` micro-batches.
//!
//! # Gradient accumulation
//! With `train.accumulate = k` the loader hands each rank `k x data.batch` examples per step (the loader
//! is configured with that per-rank batch, so the data order and the epoch boundaries are those of a
//! run with batch `k x data.batch`). They are processed as `k` micro-batches of `B = data.batch`, each
//! with its own forward and backward, and the mean of the `k` gradient sets is the rank's gradient
//! (then averaged over ranks once per step, as without accumulation). Example `i` of micro-batch `j`
//! on rank `r` has global position `p = r*k*B + j*B + i` in the step's batch; timesteps, noise, label
//! dropout and model dropout are keyed by `(seed, step, p)`, exactly as for a rank with batch `k*B`.
//! So `k` micro-batches of `B` compute what one batch of `k*B` does, up to the summation order of the
//! gradient mean, on any number of ranks; the global batch is `ranks x k x B`.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor, D};
use ddpm_kernels::{fused_noising, NoiseKey, Prediction as KPrediction};
use ddpm_rng::{Stream, StreamKey};
use ddpm_unet::{DropoutKey, ForwardCtx};

use crate::config::{Prediction, Task};
use crate::metrics::StepStats;
use crate::run::{Net, Run};
use crate::timesteps::TimestepSampler;

/// This rank's gradients for one step (mean over its micro-batches) and what the step reports.
pub(crate) struct LocalGrads {
    /// One per `Run::vars`, in that order (zeros for a variable without gradient).
    pub(crate) grads: Vec<Tensor>,
    pub(crate) ts: Vec<usize>,
    pub(crate) per_example: Vec<f64>,
    pub(crate) stats: StepStats,
}

/// Result of the local part of one step.
pub(crate) struct LocalStep {
    pub(crate) loss: Tensor,
    pub(crate) ts: Vec<usize>,
    pub(crate) per_example: Vec<f64>,
    pub(crate) stats: StepStats,
}

impl Run<'_> {
    /// Gradients of this rank's batch for 0-based step `step`, in `k = train.accumulate`
    /// micro-batches (see the module documentation). With `k = 1` this is one forward and backward.
    pub(crate) fn local_gradients(
        &self,
        step: u64,
        batch: &ddpm_data::Batch,
        sampler: &TimestepSampler,
    ) -> Result<LocalGrads> {
        let k = self.cfg.train.accumulate;
        let b = batch.shape[0];
        if b % k != 0 {
            bail!("a batch of {b} examples does not split into train.accumulate = {k} micro-batches");
        }
        let mb = b / k;
        let rank_first = (self.comm.rank() * b) as u64;
        let mut out = LocalGrads {
            grads: Vec::new(),
            ts: Vec::with_capacity(b),
            per_example: Vec::with_capacity(b),
            stats: StepStats::default(),
        };
        for j in 0..k {
            let micro;
            let part = if k == 1 {
                batch
            } else {
                micro = micro_batch(batch, j * mb, mb);
                &micro
            };
            let local = self.forward(step, part, rank_first + (j * mb) as u64, sampler)?;
            let gs = local.loss.backward()?;
            let grads: Vec<Tensor> = self
                .vars
                .iter()
                .map(|v| match gs.get(v.as_tensor()) {
                    // detached: a gradient carries the backward graph (and through it the
                    // activations); anything kept across steps (moments) must not keep that alive
                    Some(g) => Ok(g.detach()),
                    None => v.as_tensor().zeros_like(),
                })
                .collect::<candle_core::Result<_>>()?;
            drop(gs);
            out.grads = if j == 0 {
                grads
            } else {
                out.grads
                    .iter()
                    .zip(&grads)
                    .map(|(a, g)| a + g)
                    .collect::<candle_core::Result<_>>()?
            };
            out.ts.extend(local.ts);
            out.per_example.extend(local.per_example);
            let sum: Vec<f64> = out
                .stats
                .to_vec()
                .iter()
                .zip(local.stats.to_vec())
                .map(|(a, b)| a + b)
                .collect();
            out.stats = StepStats::from_slice(&sum);
        }
        if k > 1 {
            let inv = 1.0 / k as f64;
            out.grads = out
                .grads
                .iter()
                .map(|g| g.affine(inv, 0.0))
                .collect::<candle_core::Result<_>>()?;
        }
        Ok(out)
    }

    /// Forward and loss of `batch` for 0-based step `step`; its example 0 has position `first` in
    /// the step's global batch (the key of its timestep, noise and dropout).
    fn forward(
        &self,
        step: u64,
        batch: &ddpm_data::Batch,
        first: u64,
        sampler: &TimestepSampler,
    ) -> Result<LocalStep> {
        let b = batch.shape[0];
        let seed = self.cfg.seed;
        let x0 = Tensor::from_slice(&batch.images, batch.shape.to_vec(), &self.device)?;
        let (ts, iw) = match self.cfg.task {
            Task::Diffusion => sampler.sample(seed, step, first, b),
            // The classifier sees uniformly drawn noise levels, as guided-diffusion's classifier_train
            // (or, with classifier_noised = false, t = 0 only: x_t is then x0 up to a noise of
            // std sqrt(1 - alpha_bar_0), close to the clean images `ddpm-eval` feeds it at t = 0).
            Task::Classifier if self.cfg.diffusion.classifier_noised => {
                TimestepSampler::new(self.diffusion.num_timesteps(), false)
                    .sample(seed, step, first, b)
            }
            Task::Classifier => (vec![0; b], vec![1.0; b]),
        };
        let ts_u32: Vec<u32> = ts.iter().map(|&t| t as u32).collect();
        let pred = match self.cfg.diffusion.prediction {
            Prediction::Eps => KPrediction::Epsilon,
            Prediction::V => KPrediction::V,
            Prediction::X0 => KPrediction::StartX,
        };
        let noised = fused_noising(
            &x0,
            &ts_u32,
            &self.sqrt_ac,
            &self.sqrt_1m_ac,
            NoiseKey {
                seed,
                step,
                first_example: first,
            },
            pred,
        )?;
        let t_model = self
            .diffusion
            .model_timestep_tensor(&ts, DType::F32, &self.device)?;
        let ctx = ForwardCtx::train(DropoutKey {
            seed,
            step,
            first_example: first,
        });
        let labels = batch.labels.as_ref();
        let tcount = self.diffusion.num_timesteps();
        let mut stats = StepStats::default();
        let (loss, per_example) = match &self.net {
            Net::Diffusion(m) => {
                let y = match (self.num_classes, labels) {
                    (Some(k), Some(l)) => {
                        let p = self.cfg.diffusion.label_dropout as f32;
                        let y: Vec<u32> = l
                            .iter()
                            .enumerate()
                            .map(|(i, &c)| {
                                let u =
                                    StreamKey::new(seed, Stream::LabelDrop, step, first + i as u64)
                                        .uniform(0);
                                if p > 0.0 && u < p {
                                    k as u32
                                } else {
                                    c
                                }
                            })
                            .collect();
                        Some(Tensor::new(y.as_slice(), &self.device)?)
                    }
                    (Some(_), None) => {
                        bail!("the model is class-conditional but the batch has no labels")
                    }
                    _ => None,
                };
                let out = m.forward(&noised.x_t, &t_model, y.as_ref(), &ctx)?;
                let l =
                    self.diffusion
                        .training_losses(&out, &x0, &noised.x_t, &noised.noise, &ts)?;
                let per: Vec<f32> = l.loss.to_dtype(DType::F32)?.to_vec1()?;
                let mse: Vec<f32> = l.mse.to_dtype(DType::F32)?.to_vec1()?;
                let vb: Option<Vec<f32>> =
                    l.vb.as_ref()
                        .map(|v| v.to_dtype(DType::F32)?.to_vec1())
                        .transpose()?;
                for i in 0..b {
                    stats.add(
                        ts[i],
                        tcount,
                        per[i] as f64,
                        Some(mse[i] as f64),
                        vb.as_ref().map(|v| v[i] as f64),
                    );
                }
                let w = Tensor::from_slice(&iw, b, &self.device)?;
                (
                    (l.loss * w)?.mean_all()?,
                    per.iter().map(|&x| x as f64).collect::<Vec<_>>(),
                )
            }
            Net::Classifier(m) => {
                let l = labels
                    .ok_or_else(|| anyhow!("the classifier task needs a labelled dataset"))?;
                let logits = m
                    .forward(&noised.x_t, &t_model, &ctx)?
                    .to_dtype(DType::F32)?;
                // log-softmax from composite ops (candle's fused softmax has no gradient)
                let max = logits.max_keepdim(D::Minus1)?.detach();
                let shifted = logits.broadcast_sub(&max)?;
                let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
                let logp = shifted.broadcast_sub(&lse)?;
                let y = Tensor::new(l.as_slice(), &self.device)?;
                let nll = logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
                let per: Vec<f32> = nll.to_vec1()?;
                let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
                for i in 0..b {
                    stats.add(ts[i], tcount, per[i] as f64, None, None);
                    if pred[i] == l[i] {
                        stats.correct += 1.0;
                    }
                }
                (nll.mean_all()?, per.iter().map(|&x| x as f64).collect())
            }
        };
        if !per_example.iter().all(|x| x.is_finite()) {
            stats.nonfinite = 1.0;
        }
        Ok(LocalStep {
            loss,
            ts,
            per_example,
            stats,
        })
    }
}

/// Examples `start .. start + len` of `batch`.
fn micro_batch(batch: &ddpm_data::Batch, start: usize, len: usize) -> ddpm_data::Batch {
    let per: usize = batch.shape[1..].iter().product();
    let mut shape = batch.shape;
    shape[0] = len;
    ddpm_data::Batch {
        images: batch.images[start * per..(start + len) * per].to_vec(),
        shape,
        labels: batch.labels.as_ref().map(|l| l[start..start + len].to_vec()),
        indices: batch.indices[start..start + len].to_vec(),
        epoch: batch.epoch,
        batch_index: batch.batch_index,
    }
}
