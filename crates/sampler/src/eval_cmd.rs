//! The `ddpm-eval` commands: measure a trained model.
//!
//! - `bpd`: the full variational bound on a test set in bits/dim, with L_T, the sum of the L_{t-1} and
//!   L_0 reported separately (improved-diffusion `calc_bpd_loop`), examples split across ranks.
//! - `fid`: the Frechet distance between generated and real images in the feature space of a
//!   classifier trained on the dataset (named `FD-<data>-classifier`; this is not Inception FID), and
//!   that classifier's accuracy on class-conditional samples.
//!
//! Every metric is printed as one JSON line on stdout and appended to `eval.jsonl` in the run directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ddpm_dist::Communicator;

use crate::bpd::{bpd_batch, BpdSums};
use crate::device::select_device;
use crate::error::Result;
use crate::fid::{accuracy, extract, FeatureExtractor};
use crate::generate::rank_batches;
use crate::images::from_uint8_nhwc;
use crate::linalg::{frechet_distance, GaussianStats};
use crate::{Checkpoint, EncoderClassifier, UNetDenoiser, Weights};

/// `ddpm-eval bpd`: the variational bound in bits/dim on a test set (T model evaluations per example).
#[derive(clap::Args, Debug)]
pub struct BpdArgs {
    /// Run directory or checkpoint directory of the diffusion model.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Test set (ddpm-data HDF5).
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate the first N examples (default: all; each costs T model evaluations).
    #[arg(long)]
    pub num: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// ema, ema:RATE or model.
    #[arg(long, default_value = "ema")]
    pub weights: String,
    /// Seed of the forward-process noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not clip the predicted x0 (improved-diffusion's image_nll clips by default).
    #[arg(long)]
    pub no_clip: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where eval.jsonl goes (default: the run directory).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Continuous-time models: draws of t per example for the diffusion term (the bound is their
    /// mean; their spread gives the variance of the one-draw training estimate).
    #[arg(long, default_value_t = 1)]
    pub time_draws: usize,
}

/// `ddpm-eval fid`: Frechet distance in the features of a classifier trained on the data, and its
/// accuracy on samples.
#[derive(clap::Args, Debug)]
pub struct FidArgs {
    /// Run directory or checkpoint of the classifier (`ddpm-train --task classifier`).
    #[arg(long)]
    pub classifier: PathBuf,
    /// Real images (ddpm-data HDF5), e.g. the test set.
    #[arg(long)]
    pub data: PathBuf,
    /// Generated images (`ddpm-sample` output).
    #[arg(long)]
    pub samples: PathBuf,
    /// The diffusion model's run directory: where eval.jsonl goes (default: the samples' directory).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Use the first N real images (default: all).
    #[arg(long)]
    pub num: Option<usize>,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Dataset name in the metric name `FD-<name>-classifier` (default: the data file's stem).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Prints the JSON line and appends it to `dir/eval.jsonl` (atomically: the whole file is rewritten).
pub(crate) fn emit(dir: &Path, value: &serde_json::Value) -> Result<()> {
    let line = value.to_string();
    println!("{line}");
    std::fs::create_dir_all(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    let path = dir.join("eval.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&line);
    text.push('\n');
    ddpm_io::write_atomic(&path, text.as_bytes())?;
    Ok(())
}

/// This rank's contiguous share `[lo, hi)` of `n` items: whole batches of `batch`, so every batch (and
/// therefore every float result) is the same whatever the number of ranks.
pub(crate) fn share(n: usize, batch: usize, comm: &dyn Communicator) -> (usize, usize) {
    let b = rank_batches(n, batch, comm.world_size(), comm.rank());
    match (b.first(), b.last()) {
        (Some(f), Some(l)) => (f.0, l.0 + l.1),
        _ => (0, 0),
    }
}

pub fn run_bpd(args: &BpdArgs, comm: &dyn Communicator) -> Result<()> {
    let BpdArgs {
        checkpoint,
        data,
        num,
        batch,
        weights,
        seed,
        no_clip,
        device,
        out_dir,
        time_draws: _,
    } = args;
    let rank0 = comm.rank() == 0;
    let ckpt = Checkpoint::resolve(checkpoint, |e| {
        if rank0 {
            eprintln!("warning: skipping checkpoint: {e}")
        }
    })?;
    if let Some(spec) = ckpt.config()?.diffusion.continuous() {
        return crate::continuous_cmd::run_bpd_continuous(args, &ckpt, spec, comm);
    }
    let model_cfg = ckpt
        .config()?
        .model
        .ok_or_else(|| usage!("{}: not a diffusion model", ckpt.dir.display()))?;
    let device = select_device(device, comm.local_rank())?;
    let diffusion = ckpt.diffusion()?;
    let ds = ddpm_data::Hdf5Dataset::open(data)?;
    if [ds.height(), ds.width(), ds.channels()]
        != [
            model_cfg.image_size,
            model_cfg.image_size,
            model_cfg.in_channels,
        ]
    {
        bail_usage!(
            "{}: images are {}x{}x{}, the model takes {}x{}x{}",
            data.display(),
            ds.height(),
            ds.width(),
            ds.channels(),
            model_cfg.image_size,
            model_cfg.image_size,
            model_cfg.in_channels
        );
    }
    let n = num.map_or(ds.len(), |k| k.min(ds.len()));
    if n == 0 || *batch == 0 {
        bail_usage!("nothing to evaluate (num {n}, batch {batch})");
    }
    let labels = if model_cfg.num_classes.is_some() {
        Some(ds.labels().ok_or_else(|| {
            usage!(
                "{}: the model is class-conditional but the data has no labels",
                data.display()
            )
        })?)
    } else {
        None
    };
    let weights_arg = weights.clone();
    let weights: Weights = weights.parse()?;
    let model = UNetDenoiser::new(ckpt.load_unet(weights, DType::F32, &device)?);
    let (lo, hi) = share(n, *batch, comm);
    let big_t = diffusion.num_timesteps();
    let bar = if rank0 {
        let pb = indicatif::ProgressBar::new(((hi - lo).div_ceil(*batch) * big_t) as u64);
        if let Ok(s) = indicatif::ProgressStyle::with_template(
            "bpd rank 0 [{elapsed_precise}] {bar:30} {pos}/{len} ({eta})",
        ) {
            pb.set_style(s);
        }
        Some(pb)
    } else {
        None
    };
    let start = Instant::now();
    let mut sums = BpdSums::default();
    let hwc = [ds.height(), ds.width(), ds.channels()];
    for (bi, first) in (lo..hi).step_by(*batch).enumerate() {
        let m = (*batch).min(hi - first);
        let bytes = ds.read_images(first, m)?;
        let x0 = from_uint8_nhwc(&bytes, m, hwc, &device)?;
        let y = match &labels {
            Some(l) => Some(Tensor::from_vec(
                l[first..first + m]
                    .iter()
                    .map(|&v| v as u32)
                    .collect::<Vec<_>>(),
                m,
                &device,
            )?),
            None => None,
        };
        let s = bpd_batch(
            &model,
            &diffusion,
            &x0,
            y.as_ref(),
            first as u64,
            *seed,
            !no_clip,
            &mut |k| {
                if let Some(pb) = &bar {
                    pb.set_position((bi * big_t + k) as u64);
                }
            },
        )?;
        sums.add(&s);
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    let mut v = sums.to_vec();
    v.push(start.elapsed().as_secs_f64());
    comm.all_reduce_sum_f64(&mut v)?;
    if !rank0 {
        return Ok(());
    }
    let r = BpdSums::from_slice(&v).report();
    let value = serde_json::json!({
        "metric": "bpd",
        "value": r.total_bpd,
        "total_bpd": r.total_bpd,
        "total_bpd_stderr": r.total_bpd_stderr,
        "prior_bpd_L_T": r.prior_bpd,
        "kl_bpd_sum_L_t_minus_1": r.kl_bpd,
        "decoder_bpd_L_0": r.decoder_bpd,
        "num_examples": r.num_examples,
        "data": data,
        "checkpoint": ckpt.dir,
        "step": ckpt.step(),
        "weights": weights_arg,
        "timesteps": big_t,
        "clip_denoised": !no_clip,
        "seed": seed,
        "world_size": comm.world_size(),
        "rank_seconds_sum": v[6],
        "seconds": start.elapsed().as_secs_f64(),
    });
    emit(out_dir.as_deref().unwrap_or(&ckpt.run_dir), &value)
}

/// Features of a whole dataset file in global order.
struct SetFeatures {
    /// Row-major `[N, dim]`.
    features: Vec<f32>,
    dim: usize,
    /// The classifier's argmax class of each image.
    preds: Vec<u32>,
    labels: Option<Vec<i64>>,
}

/// Features of this rank's share of a dataset file, gathered on every rank in global order.
fn sharded_features(
    net: &dyn FeatureExtractor,
    path: &Path,
    limit: Option<usize>,
    batch: usize,
    device: &Device,
    comm: &dyn Communicator,
) -> Result<SetFeatures> {
    let ds = ddpm_data::Hdf5Dataset::open(path)?;
    let n = limit.map_or(ds.len(), |k| k.min(ds.len()));
    let (lo, hi) = share(n, batch, comm);
    let hwc = [ds.height(), ds.width(), ds.channels()];
    let (f, dim, preds) = if hi > lo {
        let bytes = ds.read_images(lo, hi - lo)?;
        extract(net, &bytes, hi - lo, hwc, batch, device)?
    } else {
        (Vec::new(), 0, Vec::new()) // more ranks than batches
    };
    let mut mine: Vec<u8> = Vec::with_capacity(f.len() * 4 + preds.len() * 4 + 8);
    mine.extend((dim as u64).to_le_bytes());
    mine.extend((preds.len() as u64).to_le_bytes());
    mine.extend(preds.iter().flat_map(|p| p.to_le_bytes()));
    mine.extend(f.iter().flat_map(|x| x.to_le_bytes()));
    let parts = comm.all_gather_bytes(&mine)?;
    let (mut feats, mut all_preds, mut d) = (Vec::new(), Vec::new(), 0usize);
    for p in parts {
        let u64_at =
            |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes")) as usize;
        let (pd, k) = (u64_at(0), u64_at(8));
        if k > 0 {
            d = pd;
        }
        let mut o = 16;
        for _ in 0..k {
            all_preds.push(u32::from_le_bytes(p[o..o + 4].try_into().expect("4 bytes")));
            o += 4;
        }
        feats.extend(
            p[o..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
        );
    }
    let labels = ds.labels().map(|mut l| {
        l.truncate(n);
        l
    });
    Ok(SetFeatures {
        features: feats,
        dim: d,
        preds: all_preds,
        labels,
    })
}

pub fn run_fid(args: &FidArgs, comm: &dyn Communicator) -> Result<()> {
    let FidArgs {
        classifier,
        data,
        samples,
        checkpoint,
        num,
        batch,
        name,
        device,
    } = args;
    let rank0 = comm.rank() == 0;
    let device = select_device(device, comm.local_rank())?;
    let cc = Checkpoint::resolve(classifier, |e| {
        if rank0 {
            eprintln!("warning: skipping checkpoint: {e}")
        }
    })?;
    let w = if cc.manifest.ema_rates.is_empty() {
        Weights::Model
    } else {
        Weights::Ema(None)
    };
    let net = EncoderClassifier::new(cc.load_classifier(w, &device)?);
    let num_classes = net.net.config().num_classes;
    let start = Instant::now();
    let real = sharded_features(&net, data, *num, *batch, &device, comm)?;
    let fake = sharded_features(&net, samples, None, *batch, &device, comm)?;
    let (dim_r, dim_f) = (real.dim, fake.dim);
    if !rank0 {
        return Ok(());
    }
    if dim_r != dim_f {
        bail_usage!("feature dimensions differ: {dim_r} vs {dim_f}");
    }
    let sr = GaussianStats::from_features(&real.features, dim_r)?;
    let sf = GaussianStats::from_features(&fake.features, dim_f)?;
    let fd = frechet_distance(&sr, &sf)?;
    let data_name = name.clone().unwrap_or_else(|| {
        data.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "data".into())
    });
    let out_dir: PathBuf = match checkpoint {
        Some(p) => Checkpoint::resolve(p, |_| {})
            .map(|c| c.run_dir)
            .unwrap_or_else(|_| p.clone()),
        None => samples
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let common = serde_json::json!({
        "classifier": cc.dir,
        "classifier_step": cc.step(),
        "features": net.describe(),
        "feature_dim": dim_r,
        "data": data,
        "samples": samples,
        "num_real": sr.count,
        "num_generated": sf.count,
    });
    let with = |mut v: serde_json::Value| {
        if let (Some(o), Some(c)) = (v.as_object_mut(), common.as_object()) {
            for (k, x) in c {
                o.insert(k.clone(), x.clone());
            }
        }
        v
    };
    emit(
        &out_dir,
        &with(serde_json::json!({
            "metric": format!("FD-{data_name}-classifier"),
            "value": fd,
            "note": "Frechet distance in the features of a classifier trained on this dataset, not Inception FID",
            "seconds": start.elapsed().as_secs_f64(),
        })),
    )?;
    let to_u32 = |l: &[i64]| l.iter().map(|&v| v as u32).collect::<Vec<u32>>();
    if let Some(l) = &real.labels {
        let (acc, _) = accuracy(&real.preds, &to_u32(l), num_classes);
        emit(
            &out_dir,
            &with(serde_json::json!({ "metric": "classifier_accuracy_real", "value": acc })),
        )?;
    }
    match &fake.labels {
        Some(l) => {
            let (acc, per) = accuracy(&fake.preds, &to_u32(l), num_classes);
            let per: Vec<serde_json::Value> = per
                .iter()
                .map(|&(c, t)| serde_json::json!({"correct": c, "total": t, "accuracy": if t > 0 { c as f64 / t as f64 } else { f64::NAN }}))
                .collect();
            emit(
                &out_dir,
                &with(serde_json::json!({
                    "metric": "classifier_accuracy_samples",
                    "value": acc,
                    "note": "fraction of generated images the classifier assigns to the class they were generated for",
                    "per_class": per,
                })),
            )?;
        }
        None => eprintln!(
            "note: {} has no labels; no class accuracy on samples",
            samples.display()
        ),
    }
    Ok(())
}
