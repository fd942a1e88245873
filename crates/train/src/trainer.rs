//! The training loop (improved-diffusion `train_util.TrainLoop`), written for W ranks.
//!
//! One step on every rank: its shard of the global batch, per-example timesteps and label dropout
//! keyed by the global example index, fused noising, forward, loss, backward; then the gradient
//! mean over ranks, one f64 all-reduce of the step statistics (which carries the non-finite and
//! stop flags, so every rank makes the same decisions), global-norm clipping, AdamW and the EMA
//! updates. Only rank 0 writes files.
//!
//! Exact resume: every random draw is a function of `(seed, step, global example index)`, the data
//! loader restarts at its saved position, and every other piece of state (parameters, EMA, AdamW
//! moments and step count, the loss-aware sampler history, the metrics window) is in the checkpoint
//! bit for bit. So `N` steps + resume + `N` steps computes exactly what `2N` steps compute.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use ddpm_data::{Loader, LoaderConfig, LoaderPosition};
use ddpm_diffusion::GaussianDiffusion;
use ddpm_dist::{Communicator, GradientSync, DEFAULT_BUCKET_BYTES};
use ddpm_kernels::{fused_noising, NoiseKey, Prediction as KPrediction};
use ddpm_rng::{Stream, StreamKey};
use ddpm_unet::{DropoutKey, EncoderUNet, ForwardCtx, UNet};
use serde_json::{json, Map};

use crate::checkpoint::{self, Checkpoint, CheckpointWriter, Manifest, OptimizerState, RngState};
use crate::config::{Prediction, Task, TrainConfig, HASH_EXCLUDED_KEYS};
use crate::ema::Ema;
use crate::metrics::{MetricsLog, StepStats, Window, STEP_STATS_LEN};
use crate::optim::{clip_by_global_norm, global_norm, AdamW, AdamWParams};
use crate::plot;
use crate::preview::{sample_grid, PreviewSpec};
use crate::signals::StopFlag;
use crate::timesteps::{TimestepSampler, HISTORY_PER_TERM};

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest valid checkpoint in the run directory; start fresh when there is none.
    Auto,
    /// A checkpoint directory, or a run directory (its newest valid checkpoint).
    Path(PathBuf),
}

pub struct TrainOptions {
    pub resume: Option<ResumeFrom>,
    pub stop: StopFlag,
    /// Show an indicatif progress bar (rank 0, terminal only).
    pub progress_bar: bool,
    pub device: Device,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            resume: None,
            stop: StopFlag::new(),
            progress_bar: false,
            device: Device::Cpu,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Steps completed.
    pub step: u64,
    /// The run stopped early because of SIGTERM/SIGUSR1 (a checkpoint was written).
    pub stopped_by_signal: bool,
    pub checkpoint: Option<PathBuf>,
    pub skipped_steps: u64,
    pub run_dir: PathBuf,
    pub sample_grid: Option<PathBuf>,
    pub loss_plot: Option<PathBuf>,
    /// Mean training loss of every step run in this process, in order (for tests).
    pub step_losses: Vec<f64>,
}

/// The network being trained.
enum Net {
    Diffusion(UNet),
    Classifier(EncoderUNet),
}

impl Net {
    fn num_parameters(&self) -> usize {
        match self {
            Net::Diffusion(m) => m.num_parameters(),
            Net::Classifier(m) => m.num_parameters(),
        }
    }
}

/// Builds the model of `cfg` with freshly initialised (seeded) parameters.
fn build_net(cfg: &TrainConfig, device: &Device) -> Result<(Net, VarMap)> {
    Ok(match cfg.task {
        Task::Diffusion => {
            let (m, vm) = UNet::init(
                cfg.model.as_ref().expect("validated"),
                cfg.seed,
                DType::F32,
                device,
            )?;
            (Net::Diffusion(m), vm)
        }
        Task::Classifier => {
            let (m, vm) = EncoderUNet::init(
                cfg.classifier.as_ref().expect("validated"),
                cfg.seed,
                DType::F32,
                device,
            )?;
            (Net::Classifier(m), vm)
        }
    })
}

