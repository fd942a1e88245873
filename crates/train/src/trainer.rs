//! The training loop (improved-diffusion `train_util.TrainLoop`), written for W ranks.
//!
//! One step on every rank ([`TrainLoop::run_step`]): its shard of the global batch, per-example
//! timesteps and label dropout keyed by the global example index, fused noising, forward, loss,
//! backward ([`TrainLoop::forward_backward`]); then the gradient mean over ranks, one f64
//! all-reduce of the step statistics (which carries the non-finite and stop flags, so every rank
//! makes the same decisions), global-norm clipping, AdamW and the EMA updates
//! ([`TrainLoop::optimize`]); then the metrics line, checkpoint and preview when due. Only rank 0
//! writes files.
//!
//! Exact resume: every random draw is a function of `(seed, step, global example index)`, the data
//! loader restarts at its saved position, and every other piece of state (parameters, EMA, AdamW
//! moments and step count, the loss-aware sampler history, the metrics window) is in the checkpoint
//! bit for bit. So `N` steps + resume + `N` steps computes exactly what `2N` steps compute.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use ddpm_data::{Batch, Loader, LoaderConfig};
use ddpm_diffusion::GaussianDiffusion;
use ddpm_dist::{Communicator, GradientSync};
use ddpm_kernels::{fused_noising, NoiseKey, Prediction as KPrediction};
use ddpm_rng::{Stream, StreamKey};
use ddpm_unet::{DropoutKey, ForwardCtx};
use serde_json::{json, Map};

use crate::continuous::{Continuous, ScheduleGraph};
use crate::metrics::{num, MetricsLog, StepStats, Window, STEP_STATS_LEN};
use crate::optim::{clip_by_global_norm, global_norm};
use crate::persist;
use crate::run::{build_net, sorted_vars, Net, State};
use crate::signals::StopFlag;
use crate::timesteps::{TimestepSampler, HISTORY_PER_TERM};
use ddpm_checkpoint::{
    self as checkpoint, Checkpoint, CheckpointWriter, Manifest, OptimizerState, RngState,
};
use ddpm_config::HASH_EXCLUDED_KEYS;
use ddpm_config::{Loss, Prediction, Task, TrainConfig, Variance};

pub use crate::run::{inspect_model, unet_from_tensors};

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

/// Runs (or continues) the training job described by `cfg` on this rank.
pub fn train(
    cfg: &TrainConfig,
    comm: &dyn Communicator,
    opts: TrainOptions,
) -> Result<TrainOutcome> {
    TrainLoop::new(cfg, comm, opts)?.run()
}

/// Wall-clock counters of the current logging window (not checkpointed: they only feed the
/// `images_per_sec`, `sync_ms` and `step_ms` fields).
struct LoopMetrics {
    window_start: Instant,
    window_steps: u64,
    /// Seconds this rank spent in the gradient all-reduce, and in whole steps, in the window: the
    /// synchronisation overhead of data parallelism.
    window_sync: f64,
    window_step: f64,
    /// Learning rate of the last step (saved in the manifest).
    lr: f64,
    last_ckpt_step: Option<u64>,
    /// Some rank saw a stop request: every rank checkpoints and leaves after this step.
    stop: bool,
    /// Consecutive non-finite steps, the same on every rank (decided from all-reduced values).
    /// While it is > 0, checkpoints are written without pruning, so the ones from before a
    /// blow-up survive it; `last_finite` is the newest of those.
    nonfinite: u64,
    last_finite: Option<PathBuf>,
}

impl LoopMetrics {
    fn new(lr: f64) -> Self {
        Self {
            window_start: Instant::now(),
            window_steps: 0,
            window_sync: 0.0,
            window_step: 0.0,
            lr,
            last_ckpt_step: None,
            stop: false,
            nonfinite: 0,
            last_finite: None,
        }
    }

    fn reset_window(&mut self) {
        self.window_start = Instant::now();
        self.window_steps = 0;
        (self.window_sync, self.window_step) = (0.0, 0.0);
    }
}

/// The local part of one step on this rank.
struct LocalStep {
    loss: Tensor,
    ts: Vec<usize>,
    per_example: Vec<f64>,
    stats: StepStats,
    /// Continuous time with a learned schedule: what its gradients are computed from.
    schedule: Option<ScheduleGraph>,
}

/// One training job on one rank: the network, its parameters in a fixed (sorted) order, the
/// diffusion process, the mutable state a checkpoint captures, and the loop's own counters.
pub struct TrainLoop<'a> {
    cfg: &'a TrainConfig,
    comm: &'a dyn Communicator,
    stop_flag: StopFlag,
    device: Device,
    net: Net,
    names: Vec<String>,
    vars: Vec<Var>,
    diffusion: GaussianDiffusion,
    /// The frozen teacher of a distillation round (task = "distill").
    distill: Option<crate::distill::Distiller>,
    /// `time = "continuous"`: the VDM process (its learned schedule's variables are in `vars`).
    cont: Option<Continuous>,
    sqrt_ac: Vec<f32>,
    sqrt_1m_ac: Vec<f32>,
    num_classes: Option<usize>,
    run_dir: PathBuf,
    hash: String,
    /// Content fingerprint of `data.path`, the same on every rank (checked at start).
    dataset: ddpm_data::DatasetFingerprint,
    st: State,
    loader: Loader,
    sync: GradientSync,
    /// `train.thread_shards`: one single-thread pool per shard of each micro-batch (empty: off).
    shard_pools: Vec<rayon::ThreadPool>,
    log: Option<MetricsLog>,
    bar: Option<indicatif::ProgressBar>,
    metrics: LoopMetrics,
    outcome: TrainOutcome,
}

