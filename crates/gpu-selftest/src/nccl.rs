//! A world-1 NCCL all-reduce of real gradient buckets, through ddpm-dist's NCCL communicator.
//!
//! The buckets are laid out by ddpm-dist's `BucketPlan` (the layout the trainer's GradientSync uses) and
//! packed on the device the way its NCCL path packs them; each is reduced in place by
//! `NcclCommunicator`'s `DeviceCollectives::all_reduce_sum_in_place`, beside a `SingleProcess` host (no
//! MPI needed). At world size 1 a sum must leave every bucket unchanged. (GradientSync itself skips the
//! collective at world size 1, so it is driven bucket by bucket here.)

use crate::report::{Diff, Report};
use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{Device, Tensor};
use ddpm_dist::{BucketPlan, Communicator, NcclCommunicator, SingleProcess, DEFAULT_BUCKET_BYTES};

pub fn run(dev: &Device, grads: &[Tensor], rep: &mut Report) -> Result<()> {
    let stream = dev.as_cuda_device()?.cuda_stream();
    let total: usize = grads.iter().map(|g| g.elem_count()).sum();
    // At least 4 buckets for this small model (the trainer's default, 25 MiB, would make one).
    let bucket_bytes = DEFAULT_BUCKET_BYTES.min((total * 4).div_ceil(4)).max(4);
    let plan = BucketPlan::new(grads.iter().map(|g| g.shape().clone()), bucket_bytes)?;
    let flat: Vec<Tensor> = grads
        .iter()
        .map(|g| g.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let buckets: Vec<Tensor> = (0..plan.num_buckets())
        .map(|b| {
            let parts: Vec<Tensor> = plan
                .segments(b)
                .iter()
                .map(|s| flat[s.tensor].narrow(0, s.tensor_offset, s.len))
                .collect::<candle_core::Result<_>>()?;
            Tensor::cat(&parts, 0)?.contiguous()
        })
        .collect::<candle_core::Result<_>>()?;
    // The buffers NCCL reduces in place; the originals stay for the comparison.
    let work: Vec<Tensor> = buckets
        .iter()
        .map(|b| b.copy())
        .collect::<candle_core::Result<_>>()?;

    let comm = NcclCommunicator::new(Box::new(SingleProcess::new()), dev)?;
    let dc = comm
        .device_collectives()
        .ok_or_else(|| anyhow!("NcclCommunicator has no device collectives"))?;
    if !dc.supports(dev) {
        return Err(anyhow!(
            "NcclCommunicator does not support {:?}",
            dev.location()
        ));
    }
    let reduce_all = || -> Result<()> {
        for w in &work {
            dc.all_reduce_sum_in_place(w)?;
        }
        Ok(())
    };
    reduce_all()?; // warm-up (NCCL sets up its channels on the first call)
    stream.synchronize()?;
    let reps = 10;
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..reps {
        reduce_all()?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let ms = start.elapsed_ms(&end)? as f64 / reps as f64;

    let mut ok = true;
    let mut worst = String::new();
    for (b, w) in buckets.iter().zip(&work) {
        let d = Diff::new(
            &b.to_device(&Device::Cpu)?.to_vec1::<f32>()?,
            &w.to_device(&Device::Cpu)?.to_vec1::<f32>()?,
        );
        if !d.bit_identical() {
            ok = false;
            worst = d.describe();
        }
    }
    rep.check(
        format!("NCCL all-reduce, world 1, {} buckets of the U-Net gradients", plan.num_buckets()),
        ok,
        if ok {
            format!(
                "{total} floats in {} buckets of <= {bucket_bytes} bytes unchanged after {} in-place sums",
                plan.num_buckets(),
                reps + 1
            )
        } else {
            format!("a bucket changed: {worst}")
        },
    );
    rep.perf(
        "NCCL all-reduce (world 1) per gradient set",
        format!("{ms:.3} ms"),
        format!("{total} floats, {} buckets", plan.num_buckets()),
    );
    Ok(())
}
