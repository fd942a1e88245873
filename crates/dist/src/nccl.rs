//! Device-memory all-reduce over NCCL, with a host communicator (MPI, or a single process) beside it.
//!
//! NCCL only moves device buffers and needs every rank to hold the same 128-byte unique id before the
//! communicator exists; rank 0 creates the id and the host communicator broadcasts it (no shared files).
//! Everything small or host-side (config hash, flags, start-up parameters) keeps going over the host
//! communicator; only gradient buckets go over NCCL.
//!
//! Watchdog: host collectives are watched by the host communicator. An NCCL all-reduce is followed by
//! a CUDA event on the same stream, polled until it completes or the collective deadline passes; then
//! the rank reports and ends the job (MPI_Abort; the process exit tears down the NCCL communicator and
//! its kernels, which is what `ncclCommAbort` would do). NCCL does not say which peers never joined,
//! so the report names the collective only. Cost: the host waits for each bucket's reduction (and the
//! work queued before it) instead of running ahead; not measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};
use cudarc::driver::CudaStream;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::error::{DistError, Result};
use crate::watchdog::{DistOptions, WATCHDOG_EXIT_CODE};
use crate::{select_cuda_ordinal, Communicator, DeviceCollectives};

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Device(format!("NCCL {what} failed: {e:?}"))
}

/// NCCL for gradients on this rank's GPU, `host` for everything else.
pub struct NcclCommunicator {
    host: Box<dyn Communicator>,
    device: Device,
    comm: Mutex<Comm>,
    /// The candle stream NCCL runs on, where the watchdog's events go.
    stream: Arc<CudaStream>,
    timeout: Duration,
    /// Device all-reduces so far, for the watchdog's report.
    seq: AtomicU64,
}

// SAFETY: the NCCL communicator handle is only used under the mutex, one call at a time, which is all
// NCCL requires; CUDA contexts and streams are already Send + Sync in cudarc.
unsafe impl Send for NcclCommunicator {}
unsafe impl Sync for NcclCommunicator {}

impl NcclCommunicator {
    /// Builds the NCCL communicator for `device` (a CUDA device), over the ranks of `host`. Collective.
    ///
    /// NCCL runs on the device's candle stream, so reductions are ordered after the kernels that
    /// produced the gradients and before those that consume them, without extra synchronisation.
    pub fn new(host: Box<dyn Communicator>, device: &Device) -> Result<Self> {
        let cuda = device
            .as_cuda_device()
            .map_err(|e| DistError::Device(format!("NCCL needs a CUDA device: {e}")))?;
        let stream = cuda.cuda_stream();
        let mut id_bytes: Vec<u8> = if host.rank() == 0 {
            let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e.0))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        host.broadcast_bytes(&mut id_bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            return Err(DistError::Device(format!(
                "NCCL unique id from rank 0 has {} bytes, expected {}",
                id_bytes.len(),
                internal.len()
            )));
        }
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        let ordinal = stream.context().ordinal();
        let comm = Comm::from_rank(
            stream.clone(),
            host.rank(),
            host.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| {
            nccl_err(
                &format!(
                    "ncclCommInitRank (rank {} of {}, local rank {} on CUDA device {}; two ranks on one \
                     GPU are refused)",
                    host.rank(),
                    host.world_size(),
                    host.local_rank(),
                    ordinal
                ),
                e.0,
            )
        })?;
        Ok(NcclCommunicator {
            host,
            device: device.clone(),
            comm: Mutex::new(comm),
            stream,
            timeout: DistOptions::default().timeout,
            seq: AtomicU64::new(0),
        })
    }

    /// The deadline of each device all-reduce (default: [`DistOptions::default`]'s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Waits until the work queued on the stream so far (the all-reduce just launched) is done;
    /// ends the job if that takes longer than the deadline.
    fn watch(&self, seq: u64) -> Result<()> {
        let event = self.stream.record_event(None).map_err(|e| {
            DistError::Device(format!("recording a CUDA event after ncclAllReduce: {e:?}"))
        })?;
        let start = Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(nccl_err(&format!("all_reduce_sum_in_place #{seq}"), e)),
            }
            if start.elapsed() >= self.timeout {
                crate::failure::line(&format!(
                    "rank {}: error: watchdog: collective nccl all_reduce_sum_in_place #{seq} did                      not complete within {} s (NCCL does not report which ranks did not arrive);                      ending the job",
                    self.rank(),
                    self.timeout.as_secs_f64()
                ));
                crate::failure::abort_world(WATCHDOG_EXIT_CODE);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn host(&self) -> &dyn Communicator {
        &*self.host
    }
}

/// In-place NCCL sum of a tensor's storage, as a candle in-place op (the only public way to get a
/// mutable view of a tensor's device buffer).
struct AllReduceSum<'a> {
    comm: &'a Comm,
}

impl InplaceOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("nccl-all-reduce-sum: tensor is on the CPU")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("nccl-all-reduce-sum: non-contiguous".into()))?;
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let mut view = slice.slice_mut(start..end);
        self.comm
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce failed: {:?}", e.0)))?;
        Ok(())
    }
}

impl DeviceCollectives for NcclCommunicator {
    fn supports(&self, device: &Device) -> bool {
        device.same_device(&self.device)
    }

    fn all_reduce_sum_in_place(&self, t: &Tensor) -> Result<()> {
        if t.dtype() != DType::F32 || !t.is_contiguous() || !self.supports(t.device()) {
            return Err(DistError::Device(format!(
                "NCCL all-reduce wants a contiguous f32 tensor on {:?}, got {:?} {:?} on {:?}",
                self.device.location(),
                t.dtype(),
                t.dims(),
                t.device().location()
            )));
        }
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        t.inplace_op1(&AllReduceSum { comm: &comm })?;
        self.watch(seq)
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn local_rank(&self) -> usize {
        self.host.local_rank()
    }
    fn local_size(&self) -> usize {
        self.host.local_size()
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.host.all_reduce_sum_f32(buf)
    }
    fn all_reduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.host.all_reduce_sum_f32_into(send, recv)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum_f64(buf)
    }
    fn all_reduce_max_u64(&self, buf: &mut [u64]) -> Result<()> {
        self.host.all_reduce_max_u64(buf)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.host.broadcast_bytes(buf, root)
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.host.broadcast_f32(buf, root)
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.host.all_gather_bytes(mine)
    }
    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.host.abort(code)
    }
    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        Some(self)
    }
}

/// [`crate::init`] plus this rank's GPU and an NCCL communicator on it.
///
/// The GPU is `local_rank` among the devices CUDA shows this process (see [`select_cuda_ordinal`]),
/// so `CUDA_VISIBLE_DEVICES` and `srun --gpus-per-task` are honoured. Collective.
pub fn init_cuda() -> Result<(Box<dyn Communicator>, Device)> {
    init_cuda_with(&DistOptions::default())
}

/// [`init_cuda`] with options: the collective deadline applies to host and device collectives.
pub fn init_cuda_with(opts: &DistOptions) -> Result<(Box<dyn Communicator>, Device)> {
    let host = crate::init_with(opts)?;
    let visible = cudarc::driver::CudaContext::device_count()
        .map_err(|e| DistError::Device(format!("counting CUDA devices: {e}")))?;
    let ordinal = select_cuda_ordinal(host.local_rank(), visible.max(0) as usize)?;
    let device = Device::new_cuda(ordinal)?;
    let comm = NcclCommunicator::new(host, &device)?.with_timeout(opts.timeout);
    Ok((Box::new(comm), device))
}
