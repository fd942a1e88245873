//! Averaging the gradient set over ranks in a few large collectives.
//!
//! One all-reduce per parameter tensor would pay the collective's latency a few hundred times per step
//! (a U-Net has ~300 tensors, many tiny); one all-reduce of everything needs a second full copy of the
//! gradients. Buckets sit between: the gradients, taken in order and concatenated, are cut into pieces
//! of at most `bucket_bytes`; a tensor may straddle two buckets. Each bucket is reduced once (sum),
//! then divided by the world size.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Shape, Storage, Tensor};

use crate::error::{DistError, Result};
use crate::Communicator;

/// 25 MiB, PyTorch DDP's default: large enough that bandwidth dominates latency, small enough to keep
/// the extra memory modest.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// A piece of one tensor inside one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub tensor: usize,
    pub tensor_offset: usize,
    pub bucket_offset: usize,
    pub len: usize,
}

/// Where every element of the gradient set goes. Pure layout, the same on every rank for the same
/// shapes and bucket size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    shapes: Vec<Shape>,
    bucket_elems: usize,
    buckets: Vec<Vec<Segment>>,
    bucket_lens: Vec<usize>,
}

impl BucketPlan {
    pub fn new<S: Into<Shape>>(
        shapes: impl IntoIterator<Item = S>,
        bucket_bytes: usize,
    ) -> Result<Self> {
        let shapes: Vec<Shape> = shapes.into_iter().map(Into::into).collect();
        let bucket_elems = bucket_bytes / std::mem::size_of::<f32>();
        if bucket_elems == 0 {
            return Err(DistError::Gradient {
                index: 0,
                message: format!("bucket size {bucket_bytes} bytes holds no f32 value"),
            });
        }
        let mut buckets: Vec<Vec<Segment>> = Vec::new();
        let mut bucket_lens: Vec<usize> = Vec::new();
        for (tensor, shape) in shapes.iter().enumerate() {
            let mut done = 0;
            let n = shape.elem_count();
            while done < n {
                if bucket_lens.last().is_none_or(|&l| l == bucket_elems) {
                    buckets.push(Vec::new());
                    bucket_lens.push(0);
                }
                let used = *bucket_lens.last().unwrap();
                let len = (n - done).min(bucket_elems - used);
                buckets.last_mut().unwrap().push(Segment {
                    tensor,
                    tensor_offset: done,
                    bucket_offset: used,
                    len,
                });
                *bucket_lens.last_mut().unwrap() += len;
                done += len;
            }
        }
        Ok(BucketPlan {
            shapes,
            bucket_elems,
            buckets,
            bucket_lens,
        })
    }

    pub fn shapes(&self) -> &[Shape] {
        &self.shapes
    }
    pub fn num_buckets(&self) -> usize {
        self.buckets.len()
    }
    pub fn bucket_len(&self, i: usize) -> usize {
        self.bucket_lens[i]
    }
    pub fn segments(&self, i: usize) -> &[Segment] {
        &self.buckets[i]
    }
    pub fn total_elems(&self) -> usize {
        self.bucket_lens.iter().sum()
    }

    /// Bytes that identify the plan, for checking that all ranks use the same one.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend((self.bucket_elems as u64).to_le_bytes());
        for s in &self.shapes {
            out.extend((s.rank() as u64).to_le_bytes());
            for &d in s.dims() {
                out.extend((d as u64).to_le_bytes());
            }
        }
        out
    }
}

/// Time spent in the last [`GradientSync::all_reduce_mean`] call, split by phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncStats {
    /// Copying gradients into the bucket buffers (host) or concatenating them (device).
    pub pack: Duration,
    /// Inside the collectives.
    pub reduce: Duration,
    /// Dividing by the world size and building the output tensors.
    pub unpack: Duration,
    pub buckets: usize,
    pub elems: usize,
}

/// Bucketed mean of a gradient set over all ranks.
pub struct GradientSync {
    plan: BucketPlan,
    send: Vec<f32>,
    recv: Vec<f32>,
    stats: SyncStats,
}

impl GradientSync {
    /// For gradients of the given shapes, in the order they will be passed.
    pub fn new<S: Into<Shape>>(
        shapes: impl IntoIterator<Item = S>,
        bucket_bytes: usize,
    ) -> Result<Self> {
        Ok(GradientSync {
            plan: BucketPlan::new(shapes, bucket_bytes)?,
            send: Vec::new(),
            recv: Vec::new(),
            stats: SyncStats::default(),
        })
    }

