//! Generating N images on W ranks: which labels, which rank makes which images, and gathering them.
//!
//! The N images are cut into batches of `batch` consecutive global indices; rank r takes the
//! contiguous block of batches `[r * nb / W, (r + 1) * nb / W)`. Every image's noise is keyed by its
//! global index (see [`crate::sampler`]), and with the same `batch` the batches themselves are the same
//! whatever W is, so W ranks produce exactly the images one rank would. Rank 0 gathers the uint8
//! images in global order with `all_gather_bytes`.

use std::time::Instant;

use candle_core::{DType, Device};
use ddpm_dist::Communicator;

use crate::denoiser::Denoiser;
use crate::error::{Result, SamplerError};
use crate::guidance::Guidance;
use crate::images::to_uint8_nhwc;
use crate::sampler::{BatchSpec, Sampler};

/// Which class each image gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelPlan {
    /// An unconditional model.
    Unconditional,
    /// Every image of class `k`.
    Class(u32),
    /// `per_class` images of each class in turn: images `k * per_class ..` are class k (a grid with
    /// one row per class).
    PerClass {
        per_class: usize,
        num_classes: usize,
    },
    /// Image `i` is class `i % num_classes` (balanced classes for any N).
    RoundRobin { num_classes: usize },
}

impl LabelPlan {
    /// Labels of images `0..n`, or `None` for an unconditional model.
    pub fn labels(&self, n: usize) -> Option<Vec<u32>> {
        match *self {
            LabelPlan::Unconditional => None,
            LabelPlan::Class(k) => Some(vec![k; n]),
            LabelPlan::PerClass { per_class, .. } => {
                Some((0..n).map(|i| (i / per_class) as u32).collect())
            }
            LabelPlan::RoundRobin { num_classes } => {
                Some((0..n).map(|i| (i % num_classes) as u32).collect())
            }
        }
    }
}

/// What to generate.
pub struct GenerateJob<'a> {
    pub sampler: &'a Sampler,
    pub model: &'a dyn Denoiser,
    pub guidance: Guidance<'a>,
    pub n: usize,
    /// `[C, H, W]`.
    pub image_chw: [usize; 3],
    /// One per image, or `None` for an unconditional model.
    pub labels: Option<Vec<u32>>,
    pub seed: u64,
    /// Images per forward batch (per rank).
    pub batch: usize,
    pub device: Device,
    /// Draw a progress bar (rank 0, on a terminal).
    pub progress: bool,
}

/// The result on rank 0 (other ranks get `images` empty).
#[derive(Debug, Clone)]
pub struct Generated {
    /// uint8 `[N, H, W, C]`, global order.
    pub images: Vec<u8>,
    pub labels: Option<Vec<u32>>,
    pub n: usize,
    pub hwc: [usize; 3],
    /// Wall time of this rank's sampling (excluding the gather).
    pub seconds: f64,
    /// Images this rank made.
    pub local_images: usize,
}

/// The batches `(first_index, size)` rank `rank` of `world` makes.
pub fn rank_batches(n: usize, batch: usize, world: usize, rank: usize) -> Vec<(usize, usize)> {
    let nb = n.div_ceil(batch.max(1));
    let (lo, hi) = (rank * nb / world, (rank + 1) * nb / world);
    (lo..hi)
        .map(|k| (k * batch, batch.min(n - k * batch)))
        .collect()
}

/// Generates this rank's share and gathers every image on rank 0. Collective.
pub fn generate(job: &GenerateJob<'_>, comm: &dyn Communicator) -> Result<Generated> {
    if job.n == 0 || job.batch == 0 {
        return Err(SamplerError::Config(format!(
            "need at least one image and a batch of at least 1 (got {} and {})",
            job.n, job.batch
        )));
    }
    if let Some(l) = &job.labels {
        if l.len() != job.n {
            return Err(SamplerError::Config(format!(
                "{} labels for {} images",
                l.len(),
                job.n
            )));
        }
    }
    let [c, h, w] = job.image_chw;
    let batches = rank_batches(job.n, job.batch, comm.world_size(), comm.rank());
    let iters = job.sampler.num_iterations();
    let bar = if job.progress && comm.rank() == 0 {
        let total = (batches.len() * iters) as u64;
        let pb = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} evals ({per_sec}, eta {eta})",
        ) {
            pb.set_style(style);
        }
        pb.set_prefix(format!(
            "{} rank 0/{}",
            job.sampler.settings().kind,
            comm.world_size()
        ));
        Some(pb)
    } else {
        None
    };
    let start = Instant::now();
    let mut mine: Vec<u8> =
        Vec::with_capacity(batches.iter().map(|b| b.1).sum::<usize>() * c * h * w);
    for (bi, &(first, size)) in batches.iter().enumerate() {
        let spec = BatchSpec {
            shape: [size, c, h, w],
            first_index: first as u64,
            seed: job.seed,
            labels: job.labels.as_ref().map(|l| &l[first..first + size]),
            device: job.device.clone(),
            dtype: DType::F32,
            x_init: None,
        };
        let x = job
            .sampler
            .sample_observed(job.model, &job.guidance, &spec, &mut |p| {
                if let Some(pb) = &bar {
                    pb.set_position((bi * iters + p.evals) as u64);
                }
            })?;
        mine.extend(to_uint8_nhwc(&x)?);
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    gather_images(comm, mine, job.n, job.labels.clone(), [h, w, c], seconds)
}

/// Every rank's `mine` (uint8 NHWC images) gathered on rank 0 in rank order, checked to hold `n`
/// images of `hwc`; other ranks get an empty `images`.
pub(crate) fn gather_images(
    comm: &dyn Communicator,
    mine: Vec<u8>,
    n: usize,
    labels: Option<Vec<u32>>,
    hwc: [usize; 3],
    seconds: f64,
) -> Result<Generated> {
    let per_image = hwc.iter().product::<usize>();
    let local_images = mine.len() / per_image;
    let gathered = comm
        .all_gather_bytes(&mine)
        .map_err(|e| SamplerError::Model(format!("gathering images: {e}")))?;
    let images = if comm.rank() == 0 {
        let all: Vec<u8> = gathered.concat();
        if all.len() != n * per_image {
            return Err(SamplerError::Model(format!(
                "gathered {} bytes, expected {n} images of {per_image}",
                all.len()
            )));
        }
        all
    } else {
        Vec::new()
    };
    Ok(Generated {
        images,
        labels,
        n,
        hwc,
        seconds,
        local_images,
    })
}
