//! Run under `mpirun -n W`: every rank reads its shard through the real [`Loader`], then the ranks
//! all-gather what they read and check, on every rank, that
//! - no dataset index was read twice within an epoch and exactly `N - N mod (W*B)` were read,
//! - the W shards interleaved by global batch are exactly the plan of one rank with batch `W*B`,
//! - each delivered image matches the image its index names, decoded independently from the file
//!   (compared by a fingerprint of the f32 pixels), and, with `--unique-content` (for data known to
//!   have no duplicate images, like the synthetic test file), no image content was delivered twice.
//!
//! Usage: `mpirun -n 2 mpi_shard_check FILE --batch B --seed S --epochs E [--flip] [--unique-content]`.
//! Exits 0 and rank 0 prints `mpi_shard_check OK ...` when every rank passed.

use std::collections::HashSet;

use ddpm_data::{flip_decision, shard_plan, Hdf5Dataset, Loader, LoaderConfig, LoaderPosition};
use mpi::datatype::PartitionMut;
use mpi::traits::*;
use mpi::Count;

fn fingerprint(x: &[f32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in x {
        for b in v.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The f32 CHW image the loader should deliver for `index`, decoded here without the loader.
fn expected(ds: &Hdf5Dataset, index: u64, flip: bool) -> Vec<f32> {
    let (h, w, c) = (ds.height(), ds.width(), ds.channels());
    let img = ds.read_images(index as usize, 1).expect("read image");
    let mut out = vec![0f32; h * w * c];
    for y in 0..h {
        for x in 0..w {
            let sx = if flip { w - 1 - x } else { x };
            for ch in 0..c {
                out[ch * h * w + y * w + x] = img[(y * w + sx) * c + ch] as f32 / 127.5 - 1.0;
            }
        }
    }
    out
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("bad value for {name}")))
        .unwrap_or(default)
}

fn all_gather_u64(world: &impl CommunicatorCollectives, mine: &[u64]) -> Vec<Vec<u64>> {
    let size = world.size() as usize;
    let mut counts = vec![0 as Count; size];
    world.all_gather_into(&(mine.len() as Count), &mut counts[..]);
    let displs: Vec<Count> = counts
        .iter()
        .scan(0, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect();
    let mut all = vec![0u64; counts.iter().sum::<Count>() as usize];
    {
        let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
        world.all_gather_varcount_into(mine, &mut part);
    }
    (0..size)
        .map(|r| all[displs[r] as usize..(displs[r] + counts[r]) as usize].to_vec())
        .collect()
}

fn main() {
    let universe = mpi::initialize().expect("MPI init");
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let args: Vec<String> = std::env::args().collect();
    let file = args
        .get(1)
        .cloned()
        .expect("usage: mpi_shard_check FILE --batch B --seed S --epochs E [--flip]");
    let batch: usize = arg(&args, "--batch", 4);
    let seed: u64 = arg(&args, "--seed", 0);
    let epochs: u64 = arg(&args, "--epochs", 2);
    let flip = args.iter().any(|a| a == "--flip");
    let unique_content = args.iter().any(|a| a == "--unique-content");

    let cfg = LoaderConfig {
        path: file.clone().into(),
        world: size,
        rank,
        batch,
        seed,
        flip,
        prefetch: 2,
    };
    let mut loader = Loader::new(cfg, LoaderPosition::default()).unwrap_or_else(|e| {
        eprintln!("rank {rank}: {e}");
        world.abort(2)
    });
    let ds = Hdf5Dataset::open(&file).expect("open");
    let n = ds.len() as u64;
    let bpe = loader.batches_per_epoch();
    let mut failures: Vec<String> = Vec::new();
    let mut total_checked = 0usize;

    for epoch in 0..epochs {
        // What this rank read: indices and content fingerprints, in reading order.
        let mut idx = Vec::new();
        let mut fps = Vec::new();
        for _ in 0..bpe {
            let b = loader.next_batch().unwrap_or_else(|e| {
                eprintln!("rank {rank}: {e}");
                world.abort(3)
            });
            if b.epoch != epoch {
                failures.push(format!(
                    "rank {rank}: batch of epoch {} while reading epoch {epoch}",
                    b.epoch
                ));
            }
            let per = b.images.len() / b.indices.len();
            for (j, &i) in b.indices.iter().enumerate() {
                let fp = fingerprint(&b.images[j * per..(j + 1) * per]);
                let want = fingerprint(&expected(&ds, i, flip && flip_decision(seed, epoch, i)));
                if fp != want {
                    failures.push(format!(
                        "rank {rank}: epoch {epoch}: content of example {i} is wrong"
                    ));
                }
                idx.push(i);
                fps.push(fp);
            }
        }
        let all_idx = all_gather_u64(&world, &idx);
        let all_fps = all_gather_u64(&world, &fps);

        let mut seen = HashSet::new();
        for (r, list) in all_idx.iter().enumerate() {
            for &i in list {
                if !seen.insert(i) {
                    failures.push(format!(
                        "epoch {epoch}: example {i} read twice (again by rank {r})"
                    ));
                }
            }
        }
        let expected_total = n - n % (size as u64 * batch as u64);
        if seen.len() as u64 != expected_total {
            failures.push(format!(
                "epoch {epoch}: {} distinct examples read, expected {expected_total}",
                seen.len()
            ));
        }
        if unique_content {
            let mut fp_seen = HashSet::new();
            for list in &all_fps {
                for &f in list {
                    if !fp_seen.insert(f) {
                        failures.push(format!(
                            "epoch {epoch}: the same image content was delivered twice"
                        ));
                    }
                }
            }
        }
        let mut interleaved = Vec::new();
        for g in 0..bpe as usize {
            for list in &all_idx {
                interleaved.extend_from_slice(&list[g * batch..(g + 1) * batch]);
            }
        }
        if interleaved != shard_plan(n, 1, 0, size * batch, epoch, seed) {
            failures.push(format!(
                "epoch {epoch}: shards differ from the single-rank plan with batch {}",
                size * batch
            ));
        }
        total_checked += seen.len();
    }

    // Everyone must pass.
    let mine = failures.len() as u64;
    let mut worst = 0u64;
    world.all_reduce_into(&mine, &mut worst, mpi::collective::SystemOperation::max());
    for f in failures.iter().take(10) {
        eprintln!("FAIL {f}");
    }
    if worst > 0 {
        if rank == 0 {
            eprintln!("mpi_shard_check FAILED");
        }
        drop(loader);
        drop(universe);
        std::process::exit(1);
    }
    if rank == 0 {
        let content = if unique_content {
            ", no image content delivered twice"
        } else {
            ""
        };
        println!(
            "mpi_shard_check OK: world {size}, batch {batch}, {epochs} epochs, {total_checked} examples checked, \
             N = {n}, no example read twice{content}"
        );
    }
}
