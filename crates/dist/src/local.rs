//! An in-process world: N ranks as N threads of one process.
//!
//! For tests that want several ranks without mpirun (and for checking collective logic quickly). Every
//! collective is built on one all-gather, and reductions add the ranks' values in rank order, so every
//! rank gets bit-identical results, as with MPI.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::{DistError, Result};
use crate::Communicator;

struct State {
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    generation: u64,
    result: Arc<Vec<Vec<u8>>>,
    readers_left: usize,
}

struct Shared {
    n: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank of a [`LocalComm::group`].
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalComm {
    /// `n` communicators forming one world; give one to each thread.
    pub fn group(n: usize) -> Vec<LocalComm> {
        assert!(n > 0, "a world needs at least one rank");
        let shared = Arc::new(Shared {
            n,
            state: Mutex::new(State {
                slots: vec![None; n],
                arrived: 0,
                generation: 0,
                result: Arc::new(Vec::new()),
                readers_left: 0,
            }),
            cv: Condvar::new(),
        });
        (0..n)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn gather(&self, mine: Vec<u8>) -> Arc<Vec<Vec<u8>>> {
        let sh = &*self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        // Wait until every rank has read the previous round's result.
        while st.readers_left > 0 {
            st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.slots[self.rank] = Some(mine);
        st.arrived += 1;
        let gen = st.generation;
        if st.arrived == sh.n {
            let all = st.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            st.result = Arc::new(all);
            st.arrived = 0;
            st.readers_left = sh.n;
            st.generation += 1;
            sh.cv.notify_all();
        } else {
            while st.generation == gen {
                st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        let res = st.result.clone();
        st.readers_left -= 1;
        if st.readers_left == 0 {
            sh.cv.notify_all();
        }
        res
    }

    fn reduce<T: Copy, const N: usize>(
        &self,
        buf: &mut [T],
        to: fn(T) -> [u8; N],
        from: fn([u8; N]) -> T,
        op: fn(T, T) -> T,
    ) -> Result<()> {
        let all = self.gather(buf.iter().flat_map(|&x| to(x)).collect());
        if let Some(r) = all.iter().position(|v| v.len() != buf.len() * N) {
            return Err(DistError::Mismatch(format!(
                "all-reduce of {} values on rank {} but rank {r} passed {}",
                buf.len(),
                self.rank,
                all[r].len() / N
            )));
        }
        for (i, x) in buf.iter_mut().enumerate() {
            let at = |r: usize| from(all[r][i * N..(i + 1) * N].try_into().unwrap());
            let mut acc = at(0);
            for r in 1..all.len() {
                acc = op(acc, at(r));
            }
            *x = acc;
        }
        Ok(())
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.n
    }
    fn local_rank(&self) -> usize {
        self.rank
    }
    fn local_size(&self) -> usize {
        self.shared.n
    }
    fn backend(&self) -> &'static str {
        "local"
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.reduce(buf, f32::to_le_bytes, f32::from_le_bytes, |a, b| a + b)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce(buf, f64::to_le_bytes, f64::from_le_bytes, |a, b| a + b)
    }
    fn all_reduce_max_u64(&self, buf: &mut [u64]) -> Result<()> {
        self.reduce(buf, u64::to_le_bytes, u64::from_le_bytes, u64::max)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.shared.n {
            return Err(DistError::Launch(format!(
                "broadcast root {root} outside a world of {} ranks",
                self.shared.n
            )));
        }
        let all = self.gather(buf.clone());
        buf.clone_from(&all[root]);
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(self.gather(mine.to_vec()).as_ref().clone())
    }
    fn barrier(&self) -> Result<()> {
        self.gather(Vec::new());
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{any_non_finite, broadcast_tensors, check_same_config, GradientSync};
    use candle_core::{Device, Tensor};

    /// Runs `f` on every rank of an `n`-rank local world and returns the results by rank.
    fn run<T: Send>(n: usize, f: impl Fn(&LocalComm) -> T + Sync) -> Vec<T> {
        let comms = LocalComm::group(n);
        std::thread::scope(|s| {
            let hs: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Deterministic pseudo-random values for (rank, tensor, element), of varied magnitude.
    fn value(rank: usize, tensor: usize, i: usize) -> f32 {
        let mut z = ((rank as u64) << 40) ^ ((tensor as u64) << 24) ^ (i as u64);
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
    }

    #[test]
    fn gradient_mean_matches_serial_mean_across_bucket_sizes() {
        let shapes: Vec<Vec<usize>> = vec![vec![3, 3, 7], vec![13], vec![1], vec![5, 2], vec![29]];
        for n in [2usize, 3] {
            for bucket_bytes in [4usize, 20, 64, 1 << 20] {
                let outs = run(n, |c| {
                    let grads: Vec<Tensor> = shapes
                        .iter()
                        .enumerate()
                        .map(|(ti, s)| {
                            let len: usize = s.iter().product();
                            let v: Vec<f32> = (0..len).map(|i| value(c.rank(), ti, i)).collect();
                            Tensor::from_vec(v, s.as_slice(), &Device::Cpu).unwrap()
                        })
                        .collect();
                    let mut sync = GradientSync::from_tensors(&grads, bucket_bytes).unwrap();
                    sync.verify_across_ranks(c).unwrap();
                    let out = sync.all_reduce_mean(c, &grads).unwrap();
                    assert_eq!(sync.last_stats().buckets, sync.plan().num_buckets());
                    out.iter()
                        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                        .collect::<Vec<_>>()
                });
                for (ti, s) in shapes.iter().enumerate() {
                    let len: usize = s.iter().product();
                    for i in 0..len {
                        let mut sum = 0f32;
                        for r in 0..n {
                            sum += value(r, ti, i);
                        }
                        let want = sum / n as f32;
                        for out in &outs {
                            assert_eq!(
                                out[ti][i], want,
                                "n={n} bucket={bucket_bytes} t={ti} i={i}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A LocalComm whose "device collectives" run on CPU tensors, so GradientSync's device path (the
    /// one NCCL takes: concatenate, reduce in place, divide, split, reshape) runs without a GPU.
    struct CpuDevice(LocalComm);

    struct InPlaceSum<'a>(&'a LocalComm);

    impl candle_core::InplaceOp1 for InPlaceSum<'_> {
        fn name(&self) -> &'static str {
            "test-in-place-sum"
        }
        fn cpu_fwd(
            &self,
            s: &mut candle_core::CpuStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            let (a, b) = l.contiguous_offsets().unwrap();
            match s {
                candle_core::CpuStorage::F32(v) => self.0.all_reduce_sum_f32(&mut v[a..b]).unwrap(),
                _ => candle_core::bail!("f32 only"),
            }
            Ok(())
        }
    }

    impl crate::DeviceCollectives for CpuDevice {
        fn supports(&self, d: &Device) -> bool {
            d.is_cpu()
        }
        fn all_reduce_sum_in_place(&self, t: &Tensor) -> Result<()> {
            Ok(t.inplace_op1(&InPlaceSum(&self.0))?)
        }
    }

    impl Communicator for CpuDevice {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world_size(&self) -> usize {
            self.0.world_size()
        }
        fn local_rank(&self) -> usize {
            self.0.local_rank()
        }
        fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
            panic!("the device path must not use host all-reduce")
        }
        fn all_reduce_sum_f64(&self, b: &mut [f64]) -> Result<()> {
            self.0.all_reduce_sum_f64(b)
        }
        fn all_reduce_max_u64(&self, b: &mut [u64]) -> Result<()> {
            self.0.all_reduce_max_u64(b)
        }
        fn broadcast_bytes(&self, b: &mut Vec<u8>, root: usize) -> Result<()> {
            self.0.broadcast_bytes(b, root)
        }
        fn all_gather_bytes(&self, m: &[u8]) -> Result<Vec<Vec<u8>>> {
            self.0.all_gather_bytes(m)
        }
        fn barrier(&self) -> Result<()> {
            self.0.barrier()
        }
        fn abort(&self, code: i32) -> ! {
            self.0.abort(code)
        }
        fn backend(&self) -> &'static str {
            "test-device"
        }
        fn all_reduce_sum_f32_into(&self, _: &[f32], _: &mut [f32]) -> Result<()> {
            panic!("the device path must not use host all-reduce")
        }
        fn device_collectives(&self) -> Option<&dyn crate::DeviceCollectives> {
            Some(self)
        }
    }

    #[test]
    fn device_path_matches_serial_mean_and_leaves_gradients_alone() {
        let shapes: Vec<Vec<usize>> = vec![vec![3, 3, 7], vec![13], vec![1], vec![5, 2], vec![29]];
        for bucket_bytes in [4usize, 20, 64, 1 << 20] {
            let comms = LocalComm::group(2);
            let outs: Vec<_> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .map(|c| {
                        let shapes = &shapes;
                        s.spawn(move || {
                            let c = CpuDevice(c);
                            let grads: Vec<Tensor> = shapes
                                .iter()
                                .enumerate()
                                .map(|(ti, sh)| {
                                    let len: usize = sh.iter().product();
                                    let v: Vec<f32> =
                                        (0..len).map(|i| value(c.rank(), ti, i)).collect();
                                    Tensor::from_vec(v, sh.as_slice(), &Device::Cpu).unwrap()
                                })
                                .collect();
                            let before: Vec<Vec<f32>> = grads
                                .iter()
                                .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
                                .collect();
                            let mut sync =
                                GradientSync::from_tensors(&grads, bucket_bytes).unwrap();
                            let out = sync.all_reduce_mean(&c, &grads).unwrap();
                            for (g, b) in grads.iter().zip(&before) {
                                assert_eq!(&g.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b);
                            }
                            for (o, g) in out.iter().zip(&grads) {
                                assert_eq!(o.dims(), g.dims());
                            }
                            out.iter()
                                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (ti, sh) in shapes.iter().enumerate() {
                for i in 0..sh.iter().product::<usize>() {
                    let want = (value(0, ti, i) + value(1, ti, i)) / 2.0;
                    for out in &outs {
                        assert_eq!(out[ti][i], want, "bucket={bucket_bytes} t={ti} i={i}");
                    }
                }
            }
        }
    }

    #[test]
    fn config_mismatch_names_the_ranks_on_every_rank() {
        let res = run(3, |c| {
            let h = if c.rank() == 2 { [9u8; 32] } else { [1u8; 32] };
            check_same_config(c, &h).map_err(|e| (e.is_collective(), e.to_string()))
        });
        for r in res {
            let (collective, msg) = r.unwrap_err();
            assert!(collective);
            assert!(msg.contains("rank(s) 2 differ from rank 0"), "{msg}");
            assert!(msg.contains("rank(s) 0,1: 0101"), "{msg}");
            assert!(msg.contains("rank(s) 2: 0909"), "{msg}");
        }
        let ok = run(2, |c| check_same_config(c, &7u64.to_le_bytes()).is_ok());
        assert_eq!(ok, vec![true, true]);
    }

    #[test]
    fn broadcast_and_flags() {
        let res = run(2, |c| {
            let t = Tensor::new(&[c.rank() as f32 + 0.25, 2.0], &Device::Cpu).unwrap();
            let d = Tensor::new(&[c.rank() as f64 * 3.0], &Device::Cpu).unwrap();
            let out = broadcast_tensors(c, &[t, d], 1).unwrap();
            let nf = any_non_finite(c, c.rank() == 0).unwrap();
            let none = any_non_finite(c, false).unwrap();
            (
                out[0].to_vec1::<f32>().unwrap(),
                out[1].to_vec1::<f64>().unwrap(),
                nf,
                none,
            )
        });
        for (a, b, nf, none) in res {
            assert_eq!(a, vec![1.25, 2.0]);
            assert_eq!(b, vec![3.0]);
            assert!(nf);
            assert!(!none);
        }
        let shapes = run(2, |c| {
            let t = Tensor::zeros(c.rank() + 1, candle_core::DType::F32, &Device::Cpu).unwrap();
            broadcast_tensors(c, &[t], 0)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        });
        for m in shapes {
            assert!(m.contains("parameter shapes"), "{m}");
            assert!(
                m.contains("first difference at tensor 0: rank 0 F32[1], rank 1 F32[2]"),
                "{m}"
            );
        }
    }
}