    /// For gradients shaped like `params`, in the same order.
    pub fn from_tensors(params: &[Tensor], bucket_bytes: usize) -> Result<Self> {
        Self::new(params.iter().map(|t| t.shape().clone()), bucket_bytes)
    }

    pub fn plan(&self) -> &BucketPlan {
        &self.plan
    }

    pub fn last_stats(&self) -> SyncStats {
        self.stats
    }

    /// Errors (on every rank) unless all ranks built the same plan. Collective.
    pub fn verify_across_ranks(&self, comm: &dyn Communicator) -> Result<()> {
        crate::check_same_fingerprint(comm, "gradient bucket layout", &self.plan.fingerprint())
    }

    /// The mean over ranks of each gradient, as new tensors on the gradients' devices. Collective.
    ///
    /// All ranks must pass f32 gradients of the planned shapes (use zeros for a parameter without a
    /// gradient). With one rank the gradients come back unchanged.
    pub fn all_reduce_mean(
        &mut self,
        comm: &dyn Communicator,
        grads: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        self.reduce(comm, grads, false)
    }

    /// [`Self::all_reduce_mean`] that runs the collectives even with one rank, where the mean is the
    /// identity and `all_reduce_mean` skips them: a one-GPU self-test drives the real packing, NCCL call
    /// and unpacking this way (ddpm-gpu-selftest). Collective.
    pub fn all_reduce_mean_even_alone(
        &mut self,
        comm: &dyn Communicator,
        grads: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        self.reduce(comm, grads, true)
    }

    fn reduce(
        &mut self,
        comm: &dyn Communicator,
        grads: &[Tensor],
        even_alone: bool,
    ) -> Result<Vec<Tensor>> {
        self.validate(grads)?;
        self.stats = SyncStats {
            buckets: self.plan.num_buckets(),
            elems: self.plan.total_elems(),
            ..SyncStats::default()
        };
        if grads.is_empty() || (comm.world_size() == 1 && !even_alone) {
            return Ok(grads.to_vec());
        }
        let device = grads[0].device().clone();
        let same_device = grads.iter().all(|g| g.device().same_device(&device));
        if same_device {
            if let Some(dc) = comm.device_collectives() {
                if dc.supports(&device) {
                    return self.device_path(comm, dc, grads);
                }
            }
        }
        self.host_path(comm, grads)
    }

    fn validate(&self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.plan.shapes.len() {
            return Err(DistError::Gradient {
                index: grads.len().min(self.plan.shapes.len()),
                message: format!(
                    "got {} gradient tensors, the bucket plan has {}",
                    grads.len(),
                    self.plan.shapes.len()
                ),
            });
        }
        for (index, (g, s)) in grads.iter().zip(&self.plan.shapes).enumerate() {
            if g.shape() != s {
                return Err(DistError::Gradient {
                    index,
                    message: format!("shape {:?}, planned {:?}", g.dims(), s.dims()),
                });
            }
            if g.dtype() != DType::F32 {
                return Err(DistError::Gradient {
                    index,
                    message: format!("dtype {:?}, only f32 gradients are averaged", g.dtype()),
                });
            }
        }
        Ok(())
    }

