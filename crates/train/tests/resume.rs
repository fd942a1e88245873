//! Exact resume: N steps, stop, resume to 2N gives bit-identical losses and weights to 2N steps in
//! one go. Also: resume refuses a different config or mismatching tensors.

mod common;

use std::fs;
use std::path::Path;

use ddpm_checkpoint::{self as checkpoint, Checkpoint};
use ddpm_config::{Overrides, TrainConfig};
use ddpm_dist::SingleProcess;
use ddpm_train::trainer::{read_metrics, train, ResumeFrom, TrainOptions};

fn config(
    f: &common::Fixture,
    out: &Path,
    steps: u64,
    extra_diffusion: &str,
    model_extra: &str,
) -> TrainConfig {
    // cosine unless the test names its own schedule
    let schedule = match extra_diffusion.contains("schedule =") {
        true => "",
        false => "schedule = \"cosine\"\n",
    };
    let text = common::tiny_config_text(
        &f.data,
        out,
        model_extra,
        &format!(
            "[diffusion]\n{schedule}label_dropout = 0.2\n{extra_diffusion}\n\n\
             [schedule]\ntotal_steps = {steps}\nlog_every = 1\ncheckpoint_every = 1000\nkeep_checkpoints = 2\n"
        ),
    );
    common::load(&text, &Overrides::default())
}

fn run(cfg: &TrainConfig, resume: bool) -> ddpm_train::TrainOutcome {
    let comm = SingleProcess::new();
    let opts = TrainOptions {
        resume: resume.then_some(ResumeFrom::Auto),
        ..Default::default()
    };
    train(cfg, &comm, opts).unwrap()
}

