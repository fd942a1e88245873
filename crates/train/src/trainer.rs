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

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use ddpm_data::{Loader, LoaderConfig};
use ddpm_dist::{Communicator, GradientSync};
use serde_json::{json, Map};

use crate::checkpoint::{self, Checkpoint};
use crate::config::{Task, TrainConfig};
use crate::metrics::{MetricsLog, StepStats, Window, STEP_STATS_LEN};
use crate::optim::{clip_by_global_norm, global_norm};
use crate::outputs::pictures;
use crate::run::{build_net, sorted_vars, Net, Run};
use crate::signals::StopFlag;
use crate::timesteps::TimestepSampler;

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
                // a rank's whole step: `train.accumulate` micro-batches (crates/train/src/step.rs)
                batch: cfg.data.batch * cfg.train.accumulate,
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
    if root && st.step >= total {
        tracing::warn!(
            step = st.step,
            total_steps = total,
            "the checkpoint is already at or past schedule.total_steps: nothing to train (raise --steps to continue)"
        );
    }
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
            global_batch = comm.world_size() * cfg.train.accumulate * cfg.data.batch,
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
        cfg.dist.bucket_bytes(),
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
    let global_batch = (comm.world_size() * cfg.train.accumulate * cfg.data.batch) as f64;
    let mut window_start = Instant::now();
    let mut window_steps = 0u64;
    // Wall time of this rank in the gradient all-reduce, and of whole steps, since the last log
    // line: `sync_ms` / `step_ms` in metrics.jsonl, the synchronisation overhead of data parallelism.
    let (mut window_sync, mut window_step) = (0.0f64, 0.0f64);
    let mut lr = run.adamw_params().lr_at(st.step);
    let mut last_ckpt_step = None;
    let mut stop = false;

    while st.step < total && !stop {
        let step = st.step;
        let _span = tracing::debug_span!("step", step).entered();
        let step_start = Instant::now();
        let batch = loader
            .next_batch()
            .with_context(|| format!("data.path {}", cfg.data.path.display()))?;
        let local = run.local_gradients(step, &batch, &st.sampler)?;
        let sync_start = Instant::now();
        let grads = sync.all_reduce_mean(comm, &local.grads)?;
        window_sync += sync_start.elapsed().as_secs_f64();
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
        window_step += step_start.elapsed().as_secs_f64();
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
            let per_step = 1e3 / window_steps.max(1) as f64;
            extra.insert(
                "sync_ms".into(),
                crate::metrics::num(window_sync * per_step),
            );
            extra.insert(
                "step_ms".into(),
                crate::metrics::num(window_step * per_step),
            );
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
            (window_sync, window_step) = (0.0, 0.0);
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
