//! Communicators for data-parallel training: single process, MPI, NCCL.
//!
//! The trainer sees one interface, [`Communicator`], whatever runs underneath:
//! - [`SingleProcess`]: world of one, no MPI needed;
//! - [`MpiCommunicator`] (feature `mpi`, on by default): host-memory collectives over MPI (rsmpi);
//! - `NcclCommunicator` (feature `cuda`): device-memory all-reduce over NCCL, with MPI as the host
//!   channel that carries NCCL's unique id and everything small (config hashes, flags, parameters at
//!   start-up); built without `mpi` it runs at world size 1 beside a [`SingleProcess`].
//!
//! On top of it: [`GradientSync`] (bucketed mean of the gradient set), [`check_same_config`],
//! [`broadcast_tensors`], [`any_non_finite`], and the failure handling ([`install_failure_handlers`],
//! [`fail`]) that turns one rank's death into a prompt, non-zero end of the whole job instead of a hang.
//!
//! A typical trainer:
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let comm = ddpm_dist::init()?;
//! ddpm_dist::install_failure_handlers(&*comm);
//! let config_hash = [0u8; 32]; // sha256 of the resolved config
//! ddpm_dist::check_same_config(&*comm, &config_hash)?;
//! // params = ddpm_dist::broadcast_tensors(&*comm, &params, 0)?;
//! // let mut sync = ddpm_dist::GradientSync::from_tensors(&params, ddpm_dist::DEFAULT_BUCKET_BYTES)?;
//! // each step: let grads = sync.all_reduce_mean(&*comm, &local_grads)?;
//! //            if ddpm_dist::any_non_finite(&*comm, local_flag)? { skip }
//! # Ok(()) }
//! ```

mod checks;
mod error;
mod failure;
mod grad_sync;
pub mod launcher;
pub mod local;
#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "cuda")]
mod nccl;
mod single;
mod start;

pub use checks::{
    any_non_finite, any_true, broadcast_tensors, check_same_config, check_same_fingerprint,
    check_same_tensor_shapes,
};
pub use error::{DistError, Result};
pub use failure::{abort_world, fail, install_failure_handlers};
pub use grad_sync::{BucketPlan, GradientSync, SyncStats, DEFAULT_BUCKET_BYTES};
pub use launcher::{select_cuda_ordinal, LaunchInfo};
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiCommunicator;
#[cfg(feature = "cuda")]
pub use nccl::{init_cuda, NcclCommunicator};
pub use single::SingleProcess;
pub use start::{init_tracing, or_fail, rank_from_env, start, start_or_exit};

use candle_core::{Device, Tensor};

/// Collectives the trainer needs, on host memory unless said otherwise.
///
/// Every method except `rank`/`world_size`/`local_rank`/`local_size`/`backend`/`abort` is *collective*:
/// all ranks must call it, in the same order, with matching sizes. A rank that cannot (it failed) must
/// end the job with [`fail`] or [`Communicator::abort`], never just return, or its peers hang.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Index of this rank among the ranks of its node (picks the GPU).
    fn local_rank(&self) -> usize;
    /// In-place sum over all ranks. Every rank ends with bit-identical values.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), DistError>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError>;
    fn all_reduce_max_u64(&self, buf: &mut [u64]) -> Result<(), DistError>;
    /// After the call every rank's `buf` equals `root`'s (resized as needed).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), DistError>;
    /// Every rank's `mine`, indexed by rank. Lengths may differ between ranks.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError>;
    fn barrier(&self) -> Result<(), DistError>;
    /// Ends every rank of the job now, with exit status `code` (MPI_Abort for MPI).
    fn abort(&self, code: i32) -> !;

    /// Number of ranks on this node.
    fn local_size(&self) -> usize {
        1
    }

    /// Short name for logs: "single", "mpi", "nccl", "local".
    fn backend(&self) -> &'static str;

    /// Sum of every rank's `send` into `recv` (same length), without the copy an in-place call costs
    /// MPI back-ends that cannot use MPI_IN_PLACE.
    fn all_reduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> Result<(), DistError> {
        assert_eq!(
            send.len(),
            recv.len(),
            "all_reduce_sum_f32_into: lengths differ"
        );
        recv.copy_from_slice(send);
        self.all_reduce_sum_f32(recv)
    }

    /// Broadcast of a buffer whose length every rank already knows.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
        let mut bytes: Vec<u8> = if self.rank() == root {
            buf.iter().flat_map(|x| x.to_le_bytes()).collect()
        } else {
            Vec::new()
        };
        self.broadcast_bytes(&mut bytes, root)?;
        if bytes.len() != buf.len() * 4 {
            return Err(DistError::Mismatch(format!(
                "broadcast_f32: rank {root} sent {} values, rank {} expected {}",
                bytes.len() / 4,
                self.rank(),
                buf.len()
            )));
        }
        for (x, b) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// Device-memory collectives, when this back-end has them (NCCL). [`GradientSync`] uses them for
    /// gradients that live on a device they support, and the host path otherwise.
    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        None
    }

    /// One line for start-up logs.
    fn describe(&self) -> String {
        format!(
            "{} rank {}/{} (local {}/{})",
            self.backend(),
            self.rank(),
            self.world_size(),
            self.local_rank(),
            self.local_size()
        )
    }
}

/// Collectives on tensors that stay on their device.
pub trait DeviceCollectives: Send + Sync {
    /// Whether tensors on `device` can be reduced here (NCCL: the communicator's own GPU).
    fn supports(&self, device: &Device) -> bool;
    /// In-place sum over ranks of a contiguous f32 tensor on a supported device. Collective.
    fn all_reduce_sum_in_place(&self, t: &Tensor) -> Result<(), DistError>;
}

/// Starts the communicator the launcher asks for: MPI when the process runs under mpirun/mpiexec/srun
/// (see [`LaunchInfo`]; `DDPM_DIST=single|mpi` overrides), a [`SingleProcess`] otherwise.
///
/// Call once, early, from the main thread. Dropping the returned communicator finalizes MPI, so keep
/// it alive until the end of `main` and let it drop before the process exits normally.
pub fn init() -> Result<Box<dyn Communicator>> {
    let info = LaunchInfo::from_env();
    if info.wants_mpi()? {
        #[cfg(feature = "mpi")]
        {
            return Ok(Box::new(MpiCommunicator::new(&info)?));
        }
        #[cfg(not(feature = "mpi"))]
        {
            if info.announced_world.unwrap_or(2) > 1 {
                return Err(DistError::Launch(format!(
                    "started by a parallel launcher ({} is set) but this build has no MPI support \
                     (ddpm-dist feature `mpi`); every rank would train alone. Rebuild with MPI, or \
                     set DDPM_DIST=single to run one process on purpose",
                    info.launcher_var.unwrap_or("DDPM_DIST=mpi")
                )));
            }
        }
    }
    Ok(Box::new(SingleProcess::new()))
}
