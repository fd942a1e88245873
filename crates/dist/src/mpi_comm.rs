//! Host-memory collectives over MPI (rsmpi).

use std::sync::{Mutex, MutexGuard};
use std::thread::ThreadId;

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::{Threading, Universe};
use mpi::topology::Communicator as _;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::error::{DistError, Result};
use crate::launcher::LaunchInfo;
use crate::Communicator;

/// Elements per MPI call: counts are C ints, so larger buffers go in pieces.
const MAX_COUNT: usize = 1 << 30;

/// MPI_COMM_WORLD with the rank's place on its node.
///
/// MPI calls are serialized by a mutex, so the communicator may be shared between threads; MPI is
/// initialised with `MPI_THREAD_SERIALIZED`. If the library grants less, calls are only accepted from
/// the thread that initialised it, and others get an error instead of undefined behaviour.
pub struct MpiCommunicator {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    threading: Threading,
    init_thread: ThreadId,
    /// Serializes MPI calls; holds the scratch buffer in-place f32 reductions copy through.
    scratch: Mutex<Vec<f32>>,
    /// Declared last so it drops last: dropping it calls MPI_Finalize.
    _universe: Universe,
}

// SAFETY: the raw MPI handles inside are only used under `scratch`'s lock (or from the initialising
// thread when MPI granted less than MPI_THREAD_SERIALIZED, enforced by `guard`), which is exactly the
// MPI_THREAD_SERIALIZED contract.
unsafe impl Send for MpiCommunicator {}
unsafe impl Sync for MpiCommunicator {}

impl MpiCommunicator {
    /// Initialises MPI and reads the rank's place. Collective over MPI_COMM_WORLD.
    pub fn new(info: &LaunchInfo) -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| {
                DistError::Launch(
                    "MPI is already initialised in this process (ddpm_dist::init called twice?)"
                        .into(),
                )
            })?;
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        if let Some(n) = info.announced_world {
            if n != size {
                // A launcher variable inherited from an outer job, or a launcher/library mismatch
                // (e.g. mpirun of one MPI with a binary linked to another, giving N singletons).
                return Err(DistError::Launch(format!(
                    "the launcher announced {n} ranks but MPI reports a world of {size}; is the binary \
                     linked against the MPI library of the mpirun/srun that started it?"
                )));
            }
        }
        // Ranks sharing memory are the ranks of one node; this is the fallback for launchers that do
        // not export a local rank, and always gives the node's rank count.
        let node = world.split_shared(rank as i32);
        let local_size = node.size() as usize;
        let local_rank = match info.local_rank {
            Some((r, _)) => r,
            None => node.rank() as usize,
        };
        Ok(MpiCommunicator {
            world,
            rank,
            size,
            local_rank,
            local_size,
            threading,
            init_thread: std::thread::current().id(),
            scratch: Mutex::new(Vec::new()),
            _universe: universe,
        })
    }

    /// The thread support MPI granted.
    pub fn threading(&self) -> Threading {
        self.threading
    }

    fn guard(&self) -> Result<MutexGuard<'_, Vec<f32>>> {
        if self.threading < Threading::Serialized && std::thread::current().id() != self.init_thread
        {
            return Err(DistError::Launch(format!(
                "MPI granted thread support {:?}: collectives must run on the thread that called init()",
                self.threading
            )));
        }
        // A panic while holding the lock aborts the job (see failure.rs), so poisoning carries no
        // information worth refusing on.
        Ok(self.scratch.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn check_root(&self, root: usize) -> Result<()> {
        if root < self.size {
            Ok(())
        } else {
            Err(DistError::Launch(format!(
                "broadcast root {root} outside a world of {} ranks",
                self.size
            )))
        }
    }

    fn sum_into<T: Equivalence>(&self, send: &[T], recv: &mut [T]) {
        for (s, r) in send.chunks(MAX_COUNT).zip(recv.chunks_mut(MAX_COUNT)) {
            self.world.all_reduce_into(s, r, SystemOperation::sum());
        }
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn local_size(&self) -> usize {
        self.local_size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let mut scratch = self.guard()?;
        scratch.clear();
        scratch.extend_from_slice(buf);
        self.sum_into(&scratch, buf);
        Ok(())
    }

    fn all_reduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        assert_eq!(
            send.len(),
            recv.len(),
            "all_reduce_sum_f32_into: lengths differ"
        );
        let _g = self.guard()?;
        self.sum_into(send, recv);
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let _g = self.guard()?;
        let send = buf.to_vec();
        self.sum_into(&send, buf);
        Ok(())
    }

    fn all_reduce_max_u64(&self, buf: &mut [u64]) -> Result<()> {
        let _g = self.guard()?;
        let send = buf.to_vec();
        for (s, r) in send.chunks(MAX_COUNT).zip(buf.chunks_mut(MAX_COUNT)) {
            self.world.all_reduce_into(s, r, SystemOperation::max());
        }
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.check_root(root)?;
        let _g = self.guard()?;
        let proc = self.world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        proc.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        for chunk in buf.chunks_mut(MAX_COUNT) {
            proc.broadcast_into(chunk);
        }
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.check_root(root)?;
        let _g = self.guard()?;
        let proc = self.world.process_at_rank(root as i32);
        // Lengths are checked so that a mismatch is an error rather than a truncated message (which
        // MPI treats as fatal) or a rank left waiting.
        let mut lens = vec![0u64; self.size];
        self.world
            .all_gather_into(&(buf.len() as u64), &mut lens[..]);
        if let Some(bad) = lens.iter().position(|&l| l != lens[root]) {
            return Err(DistError::Mismatch(format!(
                "broadcast_f32: rank {root} has {} values but rank {bad} expects {}",
                lens[root], lens[bad]
            )));
        }
        for chunk in buf.chunks_mut(MAX_COUNT) {
            proc.broadcast_into(chunk);
        }
        Ok(())
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let _g = self.guard()?;
        let mut lens = vec![0u64; self.size];
        self.world
            .all_gather_into(&(mine.len() as u64), &mut lens[..]);
        let total: u64 = lens.iter().sum();
        if total > i32::MAX as u64 {
            return Err(DistError::TooLarge {
                what: "all_gather_bytes",
                len: total as usize,
                limit: i32::MAX as usize,
            });
        }
        let counts: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let mut all = vec![0u8; total as usize];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut part);
        }
        Ok(displs
            .iter()
            .zip(&counts)
            .map(|(&d, &c)| all[d as usize..(d + c) as usize].to_vec())
            .collect())
    }

    fn barrier(&self) -> Result<()> {
        let _g = self.guard()?;
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        // No lock: the job is ending, possibly while another thread sits in a collective.
        self.world.abort(code)
    }
}
