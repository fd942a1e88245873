//! `init_cpu` makes the calling thread a worker of rayon's global pool. Its own process: the
//! pool is global and is built once.

use std::collections::HashSet;
use std::time::Duration;

use rayon::prelude::*;

#[test]
fn init_cpu_joins_the_caller_to_the_pool_and_other_threads_still_get_work_done() {
    std::env::set_var("RAYON_NUM_THREADS", "2");
    assert_eq!(ddpm_ops::init_cpu(), 2);
    // The caller is worker 0: parallel ops fork from it instead of being handed off.
    assert_eq!(rayon::current_thread_index(), Some(0));
    assert_eq!(rayon::current_num_threads(), 2);
    // Its parallel work runs on both workers (a job slow enough that the other steals).
    let workers: HashSet<Option<usize>> = (0..64)
        .into_par_iter()
        .map(|_| {
            std::thread::sleep(Duration::from_millis(1));
            rayon::current_thread_index()
        })
        .collect();
    assert_eq!(workers, HashSet::from([Some(0), Some(1)]));
    // A thread outside the pool (a data loader, say) still gets its parallel work done while
    // the caller is blocked outside rayon.
    let other = std::thread::spawn(|| (0..1000u64).into_par_iter().sum::<u64>());
    assert_eq!(other.join().unwrap(), 499_500);
}
