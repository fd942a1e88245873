//! A deadline on every collective, so a stalled rank ends the job instead of hanging it.
//!
//! MPI and NCCL wait forever by default: a rank that stops (SIGSTOP, a hung file system, a deadlocked
//! data loader) leaves every other rank blocked in its next collective, where it can neither notice a
//! SLURM stop request (that flag travels in the same collective) nor report anything. With a watchdog,
//! each collective has `timeout` to complete; when it expires, every live rank prints the collective's
//! name and sequence number and the ranks it did not see arrive, and the job ends with
//! [`WATCHDOG_EXIT_CODE`].
//!
//! How "did not arrive" is known (MPI back-end, see `mpi_comm.rs`): collectives run as their
//! non-blocking MPI variants, polled with `MPI_Test` until they complete or the deadline passes. A rank
//! whose collective has not completed after [`Watch::announce_after`] sends each peer one 8-byte
//! message "I am in collective #seq" on a duplicate of the world communicator. A rank that never sends
//! it was never seen waiting there. Cost per collective: nothing extra on the fast path (a collective
//! that completes within `announce_after`) beyond the non-blocking variant and the polling loop; a slow
//! collective costs world - 1 tiny point-to-point messages per rank.

use std::time::{Duration, Instant};

use crate::error::{DistError, Result};

/// Exit status of a job ended by the watchdog (the convention of `timeout(1)`).
pub const WATCHDOG_EXIT_CODE: i32 = 124;

/// Default deadline of one collective: long enough for rank 0 to write a large checkpoint while the
/// others wait, short enough that a stalled job ends well before its allocation does.
pub const DEFAULT_TIMEOUT_S: f64 = 600.0;
/// Shortest accepted deadline: below this, scheduler noise on a loaded machine ends healthy jobs.
pub const MIN_TIMEOUT_S: f64 = 1.0;
/// Longest accepted deadline (one week).
pub const MAX_TIMEOUT_S: f64 = 7.0 * 24.0 * 3600.0;

/// Options of the communication layer, given to [`crate::init_with`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistOptions {
    /// How long one collective may take before the job is ended (config key `dist.timeout_s`).
    pub timeout: Duration,
}

impl Default for DistOptions {
    fn default() -> Self {
        DistOptions {
            timeout: Duration::from_secs_f64(DEFAULT_TIMEOUT_S),
        }
    }
}

impl DistOptions {
    /// Options with a collective deadline of `timeout_s` seconds, which must be finite and within
    /// [`MIN_TIMEOUT_S`]..=[`MAX_TIMEOUT_S`].
    pub fn with_timeout_s(timeout_s: f64) -> Result<Self> {
        validate_timeout_s(timeout_s).map_err(DistError::Launch)?;
        Ok(DistOptions {
            timeout: Duration::from_secs_f64(timeout_s),
        })
    }
}

/// Why `timeout_s` is not an acceptable collective deadline, as a message without the key's name.
pub fn validate_timeout_s(timeout_s: f64) -> std::result::Result<(), String> {
    if timeout_s.is_finite() && (MIN_TIMEOUT_S..=MAX_TIMEOUT_S).contains(&timeout_s) {
        Ok(())
    } else {
        Err(format!(
            "collective timeout must be between {MIN_TIMEOUT_S} and {MAX_TIMEOUT_S} seconds, got {timeout_s}"
        ))
    }
}

/// Book-keeping of the collective in progress on one rank, and of what its peers announced.
#[derive(Debug)]
pub(crate) struct Watch {
    pub timeout: Duration,
    /// Waiting this long without completion makes the rank announce its arrival to its peers.
    pub announce_after: Duration,
    /// Sequence number of the current (or last) collective; the first collective is #1.
    pub seq: u64,
    pub name: &'static str,
    pub started: Instant,
    pub announced: bool,
    /// Highest collective number each rank announced it was waiting in (0: none yet).
    pub seen: Vec<u64>,
    rank: usize,
}

impl Watch {
    pub fn new(rank: usize, world: usize, timeout: Duration) -> Self {
        Watch {
            timeout,
            announce_after: (timeout / 4).min(Duration::from_secs(1)),
            seq: 0,
            name: "",
            started: Instant::now(),
            announced: false,
            seen: vec![0; world],
            rank,
        }
    }

    /// Starts collective `name`: the next sequence number, a fresh deadline.
    pub fn begin(&mut self, name: &'static str) {
        self.seq += 1;
        self.name = name;
        self.started = Instant::now();
        self.announced = false;
        self.seen[self.rank] = self.seq;
    }

    /// A peer said it waits in collective `seq`.
    pub fn saw(&mut self, rank: usize, seq: u64) {
        if let Some(s) = self.seen.get_mut(rank) {
            *s = (*s).max(seq);
        }
    }

    /// Ranks never seen in the current collective (nor a later one), ascending.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.seen.len())
            .filter(|&r| self.seen[r] < self.seq)
            .collect()
    }

    /// The line a rank prints when the deadline of the current collective passes. `noticed_by` is
    /// the rank whose deadline passed first, when that is another rank.
    pub fn expiry_message(&self, noticed_by: Option<usize>) -> String {
        let missing = self.missing();
        let waiting: Vec<usize> = (0..self.seen.len())
            .filter(|&r| self.seen[r] >= self.seq)
            .collect();
        let by = match noticed_by {
            Some(r) if r != self.rank => format!(" (deadline noticed first by rank {r})"),
            _ => String::new(),
        };
        format!(
            "watchdog: collective {} #{} did not complete within {} s{by}: rank(s) {} did not arrive \
             (seen waiting: rank(s) {}); ending the job",
            self.name,
            self.seq,
            self.timeout.as_secs_f64(),
            list(&missing),
            list(&waiting),
        )
    }
}

fn list(ranks: &[usize]) -> String {
    if ranks.is_empty() {
        return "<none>".into();
    }
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_validation() {
        assert!(DistOptions::with_timeout_s(3.0).is_ok());
        assert_eq!(
            DistOptions::default().timeout,
            Duration::from_secs(DEFAULT_TIMEOUT_S as u64)
        );
        for bad in [0.0, 0.5, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            let e = DistOptions::with_timeout_s(bad).unwrap_err().to_string();
            assert!(e.contains("collective timeout"), "{bad}: {e}");
        }
    }

    #[test]
    fn missing_ranks_follow_announcements() {
        let mut w = Watch::new(0, 4, Duration::from_secs(3));
        assert_eq!(w.announce_after, Duration::from_millis(750));
        w.begin("barrier");
        w.saw(2, 1);
        w.saw(3, 2); // already in the next collective: it arrived here too
        assert_eq!(w.missing(), vec![1]);
        w.begin("all_reduce_sum_f32");
        assert_eq!(w.missing(), vec![1, 2]);
        let m = w.expiry_message(Some(3));
        assert!(
            m.contains("collective all_reduce_sum_f32 #2 did not complete within 3 s"),
            "{m}"
        );
        assert!(m.contains("rank(s) 1,2 did not arrive"), "{m}");
        assert!(m.contains("seen waiting: rank(s) 0,3"), "{m}");
        assert!(m.contains("noticed first by rank 3"), "{m}");
        w.saw(9, 5); // out of range: ignored
    }
}