impl<'a> TrainLoop<'a> {
    /// Everything before the first step: validation, the model (identical on every rank), the
    /// dataset check, the checkpoint to resume from (chosen by rank 0), the loader and the logs.
    pub fn new(
        cfg: &'a TrainConfig,
        comm: &'a dyn Communicator,
        opts: TrainOptions,
    ) -> Result<Self> {
        cfg.validate()?;
        let run_dir = cfg.out_dir().to_path_buf();
        let hash = cfg.hash();
        let hash_bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        ddpm_dist::check_same_config(comm, &hash_bytes)?;
        let root = comm.rank() == 0;
        let device = opts.device.clone();
        let diffusion = cfg.diffusion.build()?;
        let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let sqrt_ac = as_f32(&diffusion.schedule.sqrt_alphas_cumprod);
        let sqrt_1m_ac = as_f32(&diffusion.schedule.sqrt_one_minus_alphas_cumprod);

        let (net, varmap) = build_net(cfg, &device)?;
        let cont = cfg
            .diffusion
            .continuous()
            .map(|s| Continuous::new(s, cfg.seed, &device))
            .transpose()?;
        if let Some(c) = &cont {
            let mut data = varmap.data().lock().expect("VarMap lock");
            data.extend(c.vars());
        }
        let (names, vars): (Vec<String>, Vec<Var>) = sorted_vars(&varmap).into_iter().unzip();
        let distill = crate::distill::Distiller::for_run(cfg, &device)?;
        if let Some(d) = &distill {
            d.init_student(&names, &vars)?;
        }
        // Seeded initialisation already gives every rank the same values; the broadcast makes it a
        // guarantee (and checks every rank built the same shapes).
        let init: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let synced = ddpm_dist::broadcast_tensors(comm, &init, 0)?;
        if !root {
            for (v, t) in vars.iter().zip(&synced) {
                v.set(t)?;
            }
        }

        // Open the data before anything is written, so a bad path fails fast.
        let ds = ddpm_data::Hdf5Dataset::open(&cfg.data.path)
            .with_context(|| format!("data.path {}", cfg.data.path.display()))?;
        let num_classes = check_dataset(cfg, &ds)?;
        // What this rank will read, by content: node-local copies or a re-converted file that
        // differ would otherwise train on different data silently.
        let dataset = ds
            .fingerprint()
            .with_context(|| format!("data.path {}", cfg.data.path.display()))?;
        drop(ds);
        ddpm_dist::check_same_fingerprint(
            comm,
            "content of data.path (dataset fingerprint)",
            &dataset.to_bytes(),
        )?;

        let resumed_from = choose_checkpoint(comm, &run_dir, opts.resume.as_ref())?;
        let st = match &resumed_from {
            Some(dir) => {
                let ck = Checkpoint::open_verified(dir)?;
                persist::check_resumable(&ck, cfg, comm, &hash)?;
                persist::check_same_dataset(&ck, cfg, &dataset)?;
                let mut st = persist::fresh_state(cfg, &vars, diffusion.num_timesteps())?;
                persist::restore(&ck, &names, &vars, &device, &mut st)?;
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
                persist::fresh_state(cfg, &vars, diffusion.num_timesteps())?
            }
        };
        let (log, bar) = match root {
            true => {
                let (log, bar) = open_outputs(cfg, &st, resumed_from.is_some(), opts.progress_bar)?;
                tracing::info!(
                    task = %cfg.task,
                    params = net.num_parameters(),
                    world = comm.world_size(),
                    global_batch = comm.world_size() * cfg.train.accumulate * cfg.data.batch,
                    from = st.step,
                    to = cfg.schedule.total_steps,
                    "training"
                );
                (Some(log), bar)
            }
            false => (None, None),
        };
        let loader = open_loader(cfg, comm, st.loader_pos)?;
        let current: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let sync = GradientSync::from_tensors(&current, cfg.dist.bucket_bytes())?;
        if comm.world_size() > 1 {
            sync.verify_across_ranks(comm)?;
        }
        let outcome = TrainOutcome {
            step: st.step,
            stopped_by_signal: false,
            checkpoint: None,
            skipped_steps: st.skipped,
            run_dir: run_dir.clone(),
            sample_grid: None,
            loss_plot: None,
            step_losses: Vec::new(),
        };
        let metrics = LoopMetrics::new(persist::adamw_params(cfg).lr_at(st.step));
        let shard_pools = shard_pools(cfg, &device, net.num_parameters(), root)?;
        Ok(Self {
            cfg,
            comm,
            stop_flag: opts.stop,
            device,
            net,
            names,
            vars,
            diffusion,
            distill,
            cont,
            sqrt_ac,
            sqrt_1m_ac,
            num_classes,
            run_dir,
            hash,
            dataset,
            st,
            loader,
            sync,
            shard_pools,
            log,
            bar,
            metrics,
            outcome,
        })
    }

