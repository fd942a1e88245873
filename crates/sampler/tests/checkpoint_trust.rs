//! Issue 13, the sampler's side: the manifest is not trusted (an edited config, a huge model
//! dimension) and a damaged EMA file makes the run-directory lookup fall back to an older
//! checkpoint, as the trainer does, instead of failing at load time.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ddpm_checkpoint::{step_dir_name, Checkpoint, Weights, CHECKPOINTS_DIR, MANIFEST};

/// A run of 4 steps with checkpoints at 2 and 4, written by the trainer library.
fn write_run(root: &Path) -> PathBuf {
    let data = root.join("d.h5");
    let n = 8;
    let bytes: Vec<u8> = (0..n * 64).map(|i| (i * 37 % 251) as u8).collect();
    let labels: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
    ddpm_sampler::images::write_samples_h5(
        &data,
        &bytes,
        n,
        [8, 8, 1],
        Some((&labels, vec!["a".into(), "b".into()])),
        "test",
    )
    .unwrap();
    let run = root.join("run");
    let text = format!(
        "seed = 0\nout_dir = \"{out}\"\n\n\
         [model]\nimage_size = 8\nin_channels = 1\nmodel_channels = 8\nnum_res_blocks = 1\n\
         attention_resolutions = [4]\nchannel_mult = [1, 2]\nnum_classes = 2\nnum_heads = 1\n\
         num_groups = 4\n\n\
         [diffusion]\nschedule = \"cosine\"\ntimesteps = 20\n\n\
         [data]\npath = \"{data}\"\nbatch = 4\n\n[optim]\nlr = 1e-3\n\n[ema]\nrates = [0.9]\n\n\
         [schedule]\ntotal_steps = 4\ncheckpoint_every = 2\nlog_every = 4\n\n\
         [preview]\nsteps = 2\nper_class = 1\n",
        out = run.display(),
        data = data.display()
    );
    let cfg =
        ddpm_train::TrainConfig::from_toml_str(&text, &ddpm_train::Overrides::default()).unwrap();
    ddpm_train::train(
        &cfg,
        &ddpm_dist::SingleProcess::new(),
        ddpm_train::TrainOptions::default(),
    )
    .unwrap();
    run
}

fn ck(run: &Path, step: u64) -> PathBuf {
    run.join(CHECKPOINTS_DIR).join(step_dir_name(step))
}

/// Rewrites a manifest with `edit` applied to its JSON, optionally resealed (`manifest_sha256`
/// recomputed) so that only the deeper checks can catch the edit.
fn edit_manifest(dir: &Path, reseal: bool, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(MANIFEST);
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    let text = if reseal {
        let m: ddpm_checkpoint::Manifest = serde_json::from_value(v).unwrap();
        m.to_sealed_json()
    } else {
        serde_json::to_string_pretty(&v).unwrap()
    };
    fs::write(&p, text).unwrap();
}

#[test]
fn a_damaged_ema_file_falls_back_to_the_previous_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let run = write_run(root.path());
    fs::write(ck(&run, 4).join("ema_0.9.safetensors"), b"damaged").unwrap();
    let mut warnings = Vec::new();
    let c = Checkpoint::resolve(&run, |e| warnings.push(e.to_string())).unwrap();
    assert_eq!(c.step(), 2);
    assert!(
        warnings.len() == 1 && warnings[0].contains("ema_0.9"),
        "{warnings:?}"
    );
    c.load_unet(Weights::Ema(None), DType::F32, &Device::Cpu)
        .unwrap();
}

#[test]
fn an_edited_config_is_refused_naming_the_manifest() {
    let root = tempfile::tempdir().unwrap();
    let run = write_run(root.path());
    let dir = ck(&run, 4);
    // silently wrong samples before: the model was trained to predict eps
    edit_manifest(&dir, false, |v| {
        v["config"]["diffusion"]["prediction"] = "v".into()
    });
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("manifest.json") && e.contains("manifest_sha256"),
        "{e}"
    );
    edit_manifest(&dir, true, |_| {});
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains("manifest.json") && e.contains("config_hash"),
        "{e}"
    );
}

#[test]
fn a_huge_model_dimension_in_a_manifest_is_an_error_naming_the_key() {
    let root = tempfile::tempdir().unwrap();
    let run = write_run(root.path());
    let dir = ck(&run, 4);
    for (key, value) in [("model_channels", 1u64 << 20), ("num_res_blocks", 1 << 20)] {
        // resealed and re-hashed: a consistent manifest describing a model too large to build
        edit_manifest(&dir, true, |v| {
            v["config"]["model"]["model_channels"] = 8.into();
            v["config"]["model"][key] = value.into();
            let excluded: Vec<String> =
                serde_json::from_value(v["hash_excluded_keys"].clone()).unwrap();
            v["config_hash"] = ddpm_checkpoint::config_hash(&v["config"], &excluded).into();
        });
        let c = Checkpoint::open(&dir).unwrap();
        let e = c
            .load_unet(Weights::Model, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("manifest.json") && e.contains(key) && e.contains("at most"),
            "{e}"
        );
    }
    edit_manifest(&dir, true, |v| {
        v["config"]["model"]["num_res_blocks"] = 1.into();
        v["config"]["diffusion"]["timesteps"] = (1u64 << 40).into();
        let excluded: Vec<String> =
            serde_json::from_value(v["hash_excluded_keys"].clone()).unwrap();
        v["config_hash"] = ddpm_checkpoint::config_hash(&v["config"], &excluded).into();
    });
    let e = Checkpoint::open(&dir)
        .unwrap()
        .diffusion()
        .unwrap_err()
        .to_string();
    assert!(e.contains("diffusion.timesteps"), "{e}");
}
