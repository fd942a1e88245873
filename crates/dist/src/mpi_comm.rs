//! Host-memory collectives over MPI (rsmpi), each under the watchdog's deadline (see `watchdog.rs`).
//!
//! Every collective runs as its non-blocking MPI variant and is polled with `MPI_Test` by the calling
//! thread: spinning (with `yield_now`) until the rank announces itself, then with 1 ms sleeps. Open
//! MPI's blocking collectives spin too; the non-blocking ones use its libnbc algorithms, which may be
//! slower than the tuned blocking ones for large buffers (not measured here).

use std::sync::{Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::{Threading, Universe};
use mpi::request::{Request, Scope};
use mpi::topology::Communicator as _;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::error::{DistError, Result};
use crate::launcher::LaunchInfo;
use crate::watchdog::{DistOptions, Watch, WATCHDOG_EXIT_CODE};
use crate::Communicator;

/// Elements per MPI call: counts are C ints, so larger buffers go in pieces.
const MAX_COUNT: usize = 1 << 30;

/// Watchdog messages on the side communicator: "I wait in collective #seq" and "the deadline of
/// collective #seq passed here".
const TAG_ARRIVED: i32 = 1;
const TAG_EXPIRED: i32 = 2;

/// How long the rank whose deadline passed first waits before MPI_Abort, so that the peers it told
/// can print their own view first.
const EXPIRY_GRACE: Duration = Duration::from_millis(1500);

/// An 8-byte watchdog message in flight; the box keeps its buffer in place until MPI is done with it.
struct Pending {
    request: mpi::ffi::MPI_Request,
    _payload: Box<u64>,
}

/// Everything the MPI lock protects.
struct Lane {
    /// Scratch buffer in-place f32 reductions copy through.
    scratch: Vec<f32>,
    watch: Watch,
    sends: Vec<Pending>,
}

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
    /// A duplicate of `world` that carries only watchdog messages, so they never match a collective.
    side: SimpleCommunicator,
    /// Serializes MPI calls.
    lane: Mutex<Lane>,
    /// Declared last so it drops last: dropping it calls MPI_Finalize.
    _universe: Universe,
}

// SAFETY: the raw MPI handles inside are only used under `lane`'s lock (or from the initialising
// thread when MPI granted less than MPI_THREAD_SERIALIZED, enforced by `guard`), which is exactly the
// MPI_THREAD_SERIALIZED contract.
unsafe impl Send for MpiCommunicator {}
unsafe impl Sync for MpiCommunicator {}

impl MpiCommunicator {
    /// Initialises MPI and reads the rank's place. Collective over MPI_COMM_WORLD.
    pub fn new(info: &LaunchInfo, opts: &DistOptions) -> Result<Self> {
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
        let side = world.duplicate();
        Ok(MpiCommunicator {
            world,
            rank,
            size,
            local_rank,
            local_size,
            threading,
            init_thread: std::thread::current().id(),
            side,
            lane: Mutex::new(Lane {
                scratch: Vec::new(),
                watch: Watch::new(rank, size, opts.timeout),
                sends: Vec::new(),
            }),
            _universe: universe,
        })
    }

    /// The thread support MPI granted.
    pub fn threading(&self) -> Threading {
        self.threading
    }