    fn root(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Steps until `schedule.total_steps` or a stop request, then the final checkpoint and pictures.
    pub fn run(mut self) -> Result<TrainOutcome> {
        while self.st.step < self.cfg.schedule.total_steps && !self.metrics.stop {
            self.run_step()?;
        }
        self.finish()
    }

    /// One step: data, forward/backward, gradient all-reduce, update, then log, save and preview
    /// when due.
    pub fn run_step(&mut self) -> Result<()> {
        let step = self.st.step;
        let _span = tracing::debug_span!("step", step).entered();
        let step_start = Instant::now();
        let batch = self
            .loader
            .next_batch()
            .with_context(|| format!("data.path {}", self.cfg.data.path.display()))?;
        let (local, grads) = self.forward_backward(step, &batch)?;
        let sync_start = Instant::now();
        let grads = self.sync.all_reduce_mean(self.comm, &grads)?;
        self.metrics.window_sync += sync_start.elapsed().as_secs_f64();
        let global = self.optimize(step, &local, grads)?;
        self.st.step += 1;
        self.st.loader_pos = self.loader.position();
        self.metrics.window_steps += 1;
        self.metrics.window_step += step_start.elapsed().as_secs_f64();
        self.outcome
            .step_losses
            .push(global.loss / global.examples.max(1.0));
        self.log_step(batch.epoch)?;
        self.save_if_due()?;
        let (total, every) = (
            self.cfg.schedule.total_steps,
            self.cfg.schedule.sample_every,
        );
        let sample_now = !self.metrics.stop
            && (self.st.step == total || (every > 0 && self.st.step.is_multiple_of(every)));
        if self.root() && sample_now {
            self.pictures();
        }
        Ok(())
    }

    /// Forward, loss and backward of this rank's part of the batch; gradients in parameter order.
    ///
    /// # Gradient accumulation
    /// With `train.accumulate = k` the loader hands each rank `k x data.batch` examples per step (it is
    /// configured with that per-rank batch, so the data order and the epoch boundaries are those of a
    /// run with batch `k x data.batch`). They are processed as `k` micro-batches of `B = data.batch`,
    /// each with its own forward and backward, and the mean of the `k` gradient sets is the rank's
    /// gradient (then averaged over ranks once per step, as without accumulation). Example `i` of
    /// micro-batch `j` on rank `r` has position `p = r*k*B + j*B + i` in the step's global batch, and its
    /// timestep, noise, label dropout and model dropout are keyed by `(seed, step, p)`, exactly as for a
    /// rank with batch `k*B`. So `k` micro-batches of `B` compute what one batch of `k*B` does, up to
    /// the summation order of the gradient mean, on any number of ranks: the global batch is
    /// `ranks x k x B`. With `k = 1` this is one forward and backward of the whole batch.
    fn forward_backward(&self, step: u64, batch: &Batch) -> Result<(LocalStep, Vec<Tensor>)> {
        let k = self.cfg.train.accumulate;
        let b = batch.shape[0];
        if !b.is_multiple_of(k) {
            bail!(
                "a batch of {b} examples does not split into train.accumulate = {k} micro-batches"
            );
        }
        let mb = b / k;
        let rank_first = (self.comm.rank() * b) as u64;
        let mut acc: Option<(LocalStep, Vec<Tensor>)> = None;
        for j in 0..k {
            let micro;
            let part = if k == 1 {
                batch
            } else {
                micro = micro_batch(batch, j * mb, mb);
                &micro
            };
            let next = self.sharded_step(step, part, rank_first + (j * mb) as u64)?;
            acc = Some(add_parts(acc, next)?);
        }
        let (local, grads) = acc.expect("train.accumulate >= 1 (validated)");
        Ok((local, scale_grads(grads, k)?))
    }

    /// [`Self::micro_step`] of `part`, split into one equal shard per thread of `shard_pools`
    /// when there are any (`train.thread_shards`): each shard runs on its own thread, in a
    /// one-thread pool, so the serial parts of candle's autograd run side by side instead of
    /// one after the other. Shard `i` is examples `first + i * len ..` of the step's global
    /// batch, keyed as in [`Self::forward_backward`], so this computes what `accumulate` does
    /// with that many micro-batches. Gradients are the shards' mean, added in shard order.
    fn sharded_step(
        &self,
        step: u64,
        part: &Batch,
        first: u64,
    ) -> Result<(LocalStep, Vec<Tensor>)> {
        let n = self.shard_pools.len();
        if n < 2 || !part.shape[0].is_multiple_of(n) {
            return self.micro_step(step, part, first);
        }
        let len = part.shape[0] / n;
        let results: Vec<Result<(LocalStep, Vec<Tensor>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .shard_pools
                .iter()
                .enumerate()
                .map(|(i, pool)| {
                    let shard = micro_batch(part, i * len, len);
                    let at = first + (i * len) as u64;
                    s.spawn(move || pool.install(|| self.micro_step(step, &shard, at)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("the thread of a batch shard panicked")))
                })
                .collect()
        });
        let mut acc = None;
        for r in results {
            acc = Some(add_parts(acc, r?)?);
        }
        let (local, grads) = acc.expect("at least two shards");
        Ok((local, scale_grads(grads, n)?))
    }