/// Builds a U-Net whose parameters are the given tensors (the EMA weights for previews).
pub fn unet_from_tensors(
    cfg: &ddpm_unet::UNetConfig,
    tensors: Vec<(String, Tensor)>,
    device: &Device,
) -> Result<UNet> {
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    Ok(UNet::new(
        cfg,
        VarBuilder::from_tensors(map, DType::F32, device),
    )?)
}

/// `parameters: N` and the per-level summary of the config's model (ddpm-unet's summary).
pub fn inspect_model(cfg: &TrainConfig) -> Result<String> {
    let (net, _) = build_net(cfg, &Device::Cpu)?;
    let summary = match &net {
        Net::Diffusion(m) => m.summary(),
        Net::Classifier(m) => m.summary(),
    };
    // ModelSummary's Display starts with the "parameters: N" line.
    Ok(summary.to_string())
}

/// Parameters sorted by name: the order of gradients, moments, EMA lists and bucket plans.
fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().expect("VarMap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Flattens a JSON value into `dotted.key -> value text` for config diffs.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Keys whose values differ between a checkpoint's config and the current one (excluded keys
/// left out), formatted for an error message.
fn config_diff(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let excluded = |k: &str| {
        HASH_EXCLUDED_KEYS
            .iter()
            .any(|e| k == *e || k.starts_with(&format!("{e}.")))
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| !excluded(k))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: checkpoint {} vs now {}",
                a.get(k).map(String::as_str).unwrap_or("(absent)"),
                b.get(k).map(String::as_str).unwrap_or("(absent)")
            )
        })
        .collect()
}

/// All the mutable state of a run.
struct State {
    step: u64,
    opt: AdamW,
    emas: Vec<Ema>,
    sampler: TimestepSampler,
    window: Window,
    skipped: u64,
    loader_pos: LoaderPosition,
}

struct Run<'a> {
    cfg: &'a TrainConfig,
    comm: &'a dyn Communicator,
    device: Device,
    net: Net,
    names: Vec<String>,
    vars: Vec<Var>,
    diffusion: GaussianDiffusion,
    sqrt_ac: Vec<f32>,
    sqrt_1m_ac: Vec<f32>,
    num_classes: Option<usize>,
    run_dir: PathBuf,
    hash: String,
}

/// Result of the local part of one step.
struct LocalStep {
    loss: Tensor,
    ts: Vec<usize>,
    per_example: Vec<f64>,
    stats: StepStats,
}

