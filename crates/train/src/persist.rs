//! Run state from a checkpoint: the fresh state of a run, and restoring one after checking that the
//! checkpoint belongs to this config (hash, global batch, tensor names and shapes). Writing is
//! `TrainLoop::save`.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Var};
use ddpm_checkpoint::{self as checkpoint, Checkpoint};
use ddpm_data::LoaderPosition;
use ddpm_dist::Communicator;

use crate::ema::Ema;
use crate::metrics::Window;
use crate::optim::{AdamW, AdamWParams};
use crate::run::State;
use crate::timesteps::TimestepSampler;
use ddpm_config::{TrainConfig, HASH_EXCLUDED_KEYS};

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
            cfg.diffusion.timestep_sampling == ddpm_config::TimestepSampling::LossAware,
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
/// A resumed run must read the data the checkpoint was trained on (by content, not path).
pub(crate) fn check_same_dataset(
    ck: &Checkpoint,
    cfg: &TrainConfig,
    now: &ddpm_data::DatasetFingerprint,
) -> Result<()> {
    match &ck.manifest.dataset {
        Some(then) if then != now => bail!(
            "refusing to resume from {}: it was trained on the dataset {then}, but data.path {} \
             holds {now}. Point data.path at the original data, or start a new run (--out).",
            ck.dir.display(),
            cfg.data.path.display()
        ),
        Some(_) => {}
        None => tracing::warn!(
            dir = %ck.dir.display(),
            "the checkpoint records no dataset fingerprint: cannot check that the data is the same"
        ),
    }
    Ok(())
}

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
            m.config_hash.get(..12).unwrap_or(&m.config_hash),
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
