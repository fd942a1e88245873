//! Issue 13, the trainer's side: nothing lost. A damaged newest checkpoint does not outlive the
//! resumed run; resuming from an older checkpoint continues that line under `--resume auto`; a
//! hand-edited manifest is an error, never a panic; a run that stays non-finite stops with an error
//! and keeps its good checkpoints; every model dimension has an upper bound.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use ddpm_checkpoint::{self as checkpoint, Checkpoint};
use ddpm_config::{Overrides, TrainConfig};
use ddpm_dist::SingleProcess;
use ddpm_train::trainer::{train, ResumeFrom, TrainOptions, TrainOutcome};

fn config(f: &common::Fixture, out: &Path, steps: u64, sets: &[&str]) -> TrainConfig {
    let text = common::tiny_config_text(
        &f.data,
        out,
        "",
        &format!(
            "[schedule]\ntotal_steps = {steps}\nlog_every = 1\ncheckpoint_every = 5\nkeep_checkpoints = 3\n"
        ),
    );
    let ov = Overrides {
        sets: sets.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    TrainConfig::from_toml_str(&text, &ov).unwrap()
}

fn run(cfg: &TrainConfig, resume: Option<ResumeFrom>) -> anyhow::Result<TrainOutcome> {
    let comm = SingleProcess::new();
    train(
        cfg,
        &comm,
        TrainOptions {
            resume,
            ..Default::default()
        },
    )
}

fn steps_on_disk(run_dir: &Path) -> Vec<u64> {
    checkpoint::list_checkpoints(run_dir)
        .iter()
        .map(|c| c.0)
        .collect()
}

fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir
        .join(checkpoint::CHECKPOINTS_DIR)
        .join(checkpoint::step_dir_name(step))
}

/// The repro: 10 steps (checkpoints 5, 10), truncate step 10's model, resume to 8 with
/// keep_checkpoints = 1. Pruning by step number deleted the step 8 just written and kept the damaged
/// step 10, leaving no usable checkpoint.
#[test]
fn a_damaged_newest_checkpoint_does_not_outlive_the_resumed_run() {
    let f = common::fixture(16);
    let dir = f.dir.path().join("run");
    run(&config(&f, &dir, 10, &[]), None).unwrap();
    assert_eq!(steps_on_disk(&dir), vec![10, 5]);
    let model = step_dir(&dir, 10).join(checkpoint::MODEL_FILE);
    fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(100)
        .unwrap();

    let cfg = config(&f, &dir, 8, &["schedule.keep_checkpoints=1"]);
    let out = run(&cfg, Some(ResumeFrom::Auto)).unwrap();
    assert_eq!(out.step_losses.len(), 3, "resumed from step 5");
    assert_eq!(out.checkpoint.as_deref(), Some(step_dir(&dir, 8).as_path()));
    let newest = Checkpoint::find_latest(&dir, |e| panic!("{e}")).expect("a valid checkpoint");
    assert_eq!(newest.manifest.step, 8);
}