    /// Forward, loss and backward of one micro-batch (or shard); gradients in parameter order.
    fn micro_step(&self, step: u64, part: &Batch, first: u64) -> Result<(LocalStep, Vec<Tensor>)> {
        let mut local = self.forward(step, part, first)?;
        let gs = local.loss.backward()?;
        let sched = match (&self.cont, local.schedule.take()) {
            (Some(c), Some(g)) => c.schedule_grads(&g, &gs)?,
            _ => Vec::new(),
        };
        let sched_grad = |v: &Var| sched.iter().find(|(id, _)| *id == v.as_tensor().id());
        let grads: Vec<Tensor> = self
            .vars
            .iter()
            .map(|v| match (gs.get(v.as_tensor()), sched_grad(v)) {
                // detached: a gradient carries the backward graph (and through it the
                // activations); anything kept across steps (moments) must not keep that alive
                (Some(g), _) => Ok(g.detach()),
                (None, Some((_, g))) => Ok(g.clone()),
                (None, None) => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        Ok((local, grads))
    }

    /// The step statistics summed over ranks (with the stop flag), then clipping, AdamW, the EMAs
    /// and the loss-aware sampler's history; a non-finite step is skipped on every rank alike.
    fn optimize(&mut self, step: u64, local: &LocalStep, grads: Vec<Tensor>) -> Result<StepStats> {
        let norm = global_norm(&grads)?;
        let mut red = local.stats.to_vec();
        red.push(if self.stop_flag.is_set() { 1.0 } else { 0.0 });
        self.comm.all_reduce_sum_f64(&mut red)?;
        let global = StepStats::from_slice(&red[..STEP_STATS_LEN]);
        self.metrics.stop = red[STEP_STATS_LEN] > 0.0;

        let skip = global.nonfinite > 0.0 || !norm.is_finite();
        let lr = self.adamw_params().lr_at(step);
        self.metrics.lr = lr;
        if skip {
            self.st.skipped += 1;
            self.metrics.nonfinite += 1;
            tracing::warn!(
                step,
                grad_norm = norm,
                "non-finite loss or gradient: step skipped"
            );
            self.check_nonfinite(step)?;
        } else {
            self.metrics.nonfinite = 0;
            let grads = clip_by_global_norm(grads, norm, self.cfg.optim.grad_clip)?;
            self.st.opt.step(&self.vars, &grads, lr)?;
            let n = self.st.opt.t - 1;
            for e in &mut self.st.emas {
                let d = e.decay(n, self.cfg.ema.warmup);
                e.update(&self.vars, d)?;
            }
            if let TimestepSampler::LossAware(_) = self.st.sampler {
                self.update_loss_history(local)?;
            }
        }
        self.st.window.add(&global, (!skip).then_some(norm));
        Ok(global)
    }

    /// Every rank feeds the same global (t, loss) list, in rank order, to the loss-aware sampler.
    fn update_loss_history(&mut self, local: &LocalStep) -> Result<()> {
        let mut mine = Vec::with_capacity(local.ts.len() * 16);
        for (t, l) in local.ts.iter().zip(&local.per_example) {
            mine.extend((*t as u64).to_le_bytes());
            mine.extend(l.to_le_bytes());
        }
        let all = self.comm.all_gather_bytes(&mine)?;
        let (mut ts, mut ls) = (Vec::new(), Vec::new());
        for r in all {
            for c in r.chunks_exact(16) {
                ts.push(u64::from_le_bytes(c[..8].try_into().expect("8 bytes")) as usize);
                ls.push(f64::from_le_bytes(c[8..].try_into().expect("8 bytes")));
            }
        }
        self.st.sampler.update(&ts, &ls);
        Ok(())
    }

    fn last_step(&self) -> bool {
        self.st.step == self.cfg.schedule.total_steps || self.metrics.stop
    }

    /// The metrics line (rank 0) at every `log_every` boundary and at the last step.
    fn log_step(&mut self, epoch: u64) -> Result<()> {
        let at_boundary = self.st.step.is_multiple_of(self.cfg.schedule.log_every);
        if self.root() && (at_boundary || self.last_step()) {
            let line = self.metrics_line(epoch);
            if let Some(m) = self.log.as_mut() {
                m.write(&line)?;
            }
            match &self.bar {
                Some(pb) => {
                    pb.set_position(self.st.step);
                    pb.set_message(format!(
                        "loss {:.4}",
                        line["loss"].as_f64().unwrap_or(f64::NAN)
                    ));
                }
                None => tracing::info!("{line}"),
            }
        } else if let Some(pb) = &self.bar {
            pb.set_position(self.st.step);
        }
        if at_boundary {
            // A partial window (end of run, stop) is logged but kept, so the resumed run's next
            // line covers exactly the steps the uninterrupted run's would.
            self.st.window = Window::default();
            self.metrics.reset_window();
        }
        Ok(())
    }

    fn metrics_line(&self, epoch: u64) -> serde_json::Value {
        let (cfg, w, m) = (self.cfg, &self.st.window, &self.metrics);
        let secs = m.window_start.elapsed().as_secs_f64().max(1e-9);
        let mut extra = Map::new();
        if w.mean(2) != 0.0 || matches!(self.net, Net::Diffusion(_)) {
            extra.insert("mse".into(), num(w.mean(2)));
        }
        let has_vb = cfg.task == Task::Diffusion
            && (cfg.diffusion.variance == Variance::LearnedRange
                || cfg.diffusion.loss == Loss::Vlb);
        if has_vb {
            extra.insert("vb".into(), num(w.mean(3)));
        }
        if cfg.task == Task::Classifier {
            extra.insert("accuracy".into(), num(w.mean(4)));
        }
        extra.insert("epoch".into(), json!(epoch));
        let per_step = 1e3 / m.window_steps.max(1) as f64;
        extra.insert("sync_ms".into(), num(m.window_sync * per_step));
        extra.insert("step_ms".into(), num(m.window_step * per_step));
        let global_batch = (self.comm.world_size() * cfg.train.accumulate * cfg.data.batch) as f64;
        w.line(
            self.st.step,
            m.lr,
            m.window_steps as f64 * global_batch / secs,
            self.st.skipped,
            &extra,
        )
    }

    /// Ends the run after `schedule.max_nonfinite_steps` consecutive non-finite steps: skipping
    /// them forever would look like progress and exit 0.
    fn check_nonfinite(&self, step: u64) -> Result<()> {
        let (n, max) = (
            self.metrics.nonfinite,
            self.cfg.schedule.max_nonfinite_steps,
        );
        if n < max {
            return Ok(());
        }
        let kept = self
            .metrics
            .last_finite
            .as_ref()
            .map_or("none in this run".to_string(), |p| p.display().to_string());
        bail!(
            "{n} consecutive non-finite steps (loss or gradient NaN/inf) up to step {step}: \
             stopping (schedule.max_nonfinite_steps = {max}). The last checkpoint written before \
             them (kept: no checkpoint was pruned since) is {kept}; lower optim.lr or set \
             optim.grad_clip, then resume from it with --resume PATH."
        )
    }

    /// A checkpoint every `checkpoint_every` steps and at the last step (written by rank 0).
    fn save_if_due(&mut self) -> Result<()> {
        if self
            .st
            .step
            .is_multiple_of(self.cfg.schedule.checkpoint_every)
            || self.last_step()
        {
            self.save()?;
        }
        Ok(())
    }

    /// Writes a checkpoint of the current state (rank 0) and prunes old ones, except while steps
    /// are non-finite.
    pub fn save(&mut self) -> Result<()> {
        if self.root() {
            let finite = self.metrics.nonfinite == 0;
            let dir = self.write_checkpoint(finite)?;
            if finite {
                self.metrics.last_finite = Some(dir.clone());
            }
            self.outcome.checkpoint = Some(dir);
        }
        self.metrics.last_ckpt_step = Some(self.st.step);
        Ok(())
    }

    /// Writes a checkpoint of the current state (rank 0) and, when `prune`, keeps the newest K valid
    /// ones (every file verified; the one just written counts as valid). Returns its directory.
    fn write_checkpoint(&self, prune: bool) -> Result<PathBuf> {
        let (st, lr) = (&self.st, self.metrics.lr);
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
            global_batch: self.comm.world_size() * self.cfg.train.accumulate * self.cfg.data.batch,
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
            dataset: Some(self.dataset.clone()),
            files: vec![],
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            writer: format!("ddpm-train {}", env!("CARGO_PKG_VERSION")),
            manifest_sha256: String::new(),
        };
        let dir = w.finish(manifest)?;
        let removed = if prune {
            checkpoint::prune(
                &self.run_dir,
                self.cfg.schedule.keep_checkpoints,
                Some(&dir),
                |d| checkpoint::Checkpoint::open_verified(d).is_ok(),
            )?
        } else {
            Vec::new()
        };
        tracing::info!(
            dir = %dir.display(),
            secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
            pruned = removed.len(),
            "checkpoint written"
        );
        Ok(dir)
    }

    /// The final checkpoint (if the last step did not write one) and pictures; the barrier.
    fn finish(mut self) -> Result<TrainOutcome> {
        // A run that starts at (or past) its total still ends with a checkpoint at its last step.
        if self.metrics.last_ckpt_step != Some(self.st.step) && self.root() {
            let newest = checkpoint::list_checkpoints(&self.run_dir)
                .into_iter()
                .next();
            match newest {
                Some((step, dir)) if step == self.st.step => self.outcome.checkpoint = Some(dir),
                _ => self.save()?,
            }
            if self.outcome.loss_plot.is_none() {
                self.pictures();
            }
        }
        if let Some(pb) = self.bar.take() {
            pb.finish_and_clear();
        }
        self.comm.barrier()?;
        let (st, stop) = (&self.st, self.metrics.stop);
        self.outcome.step = st.step;
        self.outcome.stopped_by_signal = stop;
        self.outcome.skipped_steps = st.skipped;
        if stop {
            // Every rank says where it stopped (warn: the default level of non-root ranks), so a
            // job log shows that all ranks ended after the same step.
            tracing::warn!(
                rank = self.comm.rank(),
                step = st.step,
                "stopped by signal after writing a checkpoint; continue with --resume auto"
            );
        } else if self.root() {
            tracing::info!(step = st.step, skipped = st.skipped, "training finished");
        }
        Ok(self.outcome)
    }

    fn adamw_params(&self) -> crate::optim::AdamWParams {
        persist::adamw_params(self.cfg)
    }

    /// Previews are a by-product: a failure is logged, not allowed to end a long run.
    fn pictures(&mut self) {
        if let Some(c) = &self.cont {
            self.schedule_plot(c);
        }
        // The preview grid samples the discrete process; continuous-time runs have none yet.
        let ema = self.cont.is_none().then(|| self.preview_ema()).flatten();
        match crate::outputs::write_pictures(
            self.cfg,
            &self.run_dir,
            &self.diffusion,
            &self.device,
            self.st.step,
            ema,
            self.log.as_ref().expect("rank 0"),
        ) {
            Ok((grid, plot)) => {
                self.outcome.sample_grid = grid;
                self.outcome.loss_plot = Some(plot);
            }
            Err(e) => tracing::warn!(step = self.st.step, "preview/loss plot failed: {e:#}"),
        }
    }

    /// The EMA weights the preview samples with, by name (diffusion task only).
    fn preview_ema(&self) -> Option<(f64, Vec<(String, Tensor)>)> {
        let Net::Diffusion(_) = &self.net else {
            return None;
        };
        let rate = self.cfg.preview.ema_rate.unwrap_or(self.cfg.ema.rates[0]);
        let ema = self.st.emas.iter().find(|e| e.rate == rate)?;
        Some((
            rate,
            self.names
                .iter()
                .cloned()
                .zip(ema.params.iter().cloned())
                .collect(),
        ))
    }

    /// Timesteps and noise for `batch`: this rank's examples start at global index
    /// `rank * batch`, and every draw is keyed by `(seed, step, global example index)`.
    /// Forward and loss of `batch` for 0-based step `step`; its example 0 has position `first` in the
    /// step's global batch (the key of its timestep, noise and dropout).
    /// `schedule.png` (rank 0): log-SNR against t of the run's (learned: current) schedule.
    fn schedule_plot(&self, c: &Continuous) {
        let lookup = |n: &str| {
            let i = self.names.iter().position(|x| x == n)?;
            Some(self.vars[i].as_tensor().clone())
        };
        let path = self.run_dir.join("schedule.png");
        if let Err(e) = crate::schedule_plot::write(&path, &c.spec, lookup) {
            tracing::warn!(step = self.st.step, "schedule plot failed: {e:#}");
        }
    }

    /// The continuous-time forward of one micro-batch (`continuous.rs`).
    fn forward_continuous(
        &self,
        net: &Net,
        c: &Continuous,
        step: u64,
        batch: &Batch,
        first: u64,
    ) -> Result<LocalStep> {
        let Net::Diffusion(m) = net else {
            bail!("continuous time needs task = \"diffusion\" (validated)");
        };
        let seed = self.cfg.seed;
        let x0 = Tensor::from_slice(&batch.images, batch.shape.to_vec(), &self.device)?;
        let y = self.dropped_labels(step, first, batch.labels.as_deref())?;
        let ctx = ForwardCtx::train(DropoutKey {
            seed,
            step,
            first_example: first,
        });
        let key = NoiseKey {
            seed,
            step,
            first_example: first,
        };
        let n = (self.comm.world_size() * self.cfg.train.accumulate * self.cfg.data.batch) as u64;
        let mut s = c.forward(m, &x0, y.as_ref(), &ctx, key, n)?;
        if !s.per_example.iter().all(|x| x.is_finite()) {
            s.stats.nonfinite = 1.0;
        }
        Ok(LocalStep {
            loss: s.loss,
            ts: s.buckets,
            per_example: s.per_example,
            stats: s.stats,
            schedule: s.graph,
        })
    }

    fn forward(&self, step: u64, batch: &Batch, first: u64) -> Result<LocalStep> {
        let view = self
            .net
            .compute_view(self.cfg, &self.names, &self.vars, &self.device)?;
        let net = view.as_ref().unwrap_or(&self.net);
        if let Some(c) = &self.cont {
            return self.forward_continuous(net, c, step, batch, first);
        }
        let b = batch.shape[0];
        let seed = self.cfg.seed;
        let x0 = Tensor::from_slice(&batch.images, batch.shape.to_vec(), &self.device)?;
        let (ts, iw) = match self.cfg.task {
            Task::Diffusion => self.st.sampler.sample(seed, step, first, b),
            // The classifier sees uniformly drawn noise levels, as guided-diffusion's classifier_train
            // (or, with classifier_noised = false, t = 0 only: x_t is then x0 up to a noise of
            // std sqrt(1 - alpha_bar_0), close to the clean images `ddpm-eval` feeds it at t = 0).
            Task::Classifier if self.cfg.diffusion.classifier_noised => {
                TimestepSampler::new(self.diffusion.num_timesteps(), false)
                    .sample(seed, step, first, b)
            }
            Task::Classifier => (vec![0; b], vec![1.0; b]),
            Task::Distill => {
                let d = self.distill.as_ref().expect("built for task = distill");
                (d.timesteps(seed, step, first, b), vec![1.0; b])
            }
        };
        let ts_u32: Vec<u32> = ts.iter().map(|&t| t as u32).collect();
        let pred = match self.cfg.diffusion.prediction {
            Prediction::Eps => KPrediction::Epsilon,
            Prediction::V => KPrediction::V,
            Prediction::X0 => KPrediction::StartX,
        };
        let key = NoiseKey {
            seed,
            step,
            first_example: first,
        };
        let noised = fused_noising(&x0, &ts_u32, &self.sqrt_ac, &self.sqrt_1m_ac, key, pred)?;
        let t_model = self
            .diffusion
            .model_timestep_tensor(&ts, DType::F32, &self.device)?;
        let ctx = ForwardCtx::train(DropoutKey {
            seed,
            step,
            first_example: first,
        });
        let tcount = self.diffusion.num_timesteps();
        let mut stats = StepStats::default();
        let (loss, per_example) = match net {
            Net::Diffusion(m) => {
                let y = self.dropped_labels(step, first, batch.labels.as_deref())?;
                // the loss in f32 whatever the compute precision
                let out = m
                    .forward(&noised.x_t, &t_model, y.as_ref(), &ctx)?
                    .to_dtype(DType::F32)?;
                let l = match &self.distill {
                    Some(d) => d.losses(&out, &noised.x_t, &ts, y.as_ref())?,
                    None => self.diffusion.training_losses(
                        &out,
                        &x0,
                        &noised.x_t,
                        &noised.noise,
                        &ts,
                    )?,
                };
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
                let l = batch
                    .labels
                    .as_ref()
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
            schedule: None,
        })
    }

    /// The class labels with classifier-free-guidance label dropout applied (the null class is
    /// `num_classes`); `None` for an unconditional model.
    fn dropped_labels(
        &self,
        step: u64,
        first: u64,
        labels: Option<&[u32]>,
    ) -> Result<Option<Tensor>> {
        match (self.num_classes, labels) {
            (Some(k), Some(l)) => {
                let p = self.cfg.diffusion.label_dropout as f32;
                let seed = self.cfg.seed;
                let y: Vec<u32> = l
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        let u = StreamKey::new(seed, Stream::LabelDrop, step, first + i as u64)
                            .uniform(0);
                        if p > 0.0 && u < p {
                            k as u32
                        } else {
                            c
                        }
                    })
                    .collect();
                Ok(Some(Tensor::new(y.as_slice(), &self.device)?))
            }
            (Some(_), None) => bail!("the model is class-conditional but the batch has no labels"),
            _ => Ok(None),
        }
    }
}

