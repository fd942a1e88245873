//! The trainer on 2 MPI ranks: per-rank batch B on 2 ranks equals batch 2B on one rank (the same
//! computation up to summation order), and resume on 2 ranks is exact; likewise for one process
//! whose batch is split over its threads (`train.thread_shards`). Needs `mpirun` (OpenMPI or
//! MPICH, installed by scripts/setup.sh); the test fails, rather than skips, without it.

mod common;

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ddpm-train");

fn mpirun(n: usize, args: &[&str]) {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1");
    c.args(["-n", &n.to_string(), "--oversubscribe", BIN])
        .args(args);
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run mpirun (install OpenMPI: scripts/setup.sh): {e}"));
    assert!(
        o.status.success(),
        "mpirun -n {n} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn single(args: &[&str]) {
    single_threads(1, args)
}

fn single_threads(threads: usize, args: &[&str]) {
    let o = Command::new(BIN)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn losses(dir: &Path) -> Vec<f64> {
    ddpm_train::metrics::read_lines(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

fn model(dir: &Path, step: u64) -> Vec<Vec<f32>> {
    let ck = ddpm_train::Checkpoint::open_verified(
        &dir.join("checkpoints")
            .join(ddpm_checkpoint::step_dir_name(step)),
    )
    .unwrap();
    let mut t: Vec<_> = ck
        .load_all(ddpm_checkpoint::MODEL_FILE, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t.into_iter()
        .map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// The tiny config of these tests (48 examples, 20 steps, loss-aware timesteps, label and model
/// dropout) in `f`'s directory; returns its path.
fn write_config(f: &common::Fixture) -> String {
    let text = common::tiny_config_text(
        &f.data,
        &f.dir.path().join("unused"),
        "dropout = 0.1",
        "[diffusion]\nschedule = \"cosine\"\ntimesteps = 8\nlabel_dropout = 0.2\ntimestep_sampling = \"loss_aware\"\n\n\
         [schedule]\ntotal_steps = 20\nlog_every = 1\ncheckpoint_every = 1000\n",
    );
    let cfg = f.dir.path().join("cfg.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg.to_str().unwrap().to_string()
}

/// Runs `a` and `b` computed the same 20 steps up to summation order: per-step losses within 1e-5
/// relative, weights within 1e-5 relative L2 overall (1e-3 per tensor).
fn assert_same_training(a_dir: &Path, b_dir: &Path) {
    let (a, b) = (losses(a_dir), losses(b_dir));
    assert_eq!(a.len(), 20);
    assert_eq!(b.len(), 20);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs(),
            "step {}: {x} ({}) vs {y} ({})",
            i + 1,
            a_dir.display(),
            b_dir.display()
        );
    }
    // weights: relative L2 distance over the whole parameter vector must be <= 1e-5 (the issue's
    // criterion; summation order differs between 1 and 2 ranks, and Adam rescales tiny gradient
    // differences). Per tensor, near-zero tensors (zero-initialised output convs) amplify that
    // rounding, so each tensor only has to agree to 1e-3 relative, which still catches a wrong update.
    let (mut diff_all, mut norm_all) = (0f64, 0f64);
    for (ta, tb) in model(a_dir, 20).iter().zip(model(b_dir, 20)) {
        let diff: f64 = ta
            .iter()
            .zip(&tb)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>();
        let norm: f64 = tb.iter().map(|y| (*y as f64).powi(2)).sum::<f64>();
        diff_all += diff;
        norm_all += norm;
        assert!(
            diff.sqrt() <= 1e-3 * norm.sqrt().max(1e-12) || diff == 0.0,
            "weights differ: |a-b| {} vs |b| {}",
            diff.sqrt(),
            norm.sqrt()
        );
    }
    assert!(
        diff_all.sqrt() <= 1e-5 * norm_all.sqrt(),
        "weights differ overall: |a-b| {} vs |b| {}",
        diff_all.sqrt(),
        norm_all.sqrt()
    );
}

#[test]
fn two_ranks_match_one_rank_and_resume_exactly() {
    let f = common::fixture(48);
    let cfg = write_config(&f);
    let cfg = cfg.as_str();
    let d = |n: &str| f.dir.path().join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // 2 ranks x 4 vs 1 rank x 8, 20 steps (the length)
    mpirun(
        2,
        &[
            "--config",
            cfg,
            "--no-progress",
            "--batch",
            "4",
            "--out",
            &s(&d("two")),
        ],
    );
    single(&[
        "--config",
        cfg,
        "--no-progress",
        "--batch",
        "8",
        "--out",
        &s(&d("one")),
    ]);
    assert_same_training(&d("two"), &d("one"));
    let a = losses(&d("two"));

    // resume on 2 ranks: 10 + 10 steps == 20 steps, bit for bit
    mpirun(
        2,
        &[
            "--config",
            cfg,
            "--no-progress",
            "--batch",
            "4",
            "--steps",
            "10",
            "--out",
            &s(&d("split")),
        ],
    );
    mpirun(
        2,
        &[
            "--config",
            cfg,
            "--no-progress",
            "--batch",
            "4",
            "--resume",
            "auto",
            "--out",
            &s(&d("split")),
        ],
    );
    let c = losses(&d("split"));
    assert_eq!(c.len(), 20);
    for (i, (x, y)) in c.iter().zip(&a).enumerate() {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "step {}: resumed {x} vs uninterrupted {y}",
            i + 1
        );
    }
    assert_eq!(model(&d("split"), 20), model(&d("two"), 20));

    // and the 2-rank checkpoint resumes on 1 rank with the same global batch
    single(&[
        "--config",
        cfg,
        "--no-progress",
        "--batch",
        "8",
        "--steps",
        "22",
        "--resume",
        "auto",
        "--out",
        &s(&d("split")),
    ]);
    assert_eq!(losses(&d("split")).len(), 22);
}

/// Gradient accumulation (`train.accumulate`): 2 micro-batches of 4 on one rank, and 2 micro-batches of 2
/// on each of 2 ranks, compute what one rank with batch 8 does (global batch = ranks x k x B = 8), within
/// the 2-rank tolerance above; and a run with accumulation on 2 ranks resumes bit for bit.
#[test]
fn accumulation_matches_one_batch_on_one_and_two_ranks_and_resumes_exactly() {
    let f = common::fixture(48);
    let cfg = write_config(&f);
    let cfg = cfg.as_str();
    let d = |n: &str| f.dir.path().join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |ranks: usize, batch: &str, k: &str, extra: &[&str], out: &str| {
        let set = format!("train.accumulate={k}");
        let out = s(&d(out));
        let mut args = vec![
            "--config",
            cfg,
            "--no-progress",
            "--batch",
            batch,
            "--set",
            &set,
            "--out",
            &out,
        ];
        args.extend_from_slice(extra);
        if ranks == 1 {
            single(&args)
        } else {
            mpirun(ranks, &args)
        }
    };
    run(1, "8", "1", &[], "one");
    run(1, "4", "2", &[], "acc1");
    assert_same_training(&d("acc1"), &d("one"));
    // The step's gradient is the mean over the micro-batches (what one batch of 8 gives), not their
    // sum: AdamW alone would hardly notice a factor k, the logged gradient norm and clipping do.
    let norms = |dir: &Path| -> Vec<f64> {
        ddpm_train::metrics::read_lines(&dir.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .map(|l| l["grad_norm"].as_f64().unwrap())
            .collect()
    };
    for (i, (x, y)) in norms(&d("acc1")).iter().zip(norms(&d("one"))).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * y.abs(),
            "step {}: gradient norm {x} with accumulation vs {y} with one batch",
            i + 1
        );
    }
    run(2, "2", "2", &[], "acc2");
    assert_same_training(&d("acc2"), &d("one"));

    run(2, "2", "2", &["--steps", "10"], "split");
    run(2, "2", "2", &["--resume", "auto"], "split");
    let (x, y) = (losses(&d("split")), losses(&d("acc2")));
    assert_eq!(x.len(), 20);
    for (i, (a, b)) in x.iter().zip(&y).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "step {}: resumed {a} vs uninterrupted {b}",
            i + 1
        );
    }
    assert_eq!(model(&d("split"), 20), model(&d("acc2"), 20));
}

/// `train.thread_shards` (on by default): with 2 compute threads one process splits its batch of
/// 8 into 2 shards of 4 that run side by side. That computes what one pass over the 8 examples
/// does, within the 2-rank tolerance; it is not bit for bit the one-pass run (so the shards did
/// run: with the switch ignored both runs would be the same program); and it resumes exactly.
#[test]
fn thread_shards_match_one_pass_and_resume_exactly() {
    let f = common::fixture(48);
    let cfg = write_config(&f);
    let d = |n: &str| f.dir.path().join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |extra: &[&str], out: &str| {
        let out = s(&d(out));
        let mut args = vec![
            "--config",
            &cfg,
            "--no-progress",
            "--batch",
            "8",
            "--out",
            &out,
        ];
        args.extend_from_slice(extra);
        single_threads(2, &args);
    };
    run(&[], "shards");
    run(&["--set", "train.thread_shards=false"], "one");
    assert_same_training(&d("shards"), &d("one"));
    let bits = |dir: &Path| -> Vec<u64> { losses(dir).iter().map(|l| l.to_bits()).collect() };
    assert_ne!(
        bits(&d("shards")),
        bits(&d("one")),
        "sharded and one-pass runs are bitwise equal: the batch was not split"
    );
    run(&["--steps", "10"], "split");
    run(&["--resume", "auto"], "split");
    assert_eq!(bits(&d("split")), bits(&d("shards")));
    assert_eq!(model(&d("split"), 20), model(&d("shards"), 20));
}

/// A distillation round (`--teacher`, guidance folded in, label and model dropout) on 2 ranks x 4
/// equals 1 rank x 8 within the tolerance above, and resumes on 2 ranks bit for bit.
#[test]
fn distill_round_on_two_ranks_matches_one_rank_and_resumes_exactly() {
    let f = common::fixture(48);
    let cfg = write_config(&f);
    let d = |n: &str| f.dir.path().join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let teacher = s(&d("teacher"));
    single(&[
        "--config",
        &cfg,
        "--no-progress",
        "--steps",
        "3",
        "--out",
        &teacher,
    ]);
    let round = |ranks: usize, batch: &str, steps: &str, extra: &[&str], out: &str| {
        let out = s(&d(out));
        let mut args = vec![
            "--teacher",
            &teacher,
            "--set",
            "distill.teacher_steps=4",
            "--set",
            "distill.guidance=1.0",
            "--steps",
            steps,
            "--no-progress",
            "--batch",
            batch,
            "--out",
            &out,
        ];
        args.extend_from_slice(extra);
        if ranks == 1 {
            single(&args)
        } else {
            mpirun(ranks, &args)
        }
    };
    round(2, "4", "20", &[], "two");
    round(1, "8", "20", &[], "one");
    assert_same_training(&d("two"), &d("one"));
    round(2, "4", "10", &[], "split");
    round(2, "4", "20", &["--resume", "auto"], "split");
    let (x, y) = (losses(&d("split")), losses(&d("two")));
    assert_eq!(x.len(), 20);
    for (i, (a, b)) in x.iter().zip(&y).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "step {}: resumed {a} vs uninterrupted {b}",
            i + 1
        );
    }
    assert_eq!(model(&d("split"), 20), model(&d("two"), 20));
}