    /// The MPI lock, with the watchdog started on collective `name`.
    fn guard(&self, name: &'static str) -> Result<MutexGuard<'_, Lane>> {
        if self.threading < Threading::Serialized && std::thread::current().id() != self.init_thread
        {
            return Err(DistError::Launch(format!(
                "MPI granted thread support {:?}: collectives must run on the thread that called init()",
                self.threading
            )));
        }
        // A panic while holding the lock aborts the job (see failure.rs), so poisoning carries no
        // information worth refusing on.
        let mut lane = self.lane.lock().unwrap_or_else(|e| e.into_inner());
        lane.watch.begin(name);
        Ok(lane)
    }

    /// Polls `req` until it completes; ends the job if the current collective's deadline passes.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, lane: &mut Lane, mut req: Request<'a, D, S>) {
        let mut last_poll = lane.watch.started;
        loop {
            req = match req.test() {
                Ok(_) => return,
                Err(r) => r,
            };
            let now = std::time::Instant::now();
            let waited = now - lane.watch.started;
            if now - last_poll >= Duration::from_millis(1) {
                last_poll = now;
                self.poll_side(lane);
            }
            if waited < lane.watch.announce_after {
                std::thread::yield_now();
                continue;
            }
            if !lane.watch.announced {
                lane.watch.announced = true;
                let seq = lane.watch.seq;
                for peer in (0..self.size).filter(|&p| p != self.rank) {
                    self.post(lane, peer, TAG_ARRIVED, seq);
                }
            }
            if waited >= lane.watch.timeout {
                self.expire(lane);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends one watchdog message without waiting for the peer (which may be stopped).
    fn post(&self, lane: &mut Lane, peer: usize, tag: i32, value: u64) {
        let payload = Box::new(value);
        let mut request = std::mem::MaybeUninit::<mpi::ffi::MPI_Request>::uninit();
        // SAFETY: the buffer is one u64 that the box keeps at a fixed address until the request
        // completes (`Pending` owns both; pending requests are only dropped once tested complete, or
        // when the process ends); `side` is a valid communicator and `peer` a rank of it.
        unsafe {
            mpi::ffi::MPI_Isend(
                (&*payload as *const u64).cast(),
                1,
                u64::equivalent_datatype().as_raw(),
                peer as i32,
                tag,
                self.side.as_raw(),
                request.as_mut_ptr(),
            );
            lane.sends.push(Pending {
                request: request.assume_init(),
                _payload: payload,
            });
        }
    }

    /// Reads the watchdog messages that have arrived, and retires completed sends.
    fn poll_side(&self, lane: &mut Lane) {
        lane.sends.retain_mut(|p| {
            let mut flag = 0;
            // SAFETY: `p.request` is an active request from MPI_Isend; MPI_Test sets it to
            // MPI_REQUEST_NULL once complete, after which it is dropped here.
            unsafe {
                mpi::ffi::MPI_Test(&mut p.request, &mut flag, mpi::ffi::RSMPI_STATUS_IGNORE);
            }
            flag == 0
        });
        while let Some((msg, status)) = self.side.any_process().immediate_matched_probe() {
            let mut value = 0u64;
            msg.matched_receive_into(&mut value);
            let from = status.source_rank() as usize;
            match status.tag() {
                TAG_ARRIVED => lane.watch.saw(from, value),
                TAG_EXPIRED if value == lane.watch.seq => {
                    crate::failure::line(&format!(
                        "rank {}: error: {}",
                        self.rank,
                        lane.watch.expiry_message(Some(from))
                    ));
                    crate::failure::abort_world(WATCHDOG_EXIT_CODE);
                }
                _ => {}
            }
        }
    }

    /// The deadline passed: report, tell the peers seen waiting so they report too, end the job.
    fn expire(&self, lane: &mut Lane) -> ! {
        self.poll_side(lane);
        crate::failure::line(&format!(
            "rank {}: error: {}",
            self.rank,
            lane.watch.expiry_message(None)
        ));
        let seq = lane.watch.seq;
        let waiting: Vec<usize> = (0..self.size)
            .filter(|&p| p != self.rank && lane.watch.seen[p] >= seq)
            .collect();
        for peer in waiting {
            self.post(lane, peer, TAG_EXPIRED, seq);
        }
        let t = std::time::Instant::now();
        while t.elapsed() < EXPIRY_GRACE {
            self.poll_side(lane);
            std::thread::sleep(Duration::from_millis(10));
        }
        crate::failure::abort_world(WATCHDOG_EXIT_CODE)
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

    /// Element-wise `op` over ranks of `send` into `recv`, in pieces of at most MAX_COUNT.
    fn reduce_into<T: Equivalence>(
        &self,
        lane: &mut Lane,
        send: &[T],
        recv: &mut [T],
        op: SystemOperation,
    ) {
        for (s, r) in send.chunks(MAX_COUNT).zip(recv.chunks_mut(MAX_COUNT)) {
            mpi::request::scope(|scope| {
                let req = self.world.immediate_all_reduce_into(scope, s, r, op);
                self.wait(lane, req);
            });
        }
    }

    fn broadcast_into<B: BufferMut + ?Sized>(&self, lane: &mut Lane, root: usize, buf: &mut B) {
        let proc = self.world.process_at_rank(root as i32);
        mpi::request::scope(|scope| {
            let req = proc.immediate_broadcast_into(scope, buf);
            self.wait(lane, req);
        });
    }

    fn gather_lens(&self, lane: &mut Lane, mine: usize) -> Vec<u64> {
        let mut lens = vec![0u64; self.size];
        let mine = mine as u64;
        mpi::request::scope(|scope| {
            let req = self
                .world
                .immediate_all_gather_into(scope, &mine, &mut lens[..]);
            self.wait(lane, req);
        });
        lens
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
        let mut guard = self.guard("all_reduce_sum_f32")?;
        let lane = &mut *guard;
        let mut scratch = std::mem::take(&mut lane.scratch);
        scratch.clear();
        scratch.extend_from_slice(buf);
        self.reduce_into(lane, &scratch, buf, SystemOperation::sum());
        lane.scratch = scratch;
        Ok(())
    }

    fn all_reduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        assert_eq!(
            send.len(),
            recv.len(),
            "all_reduce_sum_f32_into: lengths differ"
        );
        let mut lane = self.guard("all_reduce_sum_f32_into")?;
        self.reduce_into(&mut lane, send, recv, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let mut lane = self.guard("all_reduce_sum_f64")?;
        let send = buf.to_vec();
        self.reduce_into(&mut lane, &send, buf, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_max_u64(&self, buf: &mut [u64]) -> Result<()> {
        let mut lane = self.guard("all_reduce_max_u64")?;
        let send = buf.to_vec();
        self.reduce_into(&mut lane, &send, buf, SystemOperation::max());
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.check_root(root)?;
        let mut lane = self.guard("broadcast_bytes")?;
        let mut len = buf.len() as u64;
        self.broadcast_into(&mut lane, root, &mut len);
        buf.resize(len as usize, 0);
        for chunk in buf.chunks_mut(MAX_COUNT) {
            self.broadcast_into(&mut lane, root, chunk);
        }
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.check_root(root)?;
        let mut lane = self.guard("broadcast_f32")?;
        // Lengths are checked so that a mismatch is an error rather than a truncated message (which
        // MPI treats as fatal) or a rank left waiting.
        let lens = self.gather_lens(&mut lane, buf.len());
        if let Some(bad) = lens.iter().position(|&l| l != lens[root]) {
            return Err(DistError::Mismatch(format!(
                "broadcast_f32: rank {root} has {} values but rank {bad} expects {}",
                lens[root], lens[bad]
            )));
        }
        for chunk in buf.chunks_mut(MAX_COUNT) {
            self.broadcast_into(&mut lane, root, chunk);
        }
        Ok(())
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut lane = self.guard("all_gather_bytes")?;
        let lens = self.gather_lens(&mut lane, mine.len());
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
            mpi::request::scope(|scope| {
                let req = self
                    .world
                    .immediate_all_gather_varcount_into(scope, mine, &mut part);
                self.wait(&mut lane, req);
            });
        }
        Ok(displs
            .iter()
            .zip(&counts)
            .map(|(&d, &c)| all[d as usize..(d + c) as usize].to_vec())
            .collect())
    }

    fn barrier(&self) -> Result<()> {
        let mut lane = self.guard("barrier")?;
        let req = self.world.immediate_barrier();
        self.wait(&mut lane, req);
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        // No lock: the job is ending, possibly while another thread sits in a collective.
        self.world.abort(code)
    }
}

impl Drop for MpiCommunicator {
    /// Reads the watchdog messages still queued and completes the sends, so MPI_Finalize finds no
    /// pending requests. Every send is 8 bytes to a peer that reached the same collective, so it
    /// completes without the peer's help.
    fn drop(&mut self) {
        let lane = self.lane.get_mut().unwrap_or_else(|e| e.into_inner());
        while let Some((msg, _)) = self.side.any_process().immediate_matched_probe() {
            let mut value = 0u64;
            msg.matched_receive_into(&mut value);
        }
        for p in &mut lane.sends {
            // SAFETY: an active request from MPI_Isend whose buffer `p` still owns.
            unsafe {
                mpi::ffi::MPI_Wait(&mut p.request, mpi::ffi::RSMPI_STATUS_IGNORE);
            }
        }
    }
}
