//! `train.precision = "bf16"`: mixed-precision training follows the f32 run on the quickstart model,
//! and everything it keeps (weights, EMAs, optimizer moments) stays f32.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use ddpm_checkpoint::Checkpoint;
use ddpm_config::{Overrides, TrainConfig};
use ddpm_data::{DatasetMeta, DatasetWriter, WriteOptions};
use ddpm_dist::SingleProcess;
use ddpm_train::trainer::{train, TrainOptions};

const STEPS: u64 = 30;

/// 28x28 grey images of 10 classes (class k: a bright bar at row 2 + 2k, shifted with the index),
/// the shape and label count of Fashion-MNIST, so the quickstart config runs unchanged.
fn make_dataset(path: &Path, n: usize) {
    let mut w = DatasetWriter::create(path, n, [28, 28, 1], &WriteOptions::default()).unwrap();
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % 10;
        let shift = (i / 10) % 8;
        let mut img = vec![10u8; 28 * 28];
        for r in [2 + 2 * class, 3 + 2 * class] {
            for c in shift..shift + 20 {
                img[r * 28 + c] = 240;
            }
        }
        w.push_images(&img).unwrap();
        labels.push(class as i64);
    }
    w.push_labels(&labels);
    w.finish(&DatasetMeta {
        source: "synthetic bars, 10 classes (ddpm-train precision test)".into(),
        class_names: Some((0..10).map(|k| format!("bar{k}")).collect()),
    })
    .unwrap();
}

/// `configs/quickstart.toml` with the test's data, output directory, step count and precision.
fn quickstart(data: &Path, out: &Path, precision: &str) -> TrainConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/quickstart.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let ov = Overrides {
        sets: vec![
            format!("data.path={:?}", data.display().to_string()),
            format!("schedule.total_steps={STEPS}"),
            "schedule.log_every=10".into(),
            "schedule.checkpoint_every=1000".into(),
            format!("train.precision={precision:?}"),
            // the end-of-run preview grid is not what this test is about
            "preview.per_class=1".into(),
            "preview.steps=2".into(),
        ],
        out: Some(out.to_path_buf()),
        ..Default::default()
    };
    TrainConfig::from_toml_str(&text, &ov).unwrap()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The two runs see the same weights at step 0, the same batches, timesteps, noise and label
/// dropout; only the arithmetic differs. bf16 keeps 8 significant bits (relative rounding 2^-9 =
/// 0.2% per value), but the loss averages 25,088 squared errors per step, so independent
/// rounding mostly cancels and what remains is the slow drift of the weights. Measured here
/// (2026-12-02, avx2 avx512f): at most 0.47% per step, 0.07% per 10-step window. The bounds,
/// about 4x and 7x that: every step within 2%, each 10-step window's mean within 0.5%; both
/// curves must fall, and bf16 must differ from f32 somewhere (else bf16 was not in use).
#[test]
fn bf16_follows_f32_on_the_quickstart_model_and_checkpoints_stay_f32() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bars28.h5");
    make_dataset(&data, 320);
    let comm = SingleProcess::new();
    let mut losses = Vec::new();
    for precision in ["f32", "bf16"] {
        let out = dir.path().join(precision);
        let cfg = quickstart(&data, &out, precision);
        let outcome = train(&cfg, &comm, TrainOptions::default()).unwrap();
        assert_eq!(outcome.step, STEPS);
        assert_eq!(outcome.skipped_steps, 0, "{precision}: non-finite steps");
        let ck = Checkpoint::open_verified(outcome.checkpoint.as_ref().unwrap()).unwrap();
        for f in ck
            .manifest
            .files
            .iter()
            .filter(|f| f.name.ends_with(".safetensors"))
        {
            // weights, EMAs and moments f32; the trainer's own counters may be f64
            let state = f.name.starts_with("trainer_state");
            for (name, t) in ck.load_all(&f.name, &Device::Cpu).unwrap() {
                let ok = t.dtype() == DType::F32 || (state && t.dtype() == DType::F64);
                assert!(ok, "{precision}: {} / {name} is {:?}", f.name, t.dtype());
            }
        }
        losses.push(outcome.step_losses);
    }
    let (f32s, bf16s) = (&losses[0], &losses[1]);
    assert_ne!(
        f32s, bf16s,
        "the bf16 run computed exactly what f32 did: bf16 not in use"
    );
    let rels: Vec<f64> = f32s
        .iter()
        .zip(bf16s)
        .map(|(a, b)| (b - a).abs() / a.abs())
        .collect();
    println!(
        "per-step relative loss difference bf16 vs f32: max {:.4}, mean {:.4}",
        rels.iter().fold(0f64, |m, &r| m.max(r)),
        mean(&rels)
    );
    for (i, (a, b)) in f32s.iter().zip(bf16s).enumerate() {
        let rel = rels[i];
        assert!(
            rel < 0.02,
            "step {i}: bf16 loss {b} vs f32 {a} (rel {rel:.3})"
        );
    }
    for w in 0..3 {
        let r = w * 10..(w + 1) * 10;
        let (a, b) = (mean(&f32s[r.clone()]), mean(&bf16s[r]));
        let rel = (b - a).abs() / a;
        println!(
            "steps {}..{}: mean loss f32 {a:.5}, bf16 {b:.5} (rel {rel:.4})",
            w * 10,
            w * 10 + 10
        );
        assert!(
            rel < 0.005,
            "steps {}..{}: mean loss bf16 {b} vs f32 {a} (rel {rel:.4})",
            w * 10,
            w * 10 + 10
        );
    }
    for l in &losses {
        assert!(
            mean(&l[20..]) < 0.8 * mean(&l[..10]),
            "the loss did not fall: {l:?}"
        );
    }
}