/// Rank 0 picks the checkpoint to resume from and tells the others, so every rank resumes from the
/// same one. Refuses to start fresh over a run that already has checkpoints.
fn choose_checkpoint(
    comm: &dyn Communicator,
    run_dir: &Path,
    resume: Option<&ResumeFrom>,
) -> Result<Option<PathBuf>> {
    let mut chosen: Vec<u8> = Vec::new();
    if comm.rank() == 0 {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating out_dir {}", run_dir.display()))?;
        for d in checkpoint::clean_staging(run_dir) {
            tracing::warn!(dir = %d.display(), "restored a checkpoint whose replacement was interrupted");
        }
        checkpoint::lineage::recover(run_dir)?;
        let warn =
            |e: &checkpoint::CheckpointError| tracing::warn!("skipping damaged checkpoint: {e}");
        let found = match resume {
            None => None,
            Some(ResumeFrom::Auto) => Checkpoint::find_latest(run_dir, warn),
            Some(ResumeFrom::Path(p)) => Some(Checkpoint::resolve_for_resume(p, warn)?),
        };
        if found.is_none() && resume.is_none() && !checkpoint::list_checkpoints(run_dir).is_empty()
        {
            bail!(
                "{} already has checkpoints; pass --resume auto to continue that run, or choose another --out",
                run_dir.display()
            );
        }
        // The run directory holds one line of checkpoints: whatever is newer than the resume point
        // (an abandoned branch, damaged copies) moves to checkpoints/abandoned/.
        if resume.is_some() {
            let from = found.as_ref().map_or(0, |c| c.manifest.step);
            for d in checkpoint::abandon_newer(run_dir, from)? {
                tracing::warn!(dir = %d.display(), from, "newer than the resume point: moved out of the line");
            }
        }
        if let Some(c) = found {
            chosen = c.dir.to_string_lossy().into_owned().into_bytes();
        }
    }
    comm.broadcast_bytes(&mut chosen, 0)?;
    Ok((!chosen.is_empty()).then(|| PathBuf::from(String::from_utf8_lossy(&chosen).into_owned())))
}