    fn host_path(&mut self, comm: &dyn Communicator, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        let t0 = Instant::now();
        // Contiguous CPU tensors are read in place; anything else is copied once.
        let host: Vec<Tensor> = grads
            .iter()
            .map(|g| {
                if g.device().is_cpu() && g.is_contiguous() {
                    Ok(g.clone())
                } else {
                    g.to_device(&Device::Cpu)?.contiguous()
                }
            })
            .collect::<candle_core::Result<_>>()?;
        let guards: Vec<_> = host.iter().map(|t| t.storage_and_layout()).collect();
        let mut srcs: Vec<&[f32]> = Vec::with_capacity(guards.len());
        for (storage, layout) in &guards {
            let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
            match &**storage {
                Storage::Cpu(cpu) => srcs.push(&cpu.as_slice::<f32>()?[start..end]),
                _ => unreachable!("moved to the CPU above"),
            }
        }
        let max_len = (0..self.plan.num_buckets())
            .map(|b| self.plan.bucket_len(b))
            .max()
            .unwrap_or(0);
        self.send.resize(max_len, 0.0);
        self.recv.resize(max_len, 0.0);
        // A tensor's segments come in order of offset across buckets, so outputs grow by appending
        // (no zero-fill of memory that is about to be overwritten).
        let mut outs: Vec<Vec<f32>> = self
            .plan
            .shapes
            .iter()
            .map(|s| Vec::with_capacity(s.elem_count()))
            .collect();
        let world = comm.world_size() as f32;
        let mut pack = t0.elapsed();
        let mut reduce = Duration::ZERO;
        let mut unpack = Duration::ZERO;
        for b in 0..self.plan.num_buckets() {
            let t = Instant::now();
            let len = self.plan.bucket_len(b);
            let segs = &self.plan.buckets[b];
            // A bucket that is one piece of one tensor is reduced straight from the gradient.
            let send: &[f32] = if let [s] = segs.as_slice() {
                &srcs[s.tensor][s.tensor_offset..s.tensor_offset + s.len]
            } else {
                for s in segs {
                    self.send[s.bucket_offset..s.bucket_offset + s.len]
                        .copy_from_slice(&srcs[s.tensor][s.tensor_offset..s.tensor_offset + s.len]);
                }
                &self.send[..len]
            };
            let t1 = Instant::now();
            pack += t1 - t;
            comm.all_reduce_sum_f32_into(send, &mut self.recv[..len])?;
            let t2 = Instant::now();
            reduce += t2 - t1;
            for s in segs {
                debug_assert_eq!(outs[s.tensor].len(), s.tensor_offset);
                let src = &self.recv[s.bucket_offset..s.bucket_offset + s.len];
                outs[s.tensor].extend(src.iter().map(|x| x / world));
            }
            unpack += t2.elapsed();
        }
        drop(srcs);
        drop(guards);
        let t = Instant::now();
        let out = outs
            .into_iter()
            .zip(grads)
            .map(|(v, g)| Tensor::from_vec(v, g.shape(), g.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        unpack += t.elapsed();
        self.stats.pack = pack;
        self.stats.reduce = reduce;
        self.stats.unpack = unpack;
        Ok(out)
    }

    fn device_path(
        &mut self,
        comm: &dyn Communicator,
        dc: &dyn crate::DeviceCollectives,
        grads: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        let world = comm.world_size() as f64;
        let flat: Vec<Tensor> = grads
            .iter()
            .map(|g| g.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let mut pieces: Vec<Vec<Tensor>> = vec![Vec::new(); grads.len()];
        let (mut pack, mut reduce, mut unpack) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for b in 0..self.plan.num_buckets() {
            let t = Instant::now();
            let segs = &self.plan.buckets[b];
            let parts: Vec<Tensor> = segs
                .iter()
                .map(|s| flat[s.tensor].narrow(0, s.tensor_offset, s.len))
                .collect::<candle_core::Result<_>>()?;
            // A fresh buffer: the in-place reduction must not write into a gradient's own storage.
            let bucket = if parts.len() == 1 {
                parts[0].copy()?
            } else {
                Tensor::cat(&parts, 0)?
            };
            let t1 = Instant::now();
            pack += t1 - t;
            dc.all_reduce_sum_in_place(&bucket)?;
            let t2 = Instant::now();
            reduce += t2 - t1;
            let bucket = (bucket / world)?;
            for s in segs {
                pieces[s.tensor].push(bucket.narrow(0, s.bucket_offset, s.len)?);
            }
            unpack += t2.elapsed();
        }
        let t = Instant::now();
        let out = pieces
            .into_iter()
            .zip(grads)
            .map(|(p, g)| {
                let flat = if p.len() == 1 {
                    p.into_iter().next().unwrap()
                } else {
                    Tensor::cat(&p, 0)?
                };
                flat.reshape(g.shape())
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        unpack += t.elapsed();
        // Device work is asynchronous: these times are launch times unless the caller synchronizes.
        self.stats.pack = pack;
        self.stats.reduce = reduce;
        self.stats.unpack = unpack;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_every_element_once_in_order() {
        let shapes: Vec<Vec<usize>> = vec![vec![3, 5], vec![7], vec![1], vec![4, 4, 2], vec![11]];
        // 10 f32 per bucket: tensors straddle buckets.
        let plan = BucketPlan::new(shapes.clone(), 40).unwrap();
        let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        assert_eq!(plan.total_elems(), total);
        assert_eq!(plan.num_buckets(), total.div_ceil(10));
        let mut next = vec![0usize; shapes.len()];
        let mut flat_pos = 0;
        for b in 0..plan.num_buckets() {
            let mut off = 0;
            for s in plan.segments(b) {
                assert_eq!(s.bucket_offset, off);
                assert_eq!(s.tensor_offset, next[s.tensor]);
                next[s.tensor] += s.len;
                off += s.len;
                flat_pos += s.len;
            }
            assert_eq!(off, plan.bucket_len(b));
            assert!(plan.bucket_len(b) <= 10);
        }
        assert_eq!(flat_pos, total);
        for (n, s) in next.iter().zip(&shapes) {
            assert_eq!(*n, s.iter().product::<usize>());
        }
    }

    #[test]
    fn zero_bucket_is_an_error_and_fingerprint_tracks_shapes() {
        assert!(BucketPlan::new(vec![vec![2usize]], 3).is_err());
        let a = BucketPlan::new(vec![vec![2usize, 3]], 1024).unwrap();
        let b = BucketPlan::new(vec![vec![3usize, 2]], 1024).unwrap();
        let c = BucketPlan::new(vec![vec![2usize, 3]], 2048).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
    }

    #[test]
    fn single_rank_returns_gradients_unchanged_and_validates() {
        let comm = crate::SingleProcess::new();
        let g = vec![
            Tensor::arange(0f32, 6.0, &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
            Tensor::new(&[1.5f32], &Device::Cpu).unwrap(),
        ];
        let mut sync = GradientSync::from_tensors(&g, DEFAULT_BUCKET_BYTES).unwrap();
        let out = sync.all_reduce_mean(&comm, &g).unwrap();
        assert_eq!(
            out[0].to_vec2::<f32>().unwrap(),
            g[0].to_vec2::<f32>().unwrap()
        );
        let e = sync
            .all_reduce_mean(&comm, &g[..1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("got 1 gradient tensors"), "{e}");
        let wrong = vec![g[0].t().unwrap(), g[1].clone()];
        let e = sync.all_reduce_mean(&comm, &wrong).unwrap_err().to_string();
        assert!(e.contains("gradient 0") && e.contains("shape"), "{e}");
        let f64s = vec![g[0].to_dtype(DType::F64).unwrap(), g[1].clone()];
        let e = sync.all_reduce_mean(&comm, &f64s).unwrap_err().to_string();
        assert!(e.contains("dtype"), "{e}");
    }

    /// One rank that counts the reductions it is asked for (with a SingleProcess's identity result).
    struct Counting(crate::SingleProcess, std::sync::atomic::AtomicUsize);

    impl crate::Communicator for Counting {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            1
        }
        fn local_rank(&self) -> usize {
            0
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.all_reduce_sum_f32(buf)
        }
        fn all_reduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.all_reduce_sum_f32_into(send, recv)
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            self.0.all_reduce_sum_f64(buf)
        }
        fn all_reduce_max_u64(&self, buf: &mut [u64]) -> Result<()> {
            self.0.all_reduce_max_u64(buf)
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
            self.0.broadcast_bytes(buf, root)
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            self.0.all_gather_bytes(mine)
        }
        fn barrier(&self) -> Result<()> {
            self.0.barrier()
        }
        fn abort(&self, code: i32) -> ! {
            self.0.abort(code)
        }
        fn backend(&self) -> &'static str {
            "counting"
        }
    }

    #[test]
    fn even_alone_runs_the_buckets_and_returns_the_same_values() {
        let comm = Counting(crate::SingleProcess::new(), Default::default());
        let calls = || comm.1.load(std::sync::atomic::Ordering::SeqCst);
        let g = vec![
            Tensor::arange(0f32, 15.0, &Device::Cpu)
                .unwrap()
                .reshape((3, 5))
                .unwrap(),
            Tensor::new(&[1.5f32, -2.25], &Device::Cpu).unwrap(),
        ];
        // 4 floats per bucket: both tensors straddle buckets.
        let mut sync = GradientSync::from_tensors(&g, 16).unwrap();
        sync.all_reduce_mean(&comm, &g).unwrap();
        assert_eq!(
            calls(),
            0,
            "one rank: all_reduce_mean skips the collectives"
        );
        let out = sync.all_reduce_mean_even_alone(&comm, &g).unwrap();
        assert_eq!(calls(), 5, "one collective per bucket");
        for (o, g) in out.iter().zip(&g) {
            assert_eq!(o.dims(), g.dims());
            assert_eq!(
                o.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}