/// metrics lines without wall-clock fields
fn lines(dir: &Path) -> Vec<serde_json::Value> {
    read_metrics(dir)
        .unwrap()
        .into_iter()
        .map(|mut v| {
            for k in ["images_per_sec", "sync_ms", "step_ms"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

fn files_equal(a: &Path, b: &Path) {
    let ca = Checkpoint::open_verified(a).unwrap();
    let cb = Checkpoint::open_verified(b).unwrap();
    assert_eq!(ca.manifest.files.len(), cb.manifest.files.len());
    for f in &ca.manifest.files {
        let g = cb.manifest.file(&f.name).unwrap();
        assert_eq!(
            f.sha256,
            g.sha256,
            "{} differs between {} and {}",
            f.name,
            a.display(),
            b.display()
        );
    }
    assert_eq!(ca.manifest.loader_position, cb.manifest.loader_position);
    assert_eq!(ca.manifest.optimizer, cb.manifest.optimizer);
}

/// Returns the checkpoints at N and 2N of the split run, read before the temporary directory goes.
fn exact_resume(
    extra_diffusion: &str,
    model_extra: &str,
    n: u64,
) -> (Option<Vec<f64>>, Option<Vec<f64>>) {
    let f = common::fixture(40); // 40 / 8 = 5 batches per epoch: the runs cross epoch boundaries
    exact_resume_with(
        &f,
        |out, steps| config(&f, out, steps, extra_diffusion, model_extra),
        n,
    )
}

/// [`exact_resume`] for the runs `config(out_dir, total_steps)` makes in `f`'s directory.
fn exact_resume_with(
    f: &common::Fixture,
    config: impl Fn(&Path, u64) -> TrainConfig,
    n: u64,
) -> (Option<Vec<f64>>, Option<Vec<f64>>) {
    let full_dir = f.dir.path().join("full");
    let split_dir = f.dir.path().join("split");
    let full = run(&config(&full_dir, 2 * n), false);
    assert_eq!(full.step, 2 * n);
    let first = run(&config(&split_dir, n), false);
    assert_eq!(first.step, n);
    let ck = first.checkpoint.clone().unwrap();
    assert!(
        ck.ends_with(checkpoint::step_dir_name(n)),
        "{}",
        ck.display()
    );
    let second = run(&config(&split_dir, 2 * n), true);
    assert_eq!(second.step, 2 * n);
    assert_eq!(
        second.step_losses.len() as u64,
        n,
        "the resumed run must run only the missing steps"
    );

    // losses: bit-identical per step
    let joined: Vec<f64> = first
        .step_losses
        .iter()
        .chain(&second.step_losses)
        .copied()
        .collect();
    assert_eq!(joined.len(), full.step_losses.len());
    for (i, (a, b)) in joined.iter().zip(&full.step_losses).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "step {i}: loss {a} (resumed) vs {b} (uninterrupted)"
        );
    }
    assert_eq!(lines(&split_dir), lines(&full_dir), "metrics.jsonl differs");
    // weights, EMAs, moments, trainer state: byte-identical files
    files_equal(
        &full_dir
            .join("checkpoints")
            .join(checkpoint::step_dir_name(2 * n)),
        &split_dir
            .join("checkpoints")
            .join(checkpoint::step_dir_name(2 * n)),
    );
    // the losses moved, so the test is not comparing two untrained models
    assert!(full.step_losses.iter().any(|&l| l != full.step_losses[0]));
    let counts = |p: &Path| {
        Checkpoint::open_verified(p)
            .unwrap()
            .state_f64("loss_counts")
            .unwrap()
    };
    (counts(&ck), counts(second.checkpoint.as_ref().unwrap()))
}

/// Continuous time with the learned schedule: its parameters, their EMAs and AdamW moments, and
/// the low-discrepancy times must all resume exactly too.
#[test]
fn resume_is_bit_exact_continuous_learned_schedule() {
    let (mid, _) = exact_resume(
        "time = \"continuous\"\nschedule = \"learned\"\nschedule_hidden = 16\nloss = \"vlb\"",
        "",
        3,
    );
    assert!(mid.is_none());
}

/// Mixed precision: the f32 master weights, moments and EMAs resume exactly, and so does the
/// bf16 arithmetic done on them.
#[test]
fn resume_is_bit_exact_bf16() {
    let (mid, _) = exact_resume("[train]\nprecision = \"bf16\"", "dropout = 0.1", 3);
    assert!(mid.is_none());
}

#[test]
fn resume_is_bit_exact_uniform_eps() {
    let (mid, _) = exact_resume("", "dropout = 0.1", 4);
    assert!(mid.is_none(), "uniform sampling keeps no history");
}

#[test]
fn resume_is_bit_exact_loss_aware_hybrid_v() {
    // T = 4: the loss-aware sampler warms up (10 losses per t) within the first run, so its
    // history must round-trip through the checkpoint.
    let (mid, end) = exact_resume(
        "timesteps = 4\ntimestep_sampling = \"loss_aware\"\nvariance = \"learned_range\"\nloss = \"hybrid\"\nprediction = \"v\"",
        "learn_sigma = true",
        4,
    );
    // the history was partly filled at the stop and warm (importance sampling active) at the end
    let (mid, end) = (mid.unwrap(), end.unwrap());
    assert!(mid.iter().sum::<f64>() > 0.0, "{mid:?}");
    assert!(mid.iter().any(|&c| c < 10.0), "{mid:?}");
    assert!(end.iter().all(|&c| c == 10.0), "{end:?}");
}

/// A distillation round (eps teacher, guidance folded in, label and model dropout) resumes bit for
/// bit: its grid points, noise and teacher targets are functions of (seed, step, example) and the
/// teacher is frozen.
#[test]
fn resume_is_bit_exact_distill() {
    let f = common::fixture(40);
    let teacher = f.dir.path().join("teacher");
    run(
        &config(&f, &teacher, 3, "timesteps = 16", "dropout = 0.1"),
        false,
    );
    let round = |out: &Path, steps: u64| {
        let ov = Overrides {
            sets: vec![
                "distill.teacher_steps=8".into(),
                "distill.guidance=0.5".into(),
            ],
            steps: Some(steps),
            out: Some(out.to_path_buf()),
            ..Default::default()
        };
        ddpm_train::distill::load_config(None, Some(&teacher), &ov).unwrap()
    };
    let (mid, _) = exact_resume_with(&f, round, 3);
    assert!(mid.is_none(), "uniform sampling keeps no history");
}

#[test]
fn resume_refuses_a_different_config() {
    let f = common::fixture(16);
    let dir = f.dir.path().join("run");
    run(&config(&f, &dir, 2, "", ""), false);
    let mut other = config(&f, &dir, 4, "", "");
    other.optim.lr = 1e-4;
    let comm = SingleProcess::new();
    let e = train(
        &other,
        &comm,
        TrainOptions {
            resume: Some(ResumeFrom::Auto),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("config hash") && e.contains("optim.lr"), "{e}");
    // and a run directory with checkpoints is not silently overwritten by a fresh run
    let e = train(&config(&f, &dir, 4, "", ""), &comm, TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume auto"), "{e}");
}

#[test]
fn resume_refuses_mismatching_tensors_and_skips_damaged_checkpoints() {
    let f = common::fixture(16);
    let dir = f.dir.path().join("run");
    let cfg = config(&f, &dir, 2, "", "");
    run(&cfg, false);
    // a second, newer checkpoint whose model file has a wrongly shaped tensor, with a manifest that
    // matches the damaged file (so only the shape check can catch it)
    let src = dir.join("checkpoints").join(checkpoint::step_dir_name(2));
    let bad = dir.join("checkpoints").join(checkpoint::step_dir_name(3));
    fs::create_dir(&bad).unwrap();
    for e in fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let ck = Checkpoint::open_verified(&bad).unwrap();
    let mut tensors = ck
        .load_all(checkpoint::MODEL_FILE, &candle_core::Device::Cpu)
        .unwrap();
    let name = "out.2.bias".to_string();
    assert!(tensors.contains_key(&name), "{:?}", tensors.keys());
    tensors.insert(
        name.clone(),
        candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let list: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
    let bytes = checkpoint::safetensors_bytes(&list, &bad).unwrap();
    fs::write(bad.join(checkpoint::MODEL_FILE), &bytes).unwrap();
    let mut m = ck.manifest.clone();
    m.step = 3;
    for fe in &mut m.files {
        if fe.name == checkpoint::MODEL_FILE {
            fe.bytes = bytes.len() as u64;
            fe.sha256 = checkpoint::sha256_hex(&bytes);
        }
    }
    fs::write(bad.join(checkpoint::MANIFEST), m.to_sealed_json()).unwrap();
    let comm = SingleProcess::new();
    let e = train(
        &config(&f, &dir, 4, "", ""),
        &comm,
        TrainOptions {
            resume: Some(ResumeFrom::Auto),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(&name) && e.contains("does not match"), "{e}");

    // a damaged (hash-mismatching) newest checkpoint is skipped: resume falls back to step 2
    fs::write(bad.join(checkpoint::MODEL_FILE), b"garbage").unwrap();
    let out = train(
        &config(&f, &dir, 4, "", ""),
        &comm,
        TrainOptions {
            resume: Some(ResumeFrom::Auto),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(out.step, 4);
    assert_eq!(out.step_losses.len(), 2, "resumed from step 2");
}
