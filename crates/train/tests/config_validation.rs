//! Every bad value is rejected before any work starts, with an error that names the key.

mod common;

use std::path::Path;

use ddpm_config::{Overrides, TrainConfig};

fn base(extra: &str) -> String {
    common::tiny_config_text(
        Path::new("/nonexistent/data.h5"),
        Path::new("/tmp/out"),
        "",
        &format!("[schedule]\ntotal_steps = 10\n{extra}"),
    )
}

fn err_with(text: &str, sets: &[&str]) -> String {
    let ov = Overrides {
        sets: sets.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    match TrainConfig::from_toml_str(text, &ov) {
        Ok(_) => panic!("config with {sets:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_base_config_is_valid() {
    let c = TrainConfig::from_toml_str(&base(""), &Overrides::default()).unwrap();
    assert_eq!(c.schedule.total_steps, 10);
    assert_eq!(c.data.batch, 8);
}

/// `time = "continuous"` and its keys: each mismatch names the key it is about.
#[test]
fn continuous_time_keys_are_validated() {
    let ok = base("[diffusion]\ntime = \"continuous\"\nschedule = \"learned\"\nloss = \"vlb\"\n");
    let c = TrainConfig::from_toml_str(&ok, &Overrides::default()).unwrap();
    let spec = c.diffusion.continuous().unwrap();
    assert_eq!((spec.gamma_min, spec.gamma_max), (-13.3, 5.0));
    // the default stays discrete, and a discrete config hashes as before the keys existed
    let d = TrainConfig::from_toml_str(&base(""), &Overrides::default()).unwrap();
    assert!(d.diffusion.continuous().is_none());
    assert!(!d.canonical_json().contains("\"time\""));
    let cases: &[(&str, &str)] = &[
        ("diffusion.prediction=\"v\"", "diffusion.prediction"),
        ("diffusion.loss=\"simple\"", "diffusion.loss"),
        (
            "diffusion.timestep_sampling=\"loss_aware\"",
            "diffusion.timestep_sampling",
        ),
        ("diffusion.min_snr_gamma=5", "diffusion.min_snr_gamma"),
        ("diffusion.gamma_min=6", "diffusion.gamma_min"),
        ("diffusion.schedule_hidden=0", "diffusion.schedule_hidden"),
    ];
    for (set, want) in cases {
        let e = err_with(&ok, &[set]);
        assert!(
            e.contains(want),
            "--set {set}: error {e:?} does not mention {want:?}"
        );
    }
    let discrete = [
        ("diffusion.schedule=\"learned\"", "diffusion.schedule"),
        ("diffusion.gamma_max=3", "diffusion.gamma_max"),
        ("diffusion.schedule_hidden=8", "diffusion.schedule_hidden"),
    ];
    for (set, want) in discrete {
        let e = err_with(&base(""), &[set]);
        assert!(
            e.contains(want),
            "--set {set}: error {e:?} does not mention {want:?}"
        );
    }
    let fixed = err_with(
        &ok,
        &[
            "diffusion.schedule=\"cosine\"",
            "diffusion.schedule_hidden=8",
        ],
    );
    assert!(fixed.contains("diffusion.schedule_hidden"), "{fixed}");
}

#[test]
fn bad_values_name_their_key() {
    let cases: &[(&str, &str)] = &[
        ("optim.lr=-1", "optim.lr must be > 0, got -1"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]"),
        ("optim.eps=0", "optim.eps"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.grad_clip=0", "optim.grad_clip"),
        ("data.batch=0", "data.batch"),
        ("ema.rates=[]", "ema.rates"),
        ("ema.rates=[0.9, 1.5]", "ema.rates[1]"),
        ("ema.rates=[0.9, 0.9]", "ema.rates[1]"),
        ("schedule.total_steps=0", "schedule.total_steps"),
        ("schedule.log_every=0", "schedule.log_every"),
        ("schedule.checkpoint_every=0", "schedule.checkpoint_every"),
        ("schedule.keep_checkpoints=0", "schedule.keep_checkpoints"),
        ("diffusion.timesteps=1", "diffusion.timesteps"),
        (
            "diffusion.timesteps=10",
            "diffusion does not give a valid process (schedule = \"linear\", timesteps = 10)",
        ),
        ("diffusion.label_dropout=1.0", "diffusion.label_dropout"),
        (
            "diffusion.classifier_noised=false",
            "diffusion.classifier_noised",
        ),
        ("diffusion.min_snr_gamma=-5", "diffusion.min_snr_gamma"),
        ("dist.bucket_mb=0", "dist.bucket_mb"),
        ("dist.timeout_s=0", "dist.timeout_s"),
        ("dist.timeout_s=1e12", "dist.timeout_s"),
        (
            "train.accumulate=0",
            "train.accumulate must be in 1..=4096, got 0",
        ),
        ("train.accumulate=5000", "train.accumulate"),
        ("diffusion.loss=\"hybrid\"", "diffusion.loss"),
        ("diffusion.variance=\"learned_range\"", "model.learn_sigma"),
        ("preview.steps=1", "preview.steps"),
        ("preview.guidance=2.0", "preview.guidance"),
        ("preview.ema_rate=0.5", "preview.ema_rate"),
        ("model.num_heads=3", "model.num_heads"),
        ("model.channel_mult=[1, 2, 2, 2, 2]", "model.channel_mult"),
        ("model.num_groups=5", "model.num_groups"),
        ("model.dropout=1.5", "model.dropout"),
        ("out_dir=\"\"", "out_dir"),
    ];
    for (set, want) in cases {
        let e = err_with(&base(""), &[set]);
        assert!(
            e.contains(want),
            "--set {set}: error {e:?} does not mention {want:?}"
        );
    }
}

#[test]
fn unknown_keys_are_rejected() {
    let e = err_with(
        &base("").replace("[optim]\n", "[optim]\nlearning_rate = 1\n"),
        &[],
    );
    assert!(
        e.contains("optim.learning_rate") && e.contains("unknown field"),
        "{e}"
    );
    let e = err_with(&base("").replace("seed = 7", "seed = 7\nsede = 8"), &[]);
    assert!(e.contains("sede"), "{e}");
    let e = err_with(&base(""), &["optim.lrr=1e-3"]);
    assert!(e.contains("optim.lrr"), "{e}");
    let e = err_with(&base(""), &["model.widht=3"]);
    assert!(e.contains("widht"), "{e}");
}

#[test]
fn bad_overrides_are_explained() {
    let e = err_with(&base(""), &["optim.lr"]);
    assert!(e.contains("key.path=value"), "{e}");
    let e = err_with(&base(""), &["optim.lr=abc"]);
    assert!(e.contains("optim.lr") && e.contains("expected f64"), "{e}");
    let e = err_with(&base(""), &["optim.lr=[1,"]);
    assert!(e.contains("not valid TOML"), "{e}");
    let e = err_with(&base(""), &["seed.x=1"]);
    assert!(e.contains("seed is not a table"), "{e}");
    let e = err_with(&base(""), &["diffusion.prediction=velocity"]);
    assert!(
        e.contains("diffusion.prediction") && e.contains("velocity"),
        "{e}"
    );
}

#[test]
fn overrides_and_flags_apply() {
    let ov = Overrides {
        sets: vec![
            "optim.lr=1e-4".into(),
            "diffusion.schedule=cosine".into(),
            "diffusion.prediction=\"v\"".into(),
            "ema.rates=[0.5]".into(),
        ],
        steps: Some(99),
        batch: Some(3),
        out: Some("/tmp/elsewhere".into()),
    };
    let c = TrainConfig::from_toml_str(&base(""), &ov).unwrap();
    assert_eq!(c.optim.lr, 1e-4);
    assert_eq!(c.diffusion.schedule, ddpm_config::Schedule::Cosine);
    assert_eq!(c.diffusion.prediction, ddpm_config::Prediction::V);
    assert_eq!(c.ema.rates, vec![0.5]);
    assert_eq!(c.schedule.total_steps, 99);
    assert_eq!(c.data.batch, 3);
    assert_eq!(c.out_dir(), Path::new("/tmp/elsewhere"));
    // flags are validated too
    let e = TrainConfig::from_toml_str(
        &base(""),
        &Overrides {
            batch: Some(0),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("data.batch"), "{e}");
}

#[test]
fn hash_ignores_only_the_excluded_keys() {
    let a = TrainConfig::from_toml_str(&base(""), &Overrides::default()).unwrap();
    let same = |sets: &[&str], steps: Option<u64>| {
        let ov = Overrides {
            sets: sets.iter().map(|s| s.to_string()).collect(),
            steps,
            ..Default::default()
        };
        TrainConfig::from_toml_str(&base(""), &ov).unwrap().hash() == a.hash()
    };
    assert!(same(&[], Some(1000)));
    assert!(same(
        &[
            "schedule.log_every=3",
            "schedule.checkpoint_every=7",
            "preview.steps=2"
        ],
        None
    ));
    assert!(same(
        &["out_dir=\"/x\"", "data.prefetch=9", "data.batch=4"],
        None
    ));
    assert!(!same(&["optim.lr=1e-4"], None));
    assert!(!same(&["seed=8"], None));
    assert!(!same(&["model.model_channels=16"], None));
    assert!(!same(&["data.flip=false"], None));
    // accumulation changes the global batch (and resume refuses that); the default hashes as before
    assert!(!same(&["train.accumulate=2"], None));
    assert!(same(&["train.accumulate=1"], None));
    assert_eq!(a.hash().len(), 64);
}

#[test]
fn shipped_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for name in ["quickstart.toml", "fashion-mnist.toml", "cifar10.toml"] {
        let p = root.join(name);
        TrainConfig::load(&p, &Overrides::default())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}

#[test]
fn missing_keys_are_named() {
    let text = base("");
    let e = err_with(&text.replace("lr = 2e-3\n", ""), &[]);
    assert!(e.contains("optim: missing field `lr`"), "{e}");
    let cut = text.find("[data]").unwrap();
    let end = text.find("[optim]").unwrap();
    let e = err_with(&format!("{}{}", &text[..cut], &text[end..]), &[]);
    assert!(e.contains("missing field `data`"), "{e}");
}