/// Resume from the explicit older step 5 (checkpoints 5 and 10 exist) to 8, then `--resume auto`
/// to 12: the second resume must continue from 8, not jump back to the abandoned 10.
#[test]
fn resume_auto_continues_the_line_chosen_by_an_explicit_resume() {
    let f = common::fixture(16);
    let dir = f.dir.path().join("run");
    run(&config(&f, &dir, 10, &[]), None).unwrap();
    let s5 = step_dir(&dir, 5);
    let out = run(&config(&f, &dir, 8, &[]), Some(ResumeFrom::Path(s5))).unwrap();
    assert_eq!(out.step_losses.len(), 3);

    let out = run(&config(&f, &dir, 12, &[]), Some(ResumeFrom::Auto)).unwrap();
    assert_eq!(out.step_losses.len(), 4, "resumed from step 8, not 10");
    // the abandoned step 10 is kept out of the line, not deleted
    let abandoned: Vec<PathBuf> = fs::read_dir(dir.join("checkpoints/abandoned"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(abandoned.len(), 1, "{abandoned:?}");
    assert!(abandoned[0].join(checkpoint::step_dir_name(10)).is_dir());
}

/// A manifest whose `config_hash` is not ASCII (byte 12 inside a character) made the resume's
/// config-hash message slice a string mid-character and panic.
#[test]
fn a_non_ascii_config_hash_is_an_error_naming_the_manifest_not_a_panic() {
    let f = common::fixture(16);
    let dir = f.dir.path().join("run");
    run(&config(&f, &dir, 5, &[]), None).unwrap();
    let ck = step_dir(&dir, 5);
    let mp = ck.join(checkpoint::MANIFEST);
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&mp).unwrap()).unwrap();
    v["config_hash"] = format!("a{}", "é".repeat(40)).into();
    fs::write(&mp, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let cfg = config(&f, &dir, 6, &[]);
    let r = std::panic::catch_unwind(|| run(&cfg, Some(ResumeFrom::Path(ck.clone()))));
    let e = r.expect("no panic").unwrap_err().to_string();
    assert!(e.contains("manifest.json"), "{e}");
}

/// lr = 1e30 makes every step after the first non-finite. The run used to skip forever, exit 0 and
/// let its later saves (keep_checkpoints = 1) prune the checkpoint from before the blow-up.
#[test]
fn a_run_that_stays_non_finite_stops_and_keeps_its_good_checkpoint() {
    let f = common::fixture(16);
    let dir = f.dir.path().join("run");
    let cfg = config(
        &f,
        &dir,
        30,
        &[
            "optim.lr=1e30",
            "optim.weight_decay=0.0",
            "optim.grad_clip=1e30",
            "schedule.checkpoint_every=1",
            "schedule.keep_checkpoints=1",
            "schedule.max_nonfinite_steps=3",
        ],
    );
    let e = run(&cfg, None).unwrap_err().to_string();
    assert!(
        e.contains("3 consecutive") && e.contains("non-finite"),
        "{e}"
    );
    // step 0 is finite (its update blows the weights up), steps 1.. are not
    let good = step_dir(&dir, 1);
    assert!(e.contains(&good.display().to_string()), "{e}");
    let ck = Checkpoint::open_verified(&good).unwrap();
    assert_eq!(
        ck.manifest.skipped_steps, 0,
        "a checkpoint from before the blow-up"
    );
    assert_eq!(steps_on_disk(&dir), vec![3, 2, 1]);
}

#[test]
fn every_model_dimension_has_an_upper_bound_naming_the_key() {
    let f = common::fixture(4);
    let out = f.dir.path().join("run");
    let text = common::tiny_config_text(&f.data, &out, "", "[schedule]\ntotal_steps = 1\n");
    for (set, key) in [
        ("model.model_channels=1000000000", "model.model_channels"),
        ("model.image_size=1048576", "model.image_size"),
        ("model.in_channels=100000", "model.in_channels"),
        ("model.num_res_blocks=100000", "model.num_res_blocks"),
        (
            "model.channel_mult=[1,2,2,2,2,2,2,2,2,2,2,2,2]",
            "model.channel_mult",
        ),
        ("model.channel_mult=[1,100000]", "model.channel_mult"),
        ("model.num_classes=1000000000", "model.num_classes"),
        ("model.num_heads=100000", "model.num_heads"),
        ("model.num_groups=100000", "model.num_groups"),
        ("diffusion.timesteps=1000000", "diffusion.timesteps"),
    ] {
        let ov = Overrides {
            sets: vec![set.into()],
            ..Default::default()
        };
        let e = TrainConfig::from_toml_str(&text, &ov)
            .expect_err(set)
            .to_string();
        assert!(e.starts_with(key), "--set {set}: {e}");
    }
}

/// Re-converting the data file in place (same path, so the same config hash) used to go unnoticed
/// on resume: only the path string was hashed.
#[test]
fn resuming_on_different_data_is_an_error_naming_both_datasets() {
    let f = common::fixture(16);
    let dir = f.dir.path().join("run");
    run(&config(&f, &dir, 5, &[]), None).unwrap();
    let ck = Checkpoint::open_verified(&step_dir(&dir, 5)).unwrap();
    let then = ck
        .manifest
        .dataset
        .clone()
        .expect("the manifest records the dataset");
    assert_eq!(then.n, 16);
    std::fs::remove_file(&f.data).unwrap();
    common::make_dataset(&f.data, 18);
    let e = run(&config(&f, &dir, 6, &[]), Some(ResumeFrom::Auto))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&then.to_string()) && e.contains("N=18") && e.contains("data.path"),
        "{e}"
    );
}