impl Run<'_> {
    /// Forward and loss of this rank's part of the batch for 0-based step `step`.
    fn forward(
        &self,
        step: u64,
        batch: &ddpm_data::Batch,
        sampler: &TimestepSampler,
    ) -> Result<LocalStep> {
        let b = batch.shape[0];
        let first = (self.comm.rank() * b) as u64;
        let seed = self.cfg.seed;
        let x0 = Tensor::from_slice(&batch.images, batch.shape.to_vec(), &self.device)?;
        let (ts, iw) = match self.cfg.task {
            Task::Diffusion => sampler.sample(seed, step, first, b),
            // The classifier sees uniformly drawn noise levels, as guided-diffusion's classifier_train.
            Task::Classifier => TimestepSampler::new(self.diffusion.num_timesteps(), false)
                .sample(seed, step, first, b),
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

    fn adamw_params(&self) -> AdamWParams {
        let o = &self.cfg.optim;
        AdamWParams {
            lr: o.lr,
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
            weight_decay: o.weight_decay,
            warmup_steps: o.warmup_steps,
        }
    }

    fn fresh_state(&self) -> Result<State> {
        Ok(State {
            step: 0,
            opt: AdamW::new(&self.vars, self.adamw_params())?,
            emas: self
                .cfg
                .ema
                .rates
                .iter()
                .map(|&r| Ema::new(r, &self.vars))
                .collect::<candle_core::Result<_>>()?,
            sampler: TimestepSampler::new(
                self.diffusion.num_timesteps(),
                self.cfg.diffusion.timestep_sampling == crate::config::TimestepSampling::LossAware,
            ),
            window: Window::default(),
            skipped: 0,
            loader_pos: LoaderPosition::default(),
        })
    }

    fn expected_shapes(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| (format!("{prefix}{n}"), v.dims().to_vec()))
            .collect()
    }

    /// Loads `ck` into the parameters and a new state, after checking it belongs to this config.
    fn restore(&self, ck: &Checkpoint) -> Result<State> {
        let m = &ck.manifest;
        let path = ck.dir.display();
        if m.config_hash != self.hash {
            let now = serde_json::to_value(self.cfg)?;
            let diff = config_diff(&m.config, &now);
            bail!(
                "refusing to resume from {path}: its config hash {} differs from this run's {} \
                 (keys excluded from the hash: {}).\nDiffering keys:\n  {}\nStart a new run directory \
                 (--out) or restore the original settings.",
                &m.config_hash[..12.min(m.config_hash.len())],
                &self.hash[..12],
                HASH_EXCLUDED_KEYS.join(", "),
                if diff.is_empty() { "(none found; the hash scheme differs)".to_string() } else { diff.join("\n  ") }
            );
        }
        let global = self.comm.world_size() * self.cfg.data.batch;
        if m.global_batch != global {
            bail!(
                "refusing to resume from {path}: it was written with a global batch of {} ({} ranks x {}), \
                 this run has {global} ({} ranks x {}); the data order and step randomness depend on it",
                m.global_batch,
                m.world_size,
                m.batch_per_rank,
                self.comm.world_size(),
                self.cfg.data.batch
            );
        }
        let model = ck.load_tensors(
            checkpoint::MODEL_FILE,
            &self.expected_shapes(""),
            &self.device,
        )?;
        for (n, v) in self.names.iter().zip(&self.vars) {
            v.set(&model[n].to_dtype(v.dtype())?)?;
        }
        let mut st = self.fresh_state()?;
        for e in &mut st.emas {
            let file = checkpoint::ema_file(e.rate);
            if m.file(&file).is_none() {
                bail!(
                    "refusing to resume from {path}: it has no {file} (ema.rates {:?} vs {:?})",
                    m.ema_rates,
                    self.cfg.ema.rates
                );
            }
            let t = ck.load_tensors(&file, &self.expected_shapes(""), &self.device)?;
            e.params = self.names.iter().map(|n| t[n].clone()).collect();
        }
        let mut expected = self.expected_shapes("exp_avg.");
        expected.extend(self.expected_shapes("exp_avg_sq."));
        let o = ck.load_tensors(checkpoint::OPTIMIZER_FILE, &expected, &self.device)?;
        st.opt.m = self
            .names
            .iter()
            .map(|n| o[&format!("exp_avg.{n}")].clone())
            .collect();
        st.opt.v = self
            .names
            .iter()
            .map(|n| o[&format!("exp_avg_sq.{n}")].clone())
            .collect();
        st.opt.t = m.optimizer.t;
        st.step = m.step;
        st.skipped = m.skipped_steps;
        st.loader_pos = serde_json::from_value(m.loader_position.clone())
            .with_context(|| format!("{path}: bad loader_position"))?;
        if let Some(w) = ck.state_f64("metrics_window")? {
            st.window =
                Window::from_slice(&w).ok_or_else(|| anyhow!("{path}: bad metrics_window"))?;
        }
        if let TimestepSampler::LossAware(s) = &mut st.sampler {
            let h = ck.state_f64("loss_history")?;
            let c = ck.state_f64("loss_counts")?;
            match (h, c) {
                (Some(h), Some(c)) if h.len() == s.history.len() && c.len() == s.counts.len() => {
                    s.history = h;
                    s.counts = c.iter().map(|&x| x as u64).collect();
                }
                _ => bail!("{path}: loss-aware sampler state missing or of the wrong size"),
            }
        }
        Ok(st)
    }

    /// Writes a checkpoint of `st` (rank 0), keeps the newest K. Returns its directory.
    fn save(&self, st: &State, lr: f64) -> Result<PathBuf> {
        let _span = tracing::info_span!("checkpoint", step = st.step).entered();
        let t0 = Instant::now();
        let mut w = CheckpointWriter::begin(&self.run_dir, st.step)?;
        let result = (|| -> Result<()> {
            let named = |ts: &[Tensor], prefix: &str| -> Vec<(String, Tensor)> {
                self.names
                    .iter()
                    .zip(ts)
                    .map(|(n, t)| (format!("{prefix}{n}"), t.clone()))
                    .collect()
            };
            let params: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
            w.add_tensors(checkpoint::MODEL_FILE, &named(&params, ""))?;
            for e in &st.emas {
                w.add_tensors(&checkpoint::ema_file(e.rate), &named(&e.params, ""))?;
            }
            let mut moments = named(&st.opt.m, "exp_avg.");
            moments.extend(named(&st.opt.v, "exp_avg_sq."));
            w.add_tensors(checkpoint::OPTIMIZER_FILE, &moments)?;
            let mut state = vec![(
                "metrics_window".to_string(),
                Tensor::new(st.window.to_vec().as_slice(), &Device::Cpu)?,
            )];
            if let TimestepSampler::LossAware(s) = &st.sampler {
                let t = s.num_timesteps();
                state.push((
                    "loss_history".into(),
                    Tensor::from_slice(&s.history, (t, HISTORY_PER_TERM), &Device::Cpu)?,
                ));
                let c: Vec<f64> = s.counts.iter().map(|&c| c as f64).collect();
                state.push((
                    "loss_counts".into(),
                    Tensor::from_slice(&c, t, &Device::Cpu)?,
                ));
            }
            w.add_tensors(checkpoint::STATE_FILE, &state)?;
            Ok(())
        })();
        if let Err(e) = result {
            w.abort();
            return Err(e);
        }
        let manifest = Manifest {
            format: checkpoint::FORMAT.into(),
            format_version: checkpoint::FORMAT_VERSION,
            step: st.step,
            task: self.cfg.task.to_string(),
            config: serde_json::to_value(self.cfg)?,
            config_hash: self.hash.clone(),
            hash_excluded_keys: HASH_EXCLUDED_KEYS.iter().map(|s| s.to_string()).collect(),
            world_size: self.comm.world_size(),
            batch_per_rank: self.cfg.data.batch,
            global_batch: self.comm.world_size() * self.cfg.data.batch,
            loader_position: serde_json::to_value(st.loader_pos)?,
            optimizer: OptimizerState {
                kind: "adamw".into(),
                t: st.opt.t,
                lr,
            },
            ema_rates: self.cfg.ema.rates.clone(),
            ema_updates: st.opt.t,
            skipped_steps: st.skipped,
            rng: RngState {
                seed: self.cfg.seed,
                next_step: st.step,
                generator:
                    "ddpm-rng Philox4x32-10 keyed by (seed, stream, step, global example index)"
                        .into(),
            },
            timestep_sampler: match st.sampler {
                TimestepSampler::Uniform { .. } => "uniform".into(),
                TimestepSampler::LossAware(_) => "loss_aware".into(),
            },
            num_parameters: self.net.num_parameters(),
            files: vec![],
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            writer: format!("ddpm-train {}", env!("CARGO_PKG_VERSION")),
        };
        let dir = w.finish(manifest)?;
        let removed = checkpoint::prune(&self.run_dir, self.cfg.schedule.keep_checkpoints)?;
        tracing::info!(
            dir = %dir.display(),
            secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
            pruned = removed.len(),
            "checkpoint written"
        );
        Ok(dir)
    }

    /// EMA preview grid and loss plot (rank 0). Returns (grid, plot) paths.
    fn write_pictures(
        &self,
        st: &State,
        metrics: &MetricsLog,
    ) -> Result<(Option<PathBuf>, PathBuf)> {
        let plot_path = self.run_dir.join("loss.png");
        plot::plot_loss_curve(&plot_path, &metrics.loss_points()?)?;
        let Net::Diffusion(_) = &self.net else {
            return Ok((None, plot_path));
        };
        let _span = tracing::info_span!("preview", step = st.step).entered();
        let t0 = Instant::now();
        let p = &self.cfg.preview;
        let rate = p.ema_rate.unwrap_or(self.cfg.ema.rates[0]);
        let ema = st
            .emas
            .iter()
            .find(|e| e.rate == rate)
            .expect("validated rate");
        let mcfg = self.cfg.model.as_ref().expect("diffusion task");
        let tensors = self
            .names
            .iter()
            .cloned()
            .zip(ema.params.iter().cloned())
            .collect();
        let model = unet_from_tensors(mcfg, tensors, &self.device)?;
        let spec = PreviewSpec {
            steps: p.steps,
            eta: p.eta,
            guidance: p.guidance,
            per_class: p.per_class,
            seed: self.cfg.seed,
        };
        let (images, _) = sample_grid(&model, &self.diffusion, &spec, &self.device)?;
        let dims = images.dims4()?;
        let data: Vec<f32> = images.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let cols = if mcfg.num_classes.is_some() {
            p.per_class
        } else {
            (dims.0 as f64).sqrt().ceil() as usize
        };
        let scale = (96 / mcfg.image_size).clamp(1, 4);
        let grid = plot::image_grid(&data, [dims.0, dims.1, dims.2, dims.3], cols, scale);
        let dir = self.run_dir.join("samples");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let step_path = dir.join(format!("step_{:09}.png", st.step));
        grid.write_png(&step_path)?;
        let latest = self.run_dir.join("samples.png");
        grid.write_png(&latest)?;
        tracing::info!(
            path = %latest.display(),
            secs = format!("{:.1}", t0.elapsed().as_secs_f64()),
            "preview samples (EMA {rate}, DDIM {} steps, rows = classes)",
            p.steps
        );
        Ok((Some(latest), plot_path))
    }
}

