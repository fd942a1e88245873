//! A world-1 NCCL all-reduce of real gradients through the trainer's own path: ddpm-dist's
//! `GradientSync` (bucket plan, packing on the device, `DeviceCollectives::all_reduce_sum_in_place` of
//! `NcclCommunicator`, division by the world size, unpacking) beside a `SingleProcess` host (no MPI).
//! At one rank `GradientSync::all_reduce_mean` skips the collectives, so the check calls
//! `all_reduce_mean_even_alone`, which runs them; the mean over one rank must return every gradient
//! bit for bit.

use crate::report::{Diff, Report};
use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{Device, Tensor};
use ddpm_dist::{
    Communicator, GradientSync, NcclCommunicator, SingleProcess, DEFAULT_BUCKET_BYTES,
};

pub fn run(dev: &Device, grads: &[Tensor], rep: &mut Report) -> Result<()> {
    let stream = dev.as_cuda_device()?.cuda_stream();
    let total: usize = grads.iter().map(|g| g.elem_count()).sum();
    // At least 4 buckets for this small model (the trainer's default, 25 MiB, would make one).
    let bucket_bytes = DEFAULT_BUCKET_BYTES.min((total * 4).div_ceil(4)).max(4);
    let mut sync = GradientSync::from_tensors(grads, bucket_bytes)?;
    let buckets = sync.plan().num_buckets();

    let comm = NcclCommunicator::new(Box::new(SingleProcess::new()), dev)?;
    match comm.device_collectives() {
        Some(dc) if dc.supports(dev) => {}
        _ => {
            return Err(anyhow!(
                "NcclCommunicator offers no device collectives for {:?}",
                dev.location()
            ))
        }
    }
    let mut out = sync.all_reduce_mean_even_alone(&comm, grads)?; // warm-up: NCCL sets up its channels
    stream.synchronize()?;
    let reps = 10;
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..reps {
        out = sync.all_reduce_mean_even_alone(&comm, grads)?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let ms = start.elapsed_ms(&end)? as f64 / reps as f64;

    let mut ok = out.len() == grads.len();
    let mut worst = String::new();
    for (g, o) in grads.iter().zip(&out) {
        let d = Diff::new(
            &g.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?,
            &o.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?,
        );
        if g.dims() != o.dims() || !d.bit_identical() {
            ok = false;
            worst = format!("{:?} vs {:?}: {}", g.dims(), o.dims(), d.describe());
        }
    }
    rep.check(
        format!("NCCL world 1 through GradientSync, {buckets} buckets of the U-Net gradients"),
        ok,
        if ok {
            format!(
                "{total} floats in {buckets} buckets of <= {bucket_bytes} bytes: mean over one rank \
                 returned every gradient bit for bit ({} reductions)",
                reps + 1
            )
        } else {
            format!("a gradient changed: {worst}")
        },
    );
    rep.perf(
        "GradientSync mean (NCCL, world 1) per gradient set",
        format!("{ms:.3} ms"),
        format!("{total} floats, {buckets} buckets, pack + all-reduce + unpack"),
    );
    Ok(())
}
