//! Progressive distillation round trip at a tiny size: a v-predicting, class-conditional teacher,
//! then two rounds (4 -> 2 -> 1 DDIM steps, classifier-free guidance folded in by the first), each
//! checked to bring the student's one DDIM step closer to its teacher's two (measured on held-out
//! noise before and after the round), and each an ordinary run directory whose manifest records it.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ddpm_checkpoint::{Checkpoint, Weights};
use ddpm_config::{Overrides, Task, TrainConfig};
use ddpm_dist::SingleProcess;
use ddpm_train::distill::{load_config, Distiller};
use ddpm_train::trainer::{train, TrainOptions};

/// `n` bar images as `common::make_dataset` writes them, in [-1, 1], with their labels.
fn bars(n: usize) -> (Tensor, Tensor) {
    let s = common::SIZE;
    let mut px = Vec::with_capacity(n * s * s);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let (class, pos) = (i % 2, 2 + (i / 2) % 4);
        for y in 0..s {
            for x in 0..s {
                let on = if class == 0 { y == pos } else { x == pos };
                px.push(if on {
                    235.0 / 127.5 - 1.0
                } else {
                    20.0 / 127.5 - 1.0
                });
            }
        }
        labels.push(class as u32);
    }
    (
        Tensor::from_vec(px, (n, 1, s, s), &Device::Cpu).unwrap(),
        Tensor::from_vec(labels, n, &Device::Cpu).unwrap(),
    )
}

fn run(cfg: &TrainConfig) -> PathBuf {
    let out = train(cfg, &SingleProcess::new(), TrainOptions::default()).unwrap();
    assert_eq!(out.step, cfg.schedule.total_steps);
    assert_eq!(out.skipped_steps, 0);
    out.checkpoint.unwrap()
}

/// The round's one-step gap with the student at its initial weights (the teacher's EMA) and after
/// training (its final weights).
fn gaps(cfg: &TrainConfig, teacher_ck: &Path, student_ck: &Path) -> (f64, f64) {
    let dev = Device::Cpu;
    let d = Distiller::for_run(cfg, &dev).unwrap().unwrap();
    let (x0, y) = bars(24);
    let load = |dir: &Path, w| {
        Checkpoint::resolve(dir, |_| {})
            .unwrap()
            .load_unet(w, candle_core::DType::F32, &dev)
            .unwrap()
    };
    let seed = 987_654; // not the training seed: fresh noise
    let before = d
        .one_step_gap(load(teacher_ck, Weights::Ema(None)), &x0, Some(&y), seed)
        .unwrap();
    let after = d
        .one_step_gap(load(student_ck, Weights::Model), &x0, Some(&y), seed)
        .unwrap();
    (before, after)
}

fn round(teacher: &Path, out: &Path, sets: &[&str]) -> TrainConfig {
    let ov = Overrides {
        sets: sets.iter().map(|s| s.to_string()).collect(),
        steps: Some(40),
        out: Some(out.to_path_buf()),
        ..Default::default()
    };
    load_config(None, Some(teacher), &ov).unwrap()
}

#[test]
fn two_rounds_bring_one_student_step_toward_two_teacher_steps() {
    let f = common::fixture(16);
    let t_dir = f.dir.path().join("teacher");
    let text = common::tiny_config_text(
        &f.data,
        &t_dir,
        "",
        "[diffusion]\nschedule = \"cosine\"\ntimesteps = 16\nprediction = \"v\"\nlabel_dropout = 0.2\n\n\
         [schedule]\ntotal_steps = 80\nlog_every = 10\ncheckpoint_every = 1000\n",
    );
    let teacher_ck = run(&common::load(&text, &Overrides::default()));

    // round 1: 4 -> 2 steps, guidance w = 1 folded into the targets
    let r1_dir = f.dir.path().join("round1");
    let r1 = round(
        &t_dir,
        &r1_dir,
        &[
            "distill.teacher_steps=4",
            "distill.guidance=1.0",
            "optim.lr=1e-3",
        ],
    );
    assert_eq!(r1.task, Task::Distill);
    assert_eq!(r1.diffusion.prediction, ddpm_config::Prediction::V);
    let r1_ck = run(&r1);
    let (b1, a1) = gaps(&r1, &teacher_ck, &r1_ck);

    // round 2: the round-1 student is the teacher; 2 -> 1 step (inherited), guidance inherited
    let r2_dir = f.dir.path().join("round2");
    let r2 = round(&r1_dir, &r2_dir, &["optim.lr=3e-3"]);
    let d2 = r2.distilled().unwrap();
    assert_eq!((d2.teacher_steps, d2.student_steps()), (2, 1));
    assert_eq!(d2.guidance, 1.0);
    assert_eq!(d2.teacher, std::fs::canonicalize(&r1_ck).unwrap());
    let r2_ck = run(&r2);
    let (b2, a2) = gaps(&r2, &r1_ck, &r2_ck);
    eprintln!("one-step gap: round 1 {b1:.5} -> {a1:.5}, round 2 {b2:.5} -> {a2:.5}");
    for (r, b, a) in [(1, b1, a1), (2, b2, a2)] {
        assert!(b > 0.0 && a.is_finite(), "round {r}: {b} -> {a}");
        assert!(
            a < 0.5 * b,
            "round {r}: the student's one step did not move toward the teacher's two: {b} -> {a}"
        );
    }

    // the manifest records the round: ddpm-sample reads task, teacher, steps and guidance from it
    let m = Checkpoint::resolve(&r2_dir, |_| {}).unwrap();
    assert_eq!(m.task(), "distill");
    let cfg = m.config().unwrap();
    let d = cfg.distilled().unwrap();
    assert_eq!(d.student_spec(), "trailing1");
    assert_eq!(d.guidance, 1.0);
    assert_eq!(
        m.manifest.config["distill"]["teacher"].as_str().unwrap(),
        std::fs::canonicalize(&r1_ck).unwrap().to_str().unwrap()
    );
}

/// A round must name its teacher's step count, cannot change the teacher's process, and refuses
/// guidance on a teacher that never learned the null label.
#[test]
fn bad_rounds_are_refused() {
    let f = common::fixture(16);
    let t_dir = f.dir.path().join("teacher");
    let text = common::tiny_config_text(
        &f.data,
        &t_dir,
        "",
        "[diffusion]\nschedule = \"cosine\"\ntimesteps = 16\n\n[schedule]\ntotal_steps = 1\n",
    );
    run(&common::load(&text, &Overrides::default()));
    let try_round = |sets: &[&str]| {
        let ov = Overrides {
            sets: sets.iter().map(|s| s.to_string()).collect(),
            out: Some(f.dir.path().join("s")),
            ..Default::default()
        };
        format!("{:#}", load_config(None, Some(&t_dir), &ov).unwrap_err())
    };
    assert!(try_round(&[]).contains("distill.teacher_steps"));
    assert!(try_round(&["distill.teacher_steps=3"]).contains("even"));
    assert!(
        try_round(&["distill.teacher_steps=4", "diffusion.timesteps=8"])
            .contains("diffusion.timesteps")
    );
    assert!(
        try_round(&["distill.teacher_steps=4", "distill.guidance=2"]).contains("label_dropout")
    );
    assert!(
        try_round(&["distill.teacher_steps=4", "distill.teacher_weights=ema:0.5"]).contains("0.5")
    );
}
