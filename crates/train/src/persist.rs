//! Run state <-> checkpoint: saving everything exact resume needs, and restoring it after checking
//! that the checkpoint belongs to this config (hash, global batch, tensor names and shapes).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::checkpoint::{self, Checkpoint, CheckpointWriter, Manifest, OptimizerState, RngState};
use crate::config::HASH_EXCLUDED_KEYS;
use crate::metrics::Window;
use crate::run::{Run, State};
use crate::timesteps::{TimestepSampler, HISTORY_PER_TERM};

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

impl Run<'_> {
    /// Loads `ck` into the parameters and a new state, after checking it belongs to this config.
    pub(crate) fn restore(&self, ck: &Checkpoint) -> Result<State> {
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
        let k = self.cfg.train.accumulate;
        let global = self.comm.world_size() * k * self.cfg.data.batch;
        if m.global_batch != global {
            bail!(
                "refusing to resume from {path}: it was written with a global batch of {} ({} ranks x {} \
                 per rank and step), this run has {global} ({} ranks x {k} micro-batches x {}); the data \
                 order and step randomness depend on it",
                m.global_batch,
                m.world_size,
                m.global_batch / m.world_size.max(1),
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
    pub(crate) fn save(&self, st: &State, lr: f64) -> Result<PathBuf> {
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
}