fn open_loader(
    cfg: &TrainConfig,
    comm: &dyn Communicator,
    pos: ddpm_data::LoaderPosition,
) -> Result<Loader> {
    Loader::new(
        LoaderConfig {
            path: cfg.data.path.clone(),
            world: comm.world_size(),
            rank: comm.rank(),
            // a rank's whole step: `train.accumulate` micro-batches (TrainLoop::forward_backward)
            batch: cfg.data.batch * cfg.train.accumulate,
            seed: cfg.seed,
            flip: cfg.data.flip,
            prefetch: cfg.data.prefetch,
        },
        pos,
    )
    .with_context(|| format!("data.path {}", cfg.data.path.display()))
}

/// Rank 0: `config.toml`, the metrics log and the progress bar.
fn open_outputs(
    cfg: &TrainConfig,
    st: &State,
    resumed: bool,
    progress_bar: bool,
) -> Result<(MetricsLog, Option<indicatif::ProgressBar>)> {
    let total = cfg.schedule.total_steps;
    if st.step >= total {
        tracing::warn!(
            step = st.step,
            total_steps = total,
            "the checkpoint is already at or past schedule.total_steps: nothing to train (raise --steps to continue)"
        );
    }
    let run_dir = cfg.out_dir();
    ddpm_io::write_atomic(&run_dir.join("config.toml"), cfg.to_toml().as_bytes())?;
    let log = MetricsLog::open(run_dir, resumed.then_some(st.step))?;
    let bar = (progress_bar && std::io::stderr().is_terminal()).then(|| {
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
    Ok((log, bar))
}

/// Checks the dataset against the model before training starts; errors name the config keys.
fn check_dataset(cfg: &TrainConfig, ds: &ddpm_data::Hdf5Dataset) -> Result<Option<usize>> {
    let (size, ch, classes, table) = match cfg.task {
        Task::Diffusion | Task::Distill => {
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
    if ds.len() < cfg.data.batch * cfg.train.accumulate {
        bail!(
            "data.path {p} has {} images, fewer than data.batch x train.accumulate = {} x {}",
            ds.len(),
            cfg.data.batch,
            cfg.train.accumulate
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

/// Convenience for tests and tools: the run directory's metrics lines.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(crate::metrics::read_lines(&run_dir.join("metrics.jsonl"))?)
}

/// Examples `start .. start + len` of `batch` (a micro-batch of gradient accumulation).
/// `acc + next`: statistics and gradients summed, timesteps and per-example losses appended
/// (the loss tensor kept is the first part's; it is not used after its backward).
fn add_parts(
    acc: Option<(LocalStep, Vec<Tensor>)>,
    next: (LocalStep, Vec<Tensor>),
) -> Result<(LocalStep, Vec<Tensor>)> {
    let Some((mut sum, sum_grads)) = acc else {
        return Ok(next);
    };
    let (local, grads) = next;
    let stats: Vec<f64> = sum
        .stats
        .to_vec()
        .iter()
        .zip(local.stats.to_vec())
        .map(|(a, b)| a + b)
        .collect();
    sum.stats = StepStats::from_slice(&stats);
    sum.ts.extend(local.ts);
    sum.per_example.extend(local.per_example);
    let grads = sum_grads
        .iter()
        .zip(&grads)
        .map(|(a, g)| a + g)
        .collect::<candle_core::Result<_>>()?;
    Ok((sum, grads))
}

/// The mean of `parts` summed gradient sets (unchanged for one).
fn scale_grads(grads: Vec<Tensor>, parts: usize) -> Result<Vec<Tensor>> {
    if parts == 1 {
        return Ok(grads);
    }
    let inv = 1.0 / parts as f64;
    Ok(grads
        .iter()
        .map(|g| g.affine(inv, 0.0))
        .collect::<candle_core::Result<_>>()?)
}

/// One single-thread rayon pool per batch shard (`train.thread_shards`, on the CPU), as many
/// as [`ddpm_ops::thread_shards`] says; `log`: say which CPU kernels and shards run.
fn shard_pools(
    cfg: &TrainConfig,
    device: &Device,
    params: usize,
    log: bool,
) -> Result<Vec<rayon::ThreadPool>> {
    let n = if cfg.train.thread_shards && device.is_cpu() {
        ddpm_ops::thread_shards(ddpm_ops::num_threads(), cfg.data.batch, params)
    } else {
        0
    };
    if log && device.is_cpu() {
        tracing::info!(kernels = ddpm_ops::kernel_summary(), "ddpm-ops");
    }
    if log && n > 0 {
        tracing::info!(
            shards = n,
            "train.thread_shards: each micro-batch split over the compute threads"
        );
    }
    (0..n)
        .map(|i| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(move |_| format!("ddpm-shard-{i}"))
                .build()
                .context("starting the batch shard threads")
        })
        .collect()
}

fn micro_batch(batch: &Batch, start: usize, len: usize) -> Batch {
    let per: usize = batch.shape[1..].iter().product();
    let mut shape = batch.shape;
    shape[0] = len;
    Batch {
        images: batch.images[start * per..(start + len) * per].to_vec(),
        shape,
        labels: batch
            .labels
            .as_ref()
            .map(|l| l[start..start + len].to_vec()),
        indices: batch.indices[start..start + len].to_vec(),
        epoch: batch.epoch,
        batch_index: batch.batch_index,
    }
}
