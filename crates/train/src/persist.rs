//! Run state <-> checkpoint: saving everything exact resume needs, and restoring it after checking
//! that the checkpoint belongs to this config (hash, global batch, tensor names and shapes).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use ddpm_data::LoaderPosition;
use ddpm_dist::Communicator;

use crate::config::TrainConfig;
use crate::config::HASH_EXCLUDED_KEYS;
use crate::ema::Ema;
use crate::metrics::Window;
use crate::optim::{AdamW, AdamWParams};
use crate::run::State;
use crate::timesteps::{TimestepSampler, HISTORY_PER_TERM};
use ddpm_checkpoint::{
    self as checkpoint, Checkpoint, CheckpointWriter, Manifest, OptimizerState, RngState,
};

/// Flattens a JSON value into `dotted.key -> value text` for config diffs.
pub(crate) fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
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
pub(crate) fn config_diff(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
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

pub(crate) fn adamw_params(cfg: &TrainConfig) -> AdamWParams {
    let o = &cfg.optim;
    AdamWParams {
        lr: o.lr,
        beta1: o.betas[0],
        beta2: o.betas[1],
        eps: o.eps,
        weight_decay: o.weight_decay,
        warmup_steps: o.warmup_steps,
    }
}

/// The state of a run at step 0.
pub(crate) fn fresh_state(cfg: &TrainConfig, vars: &[Var], num_timesteps: usize) -> Result<State> {
    Ok(State {
        step: 0,
        opt: AdamW::new(vars, adamw_params(cfg))?,
        emas: cfg
            .ema
            .rates
            .iter()
            .map(|&r| Ema::new(r, vars))
            .collect::<candle_core::Result<_>>()?,
        sampler: TimestepSampler::new(
            num_timesteps,
            cfg.diffusion.timestep_sampling == crate::config::TimestepSampling::LossAware,
        ),
        window: Window::default(),
        skipped: 0,
        loader_pos: LoaderPosition::default(),
    })
}

fn expected_shapes(names: &[String], vars: &[Var], prefix: &str) -> Vec<(String, Vec<usize>)> {
    names
        .iter()
        .zip(vars)
        .map(|(n, v)| (format!("{prefix}{n}"), v.dims().to_vec()))
        .collect()
}

/// Refuses a checkpoint of another config (hash) or another global batch: resuming it would not
/// continue the same trajectory.
pub(crate) fn check_resumable(
    ck: &Checkpoint,
    cfg: &TrainConfig,
    comm: &dyn Communicator,
    hash: &str,
) -> Result<()> {
    let m = &ck.manifest;
    let path = ck.dir.display();
    if m.config_hash != hash {
        let now = serde_json::to_value(cfg)?;
        let diff = config_diff(&m.config, &now);
        bail!(
            "refusing to resume from {path}: its config hash {} differs from this run's {} \
             (keys excluded from the hash: {}).\nDiffering keys:\n  {}\nStart a new run directory \
             (--out) or restore the original settings.",
            &m.config_hash[..12.min(m.config_hash.len())],
            &hash[..12],
            HASH_EXCLUDED_KEYS.join(", "),
            if diff.is_empty() {
                "(none found; the hash scheme differs)".to_string()
            } else {
                diff.join("\n  ")
            }
        );
    }
    let k = cfg.train.accumulate;
    let global = comm.world_size() * k * cfg.data.batch;
    if m.global_batch != global {
        bail!(
            "refusing to resume from {path}: it was written with a global batch of {} ({} ranks x {} \
             per rank and step), this run has {global} ({} ranks x {k} micro-batches x {}); the data \
             order and step randomness depend on it",
            m.global_batch,
            m.world_size,
            m.global_batch / m.world_size.max(1),
            comm.world_size(),
            cfg.data.batch
        );
    }
    Ok(())
}

/// Loads `ck` into the parameters `vars` and into `st` (a fresh state of this config).
pub(crate) fn restore(
    ck: &Checkpoint,
    names: &[String],
    vars: &[Var],
    device: &Device,
    st: &mut State,
) -> Result<()> {
    let m = &ck.manifest;
    let path = ck.dir.display();
    let shapes = expected_shapes(names, vars, "");
    let model = ck.load_tensors(checkpoint::MODEL_FILE, &shapes, device)?;
    for (n, v) in names.iter().zip(vars) {
        v.set(&model[n].to_dtype(v.dtype())?)?;
    }
    let rates: Vec<f64> = st.emas.iter().map(|e| e.rate).collect();
    for e in &mut st.emas {
        let file = checkpoint::ema_file(e.rate);
        if m.file(&file).is_none() {
            bail!(
                "refusing to resume from {path}: it has no {file} (ema.rates {:?} vs {:?})",
                m.ema_rates,
                rates
            );
        }
        let t = ck.load_tensors(&file, &shapes, device)?;
        e.params = names.iter().map(|n| t[n].clone()).collect();
    }
    let mut expected = expected_shapes(names, vars, "exp_avg.");
    expected.extend(expected_shapes(names, vars, "exp_avg_sq."));
    let o = ck.load_tensors(checkpoint::OPTIMIZER_FILE, &expected, device)?;
    st.opt.m = names
        .iter()
        .map(|n| o[&format!("exp_avg.{n}")].clone())
        .collect();
    st.opt.v = names
        .iter()
        .map(|n| o[&format!("exp_avg_sq.{n}")].clone())
        .collect();
    st.opt.t = m.optimizer.t;
    st.step = m.step;
    st.skipped = m.skipped_steps;
    st.loader_pos = serde_json::from_value(m.loader_position.clone())
        .with_context(|| format!("{path}: bad loader_position"))?;
    if let Some(w) = ck.state_f64("metrics_window")? {
        st.window = Window::from_slice(&w).ok_or_else(|| anyhow!("{path}: bad metrics_window"))?;
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
    Ok(())
}

/// What [`save`] needs of the training loop.
pub(crate) struct SaveCtx<'a> {
    pub(crate) cfg: &'a TrainConfig,
    pub(crate) comm: &'a dyn Communicator,
    pub(crate) run_dir: &'a std::path::Path,
    pub(crate) hash: &'a str,
    pub(crate) names: &'a [String],
    pub(crate) vars: &'a [Var],
    pub(crate) num_parameters: usize,
}

/// Writes a checkpoint of `st` (rank 0), keeps the newest K. Returns its directory.
pub(crate) fn save(ctx: &SaveCtx, st: &State, lr: f64) -> Result<PathBuf> {
    let _span = tracing::info_span!("checkpoint", step = st.step).entered();
    let t0 = Instant::now();
    let mut w = CheckpointWriter::begin(ctx.run_dir, st.step)?;
    let result = (|| -> Result<()> {
        let named = |ts: &[Tensor], prefix: &str| -> Vec<(String, Tensor)> {
            ctx.names
                .iter()
                .zip(ts)
                .map(|(n, t)| (format!("{prefix}{n}"), t.clone()))
                .collect()
        };
        let params: Vec<Tensor> = ctx.vars.iter().map(|v| v.as_tensor().clone()).collect();
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
        task: ctx.cfg.task.to_string(),
        config: serde_json::to_value(ctx.cfg)?,
        config_hash: ctx.hash.to_string(),
        hash_excluded_keys: HASH_EXCLUDED_KEYS.iter().map(|s| s.to_string()).collect(),
        world_size: ctx.comm.world_size(),
        batch_per_rank: ctx.cfg.data.batch,
        global_batch: ctx.comm.world_size() * ctx.cfg.train.accumulate * ctx.cfg.data.batch,
        loader_position: serde_json::to_value(st.loader_pos)?,
        optimizer: OptimizerState {
            kind: "adamw".into(),
            t: st.opt.t,
            lr,
        },
        ema_rates: ctx.cfg.ema.rates.clone(),
        ema_updates: st.opt.t,
        skipped_steps: st.skipped,
        rng: RngState {
            seed: ctx.cfg.seed,
            next_step: st.step,
            generator: "ddpm-rng Philox4x32-10 keyed by (seed, stream, step, global example index)"
                .into(),
        },
        timestep_sampler: match st.sampler {
            TimestepSampler::Uniform { .. } => "uniform".into(),
            TimestepSampler::LossAware(_) => "loss_aware".into(),
        },
        num_parameters: ctx.num_parameters,
        files: vec![],
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        writer: format!("ddpm-train {}", env!("CARGO_PKG_VERSION")),
    };
    let dir = w.finish(manifest)?;
    let removed = checkpoint::prune(ctx.run_dir, ctx.cfg.schedule.keep_checkpoints)?;
    tracing::info!(
        dir = %dir.display(),
        secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
        pruned = removed.len(),
        "checkpoint written"
    );
    Ok(dir)
}
