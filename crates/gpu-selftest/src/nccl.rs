//! A world-1 NCCL all-reduce of real gradient buckets.
//!
//! The buckets are laid out by ddpm-dist's `BucketPlan` (the layout the trainer's GradientSync uses) and
//! packed on the device the way its NCCL path packs them. NCCL is driven through cudarc directly: the
//! ddpm-dist NCCL communicator needs its `cuda` feature, which also pulls MPI in, and this binary must
//! run where no MPI is installed. At world size 1 a sum must return every bucket unchanged.

use crate::report::{Diff, Report};
use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{Device, Storage, Tensor};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use ddpm_dist::{BucketPlan, DEFAULT_BUCKET_BYTES};

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

    let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId failed: {e:?}"))?;
    let comm = Comm::from_rank(stream.clone(), 0, 1, id)
        .map_err(|e| anyhow!("ncclCommInitRank failed: {e:?}"))?;
    let cuda = dev.as_cuda_device()?;
    let mut recvs = Vec::with_capacity(buckets.len());
    let reduce_all = |recvs: &mut Vec<_>| -> Result<()> {
        recvs.clear();
        for bucket in &buckets {
            let (st, l) = bucket.storage_and_layout();
            let Storage::Cuda(cs) = &*st else {
                return Err(anyhow!("bucket not on the GPU"));
            };
            let send = cs
                .as_cuda_slice::<f32>()?
                .slice(l.start_offset()..l.start_offset() + bucket.elem_count());
            let mut recv = cuda.alloc_zeros::<f32>(bucket.elem_count())?;
            comm.all_reduce(&send, &mut recv, &ReduceOp::Sum)
                .map_err(|e| anyhow!("ncclAllReduce failed: {e:?}"))?;
            recvs.push(recv);
        }
        Ok(())
    };
    reduce_all(&mut recvs)?; // warm-up (NCCL sets up its channels on the first call)
    stream.synchronize()?;
    let reps = 10;
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..reps {
        reduce_all(&mut recvs)?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let ms = start.elapsed_ms(&end)? as f64 / reps as f64;

    let mut ok = true;
    let mut worst = String::new();
    for (bucket, recv) in buckets.iter().zip(&recvs) {
        let want = bucket.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let got = stream.clone_dtoh(recv)?;
        let d = Diff::new(&want, &got);
        if !d.bit_identical() {
            ok = false;
            worst = d.describe();
        }
    }
    rep.check(
        format!(
            "NCCL all-reduce, world 1, {} buckets of the U-Net gradients",
            plan.num_buckets()
        ),
        ok,
        if ok {
            format!(
                "{total} floats in {} buckets of <= {bucket_bytes} bytes returned unchanged",
                plan.num_buckets()
            )
        } else {
            format!("a bucket changed: {worst}")
        },
    );
    rep.perf(
        "NCCL all-reduce (world 1) per gradient set",
        format!("{ms:.3} ms"),
        format!(
            "{total} floats, {} buckets; includes recv-buffer allocation",
            plan.num_buckets()
        ),
    );
    Ok(())
}