/// Previews are a by-product: a failure is logged, not allowed to end a long run.
fn pictures(run: &Run, st: &State, metrics: &MetricsLog, outcome: &mut TrainOutcome) {
    match run.write_pictures(st, metrics) {
        Ok((grid, plot)) => {
            outcome.sample_grid = grid;
            outcome.loss_plot = Some(plot);
        }
        Err(e) => tracing::warn!(step = st.step, "preview/loss plot failed: {e:#}"),
    }
}

/// Checks the dataset against the model before training starts; errors name the config keys.
fn check_dataset(cfg: &TrainConfig, ds: &ddpm_data::Hdf5Dataset) -> Result<Option<usize>> {
    let (size, ch, classes, table) = match cfg.task {
        Task::Diffusion => {
            let m = cfg.model.as_ref().expect("validated");
            (m.image_size, m.in_channels, m.num_classes, "model")
        }
        Task::Classifier => {
            let c = cfg.classifier.as_ref().expect("validated");
            (
                c.image_size,
                c.in_channels,
                Some(c.num_classes),
                "classifier",
            )
        }
    };
    let p = cfg.data.path.display();
    if ds.height() != size || ds.width() != size {
        bail!(
            "data.path {p} holds {}x{} images but {table}.image_size = {size}",
            ds.height(),
            ds.width()
        );
    }
    if ds.channels() != ch {
        bail!(
            "data.path {p} holds {}-channel images but {table}.in_channels = {ch}",
            ds.channels()
        );
    }
    if ds.len() < cfg.data.batch {
        bail!(
            "data.path {p} has {} images, fewer than data.batch = {}",
            ds.len(),
            cfg.data.batch
        );
    }
    if let Some(k) = classes {
        match ds.num_classes() {
            None => bail!("{table}.num_classes = {k} but data.path {p} has no labels"),
            Some(n) if n != k => {
                bail!("{table}.num_classes = {k} but data.path {p} has {n} classes")
            }
            _ => {}
        }
    }
    Ok(classes)
}

