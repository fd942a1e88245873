//! A short training run on a tiny model: the loss falls, the run directory has everything a user
//! looks at, and the checkpoint tensors are readable by name. Fast enough for CI (a few seconds).

mod common;

use ddpm_checkpoint::{self as checkpoint, Checkpoint};
use ddpm_config::Overrides;
use ddpm_dist::SingleProcess;
use ddpm_train::trainer::{read_metrics, train, TrainOptions};

#[test]
fn loss_falls_and_outputs_exist() {
    let f = common::fixture(64);
    let out = f.dir.path().join("run");
    let text = common::tiny_config_text(
        &f.data,
        &out,
        "",
        "[diffusion]\nlabel_dropout = 0.1\n\n[schedule]\ntotal_steps = 60\nlog_every = 10\ncheckpoint_every = 25\nsample_every = 50\nkeep_checkpoints = 2\n",
    );
    let mut cfg = common::load(&text, &Overrides::default());
    cfg.optim.lr = 5e-3;
    let comm = SingleProcess::new();
    let res = train(&cfg, &comm, TrainOptions::default()).unwrap();
    assert_eq!(res.step, 60);
    assert_eq!(res.skipped_steps, 0);

    let lines = read_metrics(&out).unwrap();
    assert_eq!(lines.len(), 6);
    for (k, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], (k as u64 + 1) * 10);
        for key in [
            "loss",
            "loss_q0",
            "loss_q3",
            "grad_norm",
            "lr",
            "images_per_sec",
            "sync_ms",
            "step_ms",
            "skipped_steps",
            "mse",
        ] {
            assert!(!l[key].is_null(), "{key} missing in {l}");
        }
    }
    let first = lines[0]["loss"].as_f64().unwrap();
    let last = lines[5]["loss"].as_f64().unwrap();
    eprintln!("loss: first window {first:.4}, last window {last:.4}");
    assert!(
        last < 0.6 * first,
        "loss did not fall enough: {first} -> {last}"
    );

    // checkpoints 25, 50 and the final 60; keep 2
    let cks: Vec<u64> = checkpoint::list_checkpoints(&out)
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(cks, vec![60, 50]);
    let ck =
        Checkpoint::open_verified(&out.join("checkpoints").join(checkpoint::step_dir_name(60)))
            .unwrap();
    assert_eq!(ck.manifest.step, 60);
    assert_eq!(ck.manifest.config_hash, cfg.hash());
    let model = ck
        .load_all(checkpoint::MODEL_FILE, &candle_core::Device::Cpu)
        .unwrap();
    assert!(
        model.contains_key("input_blocks.0.0.weight"),
        "{:?}",
        model.keys()
    );
    assert!(model.contains_key("label_emb.weight"));
    let opt = ck
        .load_all(checkpoint::OPTIMIZER_FILE, &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(opt.len(), 2 * model.len());
    assert!(opt.contains_key("exp_avg.input_blocks.0.0.weight"));
    assert!(opt.contains_key("exp_avg_sq.input_blocks.0.0.weight"));
    for r in ["0.9", "0.99"] {
        let e = ck
            .load_all(&format!("ema_{r}.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
        assert_eq!(e.len(), model.len());
    }

    // the sampler's entry points: config and EMA model from the checkpoint, deterministic output
    let unet = ck
        .load_unet(
            ddpm_checkpoint::Weights::Ema(None),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
    assert_eq!(ck.config().unwrap(), cfg);
    assert_eq!(
        ck.weights_file(ddpm_checkpoint::Weights::Ema(None))
            .unwrap(),
        "ema_0.9.safetensors"
    );
    assert!(ck
        .weights_file(ddpm_checkpoint::Weights::Ema(Some(0.5)))
        .is_err());
    let x = candle_core::Tensor::zeros(
        (2, 1, 8, 8),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let t = candle_core::Tensor::new(&[10f32, 500.0], &candle_core::Device::Cpu).unwrap();
    let y = candle_core::Tensor::new(&[0u32, 2], &candle_core::Device::Cpu).unwrap();
    let o = unet
        .forward(&x, &t, Some(&y), &ddpm_unet::ForwardCtx::eval())
        .unwrap();
    assert_eq!(o.dims(), &[2, 1, 8, 8]);

    // pictures: previews at 50 and at the end, a loss plot, the resolved config
    for p in [
        "samples.png",
        "loss.png",
        "config.toml",
        "samples/step_000000050.png",
        "samples/step_000000060.png",
    ] {
        let path = out.join(p);
        assert!(
            path.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "{} missing",
            path.display()
        );
    }
    assert_eq!(
        res.sample_grid.as_deref(),
        Some(out.join("samples.png").as_path())
    );
}

#[test]
fn classifier_task_trains() {
    let f = common::fixture(32);
    let out = f.dir.path().join("clf");
    let text = format!(
        r#"
task = "classifier"
seed = 3
out_dir = "{out}"

[classifier]
image_size = 8
in_channels = 1
model_channels = 8
num_res_blocks = 1
attention_resolutions = [4]
channel_mult = [1, 2]
num_classes = 2
num_groups = 4
pool = "adaptive"

[diffusion]
timesteps = 50

[data]
path = "{data}"
batch = 8

[optim]
lr = 3e-3

[ema]
rates = [0.9]

[schedule]
total_steps = 40
log_every = 10
"#,
        out = out.display(),
        data = f.data.display()
    );
    let cfg = common::load(&text, &Overrides::default());
    let comm = SingleProcess::new();
    let res = train(&cfg, &comm, TrainOptions::default()).unwrap();
    assert_eq!(res.step, 40);
    let lines = read_metrics(&out).unwrap();
    assert_eq!(lines.len(), 4);
    assert!(
        lines.iter().all(|l| l["accuracy"].as_f64().is_some()),
        "{lines:?}"
    );
    let first = lines[0]["loss"].as_f64().unwrap();
    let last = lines[3]["loss"].as_f64().unwrap();
    eprintln!(
        "classifier loss {first:.4} -> {last:.4}, accuracy {}",
        lines[3]["accuracy"]
    );
    assert!(
        last < first,
        "classifier loss did not fall: {first} -> {last}"
    );
    assert!(res.sample_grid.is_none());
    assert!(out.join("loss.png").exists());
    let ck = Checkpoint::open_verified(res.checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(ck.manifest.task, "classifier");
}

#[test]
fn non_finite_steps_are_skipped_and_counted() {
    // An absurd learning rate blows the weights up after the first update; from then on the
    // forward pass overflows, every step must be skipped (not applied), and the weights, EMA and
    // moments must stay finite.
    let f = common::fixture(16);
    let out = f.dir.path().join("nan");
    let text = common::tiny_config_text(
        &f.data,
        &out,
        "",
        "[schedule]\ntotal_steps = 6\nlog_every = 1\n",
    );
    let mut cfg = common::load(&text, &Overrides::default());
    cfg.optim.lr = 1e30;
    cfg.optim.weight_decay = 0.0;
    cfg.optim.warmup_steps = 0;
    let comm = SingleProcess::new();
    let res = train(&cfg, &comm, TrainOptions::default()).unwrap();
    assert_eq!(res.step, 6);
    assert!(
        res.skipped_steps >= 1,
        "nothing was skipped: losses {:?}",
        res.step_losses
    );
    assert!(
        res.step_losses.iter().any(|l| !l.is_finite()),
        "{:?}",
        res.step_losses
    );
    let lines = read_metrics(&out).unwrap();
    assert_eq!(
        lines.last().unwrap()["skipped_steps"].as_u64(),
        Some(res.skipped_steps)
    );
    let ck = Checkpoint::open_verified(res.checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(ck.manifest.skipped_steps, res.skipped_steps);
    assert_eq!(
        ck.manifest.optimizer.t,
        6 - res.skipped_steps,
        "skipped steps must not advance AdamW"
    );
    for file in [
        checkpoint::MODEL_FILE,
        checkpoint::OPTIMIZER_FILE,
        "ema_0.9.safetensors",
    ] {
        for (name, t) in ck.load_all(file, &candle_core::Device::Cpu).unwrap() {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{file}: {name} has non-finite values"
            );
        }
    }
}
