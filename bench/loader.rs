//! Loader throughput: images/s per rank delivered by `ddpm_data::Loader`, with `--world W` loaders
//! running concurrently in one process (as W ranks on one node would), each consumer touching every
//! pixel. Reported against a reference measured in the same run: the rate at which one thread decodes
//! already-in-memory uint8 images to f32 NCHW (the loader's unavoidable work), so the ratio shows the
//! loader's overhead independent of the machine.
//!
//! The project target is `loader images/s per rank >= 50 x training images/s per rank`, where training
//! images/s per rank = per-rank batch / seconds per training step of the default configuration. Pass
//! that figure as `--train-images-per-s X` to get a PASS/FAIL line.
//!
//! Run via `bench/loader.sh` (converts Fashion-MNIST first) or
//! `cargo bench -p ddpm-data --bench loader -- --file F.h5 [--batch 128] [--world 1] [--seconds 3] [--flip]`.

use std::time::{Duration, Instant};

use ddpm_data::decode::{decode_into, lut};
use ddpm_data::{Hdf5Dataset, Loader, LoaderConfig, LoaderPosition};

struct Args {
    file: Option<String>,
    batch: usize,
    world: usize,
    seconds: f64,
    flip: bool,
    prefetch: usize,
    train_images_per_s: Option<f64>,
}

fn parse() -> Args {
    let mut a = Args {
        file: None,
        batch: 128,
        world: 1,
        seconds: 3.0,
        flip: true,
        prefetch: 4,
        train_images_per_s: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = |i: usize| {
            argv.get(i + 1)
                .cloned()
                .unwrap_or_else(|| panic!("{} needs a value", argv[i]))
        };
        match argv[i].as_str() {
            "--file" => {
                a.file = Some(val(i));
                i += 1;
            }
            "--batch" => {
                a.batch = val(i).parse().expect("--batch");
                i += 1;
            }
            "--world" => {
                a.world = val(i).parse().expect("--world");
                i += 1;
            }
            "--seconds" => {
                a.seconds = val(i).parse().expect("--seconds");
                i += 1;
            }
            "--prefetch" => {
                a.prefetch = val(i).parse().expect("--prefetch");
                i += 1;
            }
            "--train-images-per-s" => {
                a.train_images_per_s = Some(val(i).parse().expect("--train-images-per-s"));
                i += 1;
            }
            "--flip" => a.flip = true,
            "--no-flip" => a.flip = false,
            "--bench" => {} // added by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    a
}

/// Decode-only reference: one thread, images already in memory.
fn decode_rate(ds: &Hdf5Dataset, batch: usize, seconds: f64) -> f64 {
    let n = ds.len().min(4096);
    let raw = ds.read_images(0, n).expect("read");
    let (h, w, c) = (ds.height(), ds.width(), ds.channels());
    let ib = h * w * c;
    let table = lut();
    let mut out = vec![0f32; batch * ib];
    let (mut done, mut sink) = (0usize, 0f32);
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < seconds {
        for j in 0..batch {
            let k = (done + j * 7919) % n;
            decode_into(
                &raw[k * ib..(k + 1) * ib],
                h,
                w,
                c,
                j % 2 == 0,
                &table,
                &mut out[j * ib..(j + 1) * ib],
            );
        }
        sink += out.iter().sum::<f32>();
        done += batch;
    }
    std::hint::black_box(sink);
    done as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let a = parse();
    let Some(file) = a.file.clone() else {
        println!(
            "loader bench: pass --file F.h5 (bench/loader.sh converts Fashion-MNIST and passes it)"
        );
        return;
    };
    // `cargo bench` runs this from crates/data, so relative paths are relative to that.
    let ds = Hdf5Dataset::open(&file).unwrap_or_else(|e| {
        eprintln!(
            "loader bench: {e} (cwd {})",
            std::env::current_dir().unwrap_or_default().display()
        );
        std::process::exit(1)
    });
    println!(
        "file {file}: N {} images {}x{}x{}, {} per chunk; world {} batch {} per rank, flip {}, prefetch {}",
        ds.len(), ds.height(), ds.width(), ds.channels(), ds.chunk_images(), a.world, a.batch, a.flip, a.prefetch
    );
    let reference = decode_rate(&ds, a.batch, a.seconds.min(2.0));

    let results: Vec<(usize, f64, f64, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..a.world)
            .map(|rank| {
                let cfg = LoaderConfig {
                    path: file.clone().into(),
                    world: a.world,
                    rank,
                    batch: a.batch,
                    seed: 1,
                    flip: a.flip,
                    prefetch: a.prefetch,
                };
                let seconds = a.seconds;
                s.spawn(move || {
                    let mut l = Loader::new(cfg, LoaderPosition::default())
                        .unwrap_or_else(|e| panic!("{e}"));
                    // First epoch includes reading + decompressing chunks from disk into the cache;
                    // measure it separately from steady state.
                    let t0 = Instant::now();
                    let mut images = 0usize;
                    let mut sink = 0f32;
                    for _ in 0..l.batches_per_epoch() {
                        let b = l.next_batch().unwrap_or_else(|e| panic!("{e}"));
                        sink += b.images.iter().sum::<f32>();
                        images += b.shape[0];
                    }
                    let first = images as f64 / t0.elapsed().as_secs_f64();
                    let t1 = Instant::now();
                    let w0 = l.wait_time();
                    images = 0;
                    while t1.elapsed().as_secs_f64() < seconds {
                        let b = l.next_batch().unwrap_or_else(|e| panic!("{e}"));
                        sink += b.images.iter().sum::<f32>();
                        images += b.shape[0];
                    }
                    std::hint::black_box(sink);
                    (
                        rank,
                        first,
                        images as f64 / t1.elapsed().as_secs_f64(),
                        l.wait_time() - w0,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("loader thread"))
            .collect()
    });

    println!("reference: in-memory decode, 1 thread: {reference:.0} images/s");
    let mut worst = f64::INFINITY;
    for (rank, first, steady, waited) in &results {
        println!(
            "rank {rank}: first epoch {first:.0} images/s, steady {steady:.0} images/s ({:.2}x reference), consumer waited {:.3}s",
            steady / reference,
            waited.as_secs_f64()
        );
        worst = worst.min(*steady);
    }
    println!("slowest rank: {worst:.0} images/s");
    match a.train_images_per_s {
        Some(t) => {
            let ratio = worst / t;
            println!(
                "training consumes {t:.1} images/s per rank; loader/training = {ratio:.1}x (target >= 50x): {}",
                if ratio >= 50.0 { "PASS" } else { "FAIL" }
            );
        }
        None => println!(
            "target: slowest rank >= 50 x (per-rank batch / seconds per training step); pass --train-images-per-s to check"
        ),
    }
}
