//! `ddpm-sample` and `ddpm-eval bpd` for continuous-time (`[diffusion] time = "continuous"`)
//! checkpoints: the commands branch here once they see such a config.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ddpm_config::ContinuousSpec;
use ddpm_dist::Communicator;

use crate::continuous::{
    elbo_batch, sample_continuous, ContinuousBatch, ContinuousBpdSums, ContinuousKind,
    ContinuousModel, HostGamma,
};
use crate::error::Result;
use crate::eval_cmd::{emit, share, BpdArgs};
use crate::generate::{rank_batches, Generated};
use crate::images::{from_uint8_nhwc, to_uint8_nhwc};
use crate::{Checkpoint, Weights};

/// Default number of sampler steps for a continuous-time model.
pub const DEFAULT_STEPS: usize = 100;

/// The U-Net and schedule (the learned one from the same weights file) of a checkpoint.
pub fn load_model(
    ckpt: &Checkpoint,
    spec: ContinuousSpec,
    weights: Weights,
    device: &Device,
) -> Result<ContinuousModel> {
    let unet = ckpt.load_unet(weights, DType::F32, device)?;
    let gamma = HostGamma::new(&spec, ckpt.load_schedule(weights)?)?;
    Ok(ContinuousModel {
        unet,
        spec,
        gamma,
        cfg: None,
    })
}

/// What `ddpm-sample` asks of a continuous-time model.
pub struct ContinuousSampleJob<'a> {
    pub model: &'a ContinuousModel,
    pub kind: ContinuousKind,
    pub steps: usize,
    pub clip: bool,
    pub n: usize,
    pub labels: Option<Vec<u32>>,
    pub seed: u64,
    pub batch: usize,
    pub device: Device,
}

/// Generates `n` images split across ranks in whole batches (as `generate`), gathered on rank 0.
pub fn generate_continuous(
    job: &ContinuousSampleJob<'_>,
    comm: &dyn Communicator,
) -> Result<Generated> {
    let m = job.model.unet.config();
    let (c, h, w) = (m.in_channels, m.image_size, m.image_size);
    let batches = rank_batches(job.n, job.batch.max(1), comm.world_size(), comm.rank());
    let start = Instant::now();
    let mut mine = Vec::new();
    for &(first, size) in &batches {
        let labels = match &job.labels {
            Some(l) => Some(Tensor::new(&l[first..first + size], &job.device)?),
            None => None,
        };
        let b = ContinuousBatch {
            chw: [c, h, w],
            n: size,
            first_index: first as u64,
            seed: job.seed,
            labels: labels.as_ref(),
            device: job.device.clone(),
        };
        let x = sample_continuous(job.model, job.kind, job.steps, job.clip, &b)?;
        mine.extend(to_uint8_nhwc(&x)?);
    }
    let seconds = start.elapsed().as_secs_f64();
    crate::generate::gather_images(comm, mine, job.n, job.labels.clone(), [h, w, c], seconds)
}

/// `ddpm-eval bpd` on a continuous-time checkpoint: the ELBO with its three terms, the diffusion
/// term from `--time-draws` draws of t per example, and the variance of the one-draw estimate.
pub fn run_bpd_continuous(
    args: &BpdArgs,
    ckpt: &Checkpoint,
    spec: ContinuousSpec,
    comm: &dyn Communicator,
) -> Result<()> {
    let rank0 = comm.rank() == 0;
    let device = crate::device::select_device(&args.device, comm.local_rank())?;
    let weights: Weights = args.weights.parse()?;
    let model = load_model(ckpt, spec, weights, &device)?;
    let ds = ddpm_data::Hdf5Dataset::open(&args.data)?;
    let n = args.num.map_or(ds.len(), |k| k.min(ds.len()));
    if n == 0 || args.batch == 0 || args.time_draws == 0 {
        bail_usage!(
            "nothing to evaluate (num {n}, batch {}, time draws {})",
            args.batch,
            args.time_draws
        );
    }
    let labels = match model.unet.config().num_classes {
        Some(_) => Some(ds.labels().ok_or_else(|| {
            usage!(
                "{}: the model is class-conditional but the data has no labels",
                args.data.display()
            )
        })?),
        None => None,
    };
    let (lo, hi) = share(n, args.batch, comm);
    let hwc = [ds.height(), ds.width(), ds.channels()];
    let start = Instant::now();
    let mut sums = ContinuousBpdSums::default();
    for first in (lo..hi).step_by(args.batch) {
        let m = args.batch.min(hi - first);
        let x0 = from_uint8_nhwc(&ds.read_images(first, m)?, m, hwc, &device)?;
        let y = match &labels {
            Some(l) => {
                let v: Vec<u32> = l[first..first + m].iter().map(|&v| v as u32).collect();
                Some(Tensor::from_vec(v, m, &device)?)
            }
            None => None,
        };
        let s = elbo_batch(
            &model,
            &x0,
            y.as_ref(),
            first as u64,
            args.seed,
            args.time_draws,
        )?;
        let mut v = sums.to_vec();
        v.iter_mut().zip(s.to_vec()).for_each(|(a, b)| *a += b);
        sums = ContinuousBpdSums::from_slice(&v);
    }
    let mut v = sums.to_vec();
    comm.all_reduce_sum_f64(&mut v)?;
    if !rank0 {
        return Ok(());
    }
    let sums = ContinuousBpdSums::from_slice(&v);
    let mut value = sums.report();
    let extra = serde_json::json!({
        "metric": "bpd",
        "value": value["total_bpd"],
        "time": "continuous",
        "schedule": ckpt.config()?.diffusion.schedule.to_string(),
        "gamma_0": model.gamma.gamma(0.0),
        "gamma_1": model.gamma.gamma(1.0),
        "data": args.data,
        "checkpoint": ckpt.dir,
        "step": ckpt.step(),
        "weights": args.weights,
        "seed": args.seed,
        "world_size": comm.world_size(),
        "seconds": start.elapsed().as_secs_f64(),
    });
    if let (Some(o), Some(e)) = (value.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    emit(args.out_dir.as_deref().unwrap_or(&ckpt.run_dir), &value)
}