/// Runs (or continues) the training job described by `cfg` on this rank.
pub fn train(
    cfg: &TrainConfig,
    comm: &dyn Communicator,
    opts: TrainOptions,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    let run_dir = cfg.out_dir().to_path_buf();
    let hash = cfg.hash();
    let hash_bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect();
    ddpm_dist::check_same_config(comm, &hash_bytes)?;
    let root = comm.rank() == 0;
    let device = opts.device.clone();

    let diffusion = cfg.diffusion.to_diffusion().build()?;
    let sqrt_ac: Vec<f32> = diffusion
        .schedule
        .sqrt_alphas_cumprod
        .iter()
        .map(|&x| x as f32)
        .collect();
    let sqrt_1m_ac: Vec<f32> = diffusion
        .schedule
        .sqrt_one_minus_alphas_cumprod
        .iter()
        .map(|&x| x as f32)
        .collect();

    let (net, varmap) = build_net(cfg, &device)?;
    let named = sorted_vars(&varmap);
    let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let vars: Vec<Var> = named.into_iter().map(|(_, v)| v).collect();
    // Seeded initialisation already gives every rank the same values; the broadcast makes it a
    // guarantee (and checks every rank built the same shapes).
    let init: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let synced = ddpm_dist::broadcast_tensors(comm, &init, 0)?;
    if comm.rank() != 0 {
        for (v, t) in vars.iter().zip(&synced) {
            v.set(t)?;
        }
    }

    // Open the data before anything is written, so a bad path fails fast.
    let lcfg = |pos| -> Result<Loader> {
        Loader::new(
            LoaderConfig {
                path: cfg.data.path.clone(),
                world: comm.world_size(),
                rank: comm.rank(),
                batch: cfg.data.batch,
                seed: cfg.seed,
                flip: cfg.data.flip,
                prefetch: cfg.data.prefetch,
            },
            pos,
        )
        .with_context(|| format!("data.path {}", cfg.data.path.display()))
    };
    let ds = ddpm_data::Hdf5Dataset::open(&cfg.data.path)
        .with_context(|| format!("data.path {}", cfg.data.path.display()))?;
    let num_classes = check_dataset(cfg, &ds)?;
    drop(ds);

    let run = Run {
        cfg,
        comm,
        device: device.clone(),
        net,
        names,
        vars,
        diffusion,
        sqrt_ac,
        sqrt_1m_ac,
        num_classes,
        run_dir: run_dir.clone(),
        hash,
    };

    // Rank 0 picks the checkpoint and tells the others, so every rank resumes from the same one.
    let mut chosen: Vec<u8> = Vec::new();
    if root {
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating out_dir {}", run_dir.display()))?;
        checkpoint::clean_staging(&run_dir);
        let warn =
            |e: &checkpoint::CheckpointError| tracing::warn!("skipping damaged checkpoint: {e}");
        let found = match &opts.resume {
            None => None,
            Some(ResumeFrom::Auto) => checkpoint::find_latest(&run_dir, warn),
            Some(ResumeFrom::Path(p)) => Some(checkpoint::resolve(p, warn)?),
        };
        if found.is_none()
            && opts.resume.is_none()
            && !checkpoint::list_checkpoints(&run_dir).is_empty()
        {
            bail!(
                "{} already has checkpoints; pass --resume auto to continue that run, or choose another --out",
                run_dir.display()
            );
        }
        if let Some(c) = found {
            chosen = c.dir.to_string_lossy().into_owned().into_bytes();
        }
    }
    comm.broadcast_bytes(&mut chosen, 0)?;
    let resumed_from =
        (!chosen.is_empty()).then(|| PathBuf::from(String::from_utf8_lossy(&chosen).into_owned()));
    let mut st = match &resumed_from {
        Some(dir) => {
            let ck = Checkpoint::open(dir)?;
            let st = run.restore(&ck)?;
            if root {
                tracing::info!(step = st.step, dir = %dir.display(), "resuming");
            }
            st
        }
        None => {
            if matches!(opts.resume, Some(ResumeFrom::Auto)) && root {
                tracing::info!(
                    "--resume auto: no checkpoint in {}, starting from scratch",
                    run_dir.display()
                );
            }
            run.fresh_state()?
        }
    };

    let total = cfg.schedule.total_steps;
    let mut metrics = None;
    if root {
        crate::atomic::write_atomic(&run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
        metrics = Some(MetricsLog::open(
            &run_dir,
            resumed_from.as_ref().map(|_| st.step),
        )?);
        tracing::info!(
            task = %cfg.task,
            params = run.net.num_parameters(),
            world = comm.world_size(),
            global_batch = comm.world_size() * cfg.data.batch,
            from = st.step,
            to = total,
            "training"
        );
    }

    let mut loader = lcfg(st.loader_pos)?;
    let mut sync = GradientSync::from_tensors(
        &run.vars
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect::<Vec<_>>(),
        DEFAULT_BUCKET_BYTES,
    )?;
    if comm.world_size() > 1 {
        sync.verify_across_ranks(comm)?;
    }

    let bar = (root && opts.progress_bar && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        pb.set_position(st.step);
        pb
    });

    let mut outcome = TrainOutcome {
        step: st.step,
        stopped_by_signal: false,
        checkpoint: None,
        skipped_steps: st.skipped,
        run_dir: run_dir.clone(),
        sample_grid: None,
        loss_plot: None,
        step_losses: Vec::new(),
    };
    let global_batch = (comm.world_size() * cfg.data.batch) as f64;
    let mut window_start = Instant::now();
    let mut window_steps = 0u64;
    let mut lr = run.adamw_params().lr_at(st.step);
    let mut last_ckpt_step = None;
    let mut stop = false;

    while st.step < total && !stop {
        let step = st.step;
        let _span = tracing::debug_span!("step", step).entered();
        let batch = loader
            .next_batch()
            .with_context(|| format!("data.path {}", cfg.data.path.display()))?;
        let local = run.forward(step, &batch, &st.sampler)?;
        let gs = local.loss.backward()?;
        let grads: Vec<Tensor> = run
            .vars
            .iter()
            .map(|v| match gs.get(v.as_tensor()) {
                // detached: a gradient carries the backward graph (and through it the activations);
                // anything kept across steps (moments) must not keep that alive
                Some(g) => Ok(g.detach()),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        drop(gs);
        let grads = sync.all_reduce_mean(comm, &grads)?;
        let norm = global_norm(&grads)?;

        let mut red = local.stats.to_vec();
        red.push(if opts.stop.is_set() { 1.0 } else { 0.0 });
        comm.all_reduce_sum_f64(&mut red)?;
        let global = StepStats::from_slice(&red[..STEP_STATS_LEN]);
        stop = red[STEP_STATS_LEN] > 0.0;

        let skip = global.nonfinite > 0.0 || !norm.is_finite();
        lr = run.adamw_params().lr_at(step);
        if skip {
            st.skipped += 1;
            tracing::warn!(
                step,
                grad_norm = norm,
                "non-finite loss or gradient: step skipped"
            );
        } else {
            let grads = clip_by_global_norm(grads, norm, cfg.optim.grad_clip)?;
            st.opt.step(&run.vars, &grads, lr)?;
            let n = st.opt.t - 1;
            for e in &mut st.emas {
                let d = e.decay(n, cfg.ema.warmup);
                e.update(&run.vars, d)?;
            }
            if let TimestepSampler::LossAware(_) = st.sampler {
                // Every rank feeds the same global (t, loss) list in rank order.
                let mut mine = Vec::with_capacity(local.ts.len() * 16);
                for (t, l) in local.ts.iter().zip(&local.per_example) {
                    mine.extend((*t as u64).to_le_bytes());
                    mine.extend(l.to_le_bytes());
                }
                let all = comm.all_gather_bytes(&mine)?;
                let (mut ts, mut ls) = (Vec::new(), Vec::new());
                for r in all {
                    for c in r.chunks_exact(16) {
                        ts.push(u64::from_le_bytes(c[..8].try_into().expect("8 bytes")) as usize);
                        ls.push(f64::from_le_bytes(c[8..].try_into().expect("8 bytes")));
                    }
                }
                st.sampler.update(&ts, &ls);
            }
        }
        st.window.add(&global, (!skip).then_some(norm));
        st.step += 1;
        st.loader_pos = loader.position();
        window_steps += 1;
        let step_loss = global.loss / global.examples.max(1.0);
        outcome.step_losses.push(step_loss);

        // ---- logging (rank 0) ----
        let at_boundary = st.step % cfg.schedule.log_every == 0;
        let last = st.step == total || stop;
        if root && (at_boundary || last) {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let mut extra = Map::new();
            if st.window.mean(2) != 0.0 || matches!(run.net, Net::Diffusion(_)) {
                extra.insert("mse".into(), crate::metrics::num(st.window.mean(2)));
            }
            let has_vb = cfg.task == Task::Diffusion
                && (cfg.diffusion.variance == crate::config::Variance::LearnedRange
                    || cfg.diffusion.loss == crate::config::Loss::Vlb);
            if has_vb {
                extra.insert("vb".into(), crate::metrics::num(st.window.mean(3)));
            }
            if cfg.task == Task::Classifier {
                extra.insert("accuracy".into(), crate::metrics::num(st.window.mean(4)));
            }
            extra.insert("epoch".into(), json!(batch.epoch));
            let line = st.window.line(
                st.step,
                lr,
                window_steps as f64 * global_batch / secs,
                st.skipped,
                &extra,
            );
            if let Some(m) = metrics.as_mut() {
                m.write(&line)?;
            }
            match &bar {
                Some(pb) => {
                    pb.set_position(st.step);
                    pb.set_message(format!(
                        "loss {:.4}",
                        line["loss"].as_f64().unwrap_or(f64::NAN)
                    ));
                }
                None => tracing::info!("{line}"),
            }
        } else if let Some(pb) = &bar {
            pb.set_position(st.step);
        }
        if at_boundary {
            // A partial window (end of run, stop) is logged but kept, so the resumed run's next
            // line covers exactly the steps the uninterrupted run's would.
            st.window = Window::default();
            window_start = Instant::now();
            window_steps = 0;
        }

        // ---- checkpoint ----
        if st.step % cfg.schedule.checkpoint_every == 0 || last {
            if root {
                outcome.checkpoint = Some(run.save(&st, lr)?);
            }
            last_ckpt_step = Some(st.step);
        }

        // ---- previews ----
        let sample_now = !stop
            && (st.step == total
                || (cfg.schedule.sample_every > 0 && st.step % cfg.schedule.sample_every == 0));
        if root && sample_now {
            pictures(&run, &st, metrics.as_ref().expect("rank 0"), &mut outcome);
        }
    }

    // A run that starts at (or past) its total still ends with a checkpoint at its last step.
    if last_ckpt_step != Some(st.step) && root {
        let on_disk = checkpoint::list_checkpoints(&run_dir).first().map(|c| c.0);
        if on_disk != Some(st.step) {
            outcome.checkpoint = Some(run.save(&st, lr)?);
        } else {
            outcome.checkpoint = checkpoint::list_checkpoints(&run_dir)
                .first()
                .map(|c| c.1.clone());
        }
        if outcome.loss_plot.is_none() {
            pictures(&run, &st, metrics.as_ref().expect("rank 0"), &mut outcome);
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    comm.barrier()?;
    outcome.step = st.step;
    outcome.stopped_by_signal = stop;
    outcome.skipped_steps = st.skipped;
    if root {
        if stop {
            tracing::info!(
                step = st.step,
                "stopped by signal after writing a checkpoint; continue with --resume auto"
            );
        } else {
            tracing::info!(step = st.step, skipped = st.skipped, "training finished");
        }
    }
    Ok(outcome)
}

/// Convenience for tests and tools: the run directory's metrics lines.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(crate::metrics::read_lines(&run_dir.join("metrics.jsonl"))?)
}
