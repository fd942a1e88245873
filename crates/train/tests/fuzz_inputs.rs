//! Bounded fuzz passes over the trainer's file readers: the TOML config and the safetensors files of
//! a checkpoint. Mutations of valid fixtures (`ddpm_io::mutate`) must be accepted or
//! rejected with an error naming the file, never panic or abort. The manifest reader has its own
//! pass in ddpm-checkpoint. `DDPM_FUZZ_ITERS=N cargo test -p ddpm-train --test fuzz_inputs` runs N
//! inputs per reader instead of the default.

mod common;

use std::fs;

use candle_core::Device;
use ddpm_checkpoint::{self as checkpoint, Checkpoint};
use ddpm_config::{Overrides, TrainConfig};
use ddpm_dist::SingleProcess;
use ddpm_io::mutate::{iterations, Mutator};
use ddpm_train::trainer::{train, TrainOptions};

#[test]
fn fuzz_toml_config() {
    let f = common::fixture(4);
    let valid = common::tiny_config_text(
        &f.data,
        &f.dir.path().join("run"),
        "",
        "[schedule]\ntotal_steps = 3\ncheckpoint_every = 1\n[diffusion]\ntimesteps = 50\n",
    );
    let path = f.dir.path().join("fuzz.toml");
    let shown = path.display().to_string();
    let n = iterations(3000);
    let mut rng = Mutator::new(7);
    let mut rejected = 0;
    for i in 0..n {
        let input = rng.mutate(valid.as_bytes());
        fs::write(&path, &input).unwrap();
        let r = std::panic::catch_unwind(|| TrainConfig::load(&path, &Overrides::default()));
        match r {
            Err(_) => panic!("input {i} panicked:\n{}", String::from_utf8_lossy(&input)),
            Ok(Ok(cfg)) => {
                // accepted: must be buildable within the bounds (no model is built here)
                cfg.validate().unwrap();
            }
            Ok(Err(e)) => {
                rejected += 1;
                let s = e.to_string();
                assert!(s.contains(&shown), "input {i}: {s}");
            }
        }
    }
    assert!(rejected > n / 4, "only {rejected} of {n} rejected");
}

#[test]
fn fuzz_safetensors_checkpoint_files() {
    let f = common::fixture(8);
    let run = f.dir.path().join("run");
    let text = common::tiny_config_text(&f.data, &run, "", "[schedule]\ntotal_steps = 1\n");
    let cfg = common::load(&text, &Overrides::default());
    train(&cfg, &SingleProcess::new(), TrainOptions::default()).unwrap();
    let (_, dir) = checkpoint::list_checkpoints(&run).remove(0);
    let ck = Checkpoint::open_verified(&dir).unwrap();
    let file = dir.join(checkpoint::MODEL_FILE);
    let valid = fs::read(&file).unwrap();
    let expected: Vec<(String, Vec<usize>)> = {
        let st = safetensors::SafeTensors::deserialize(&valid).unwrap();
        let mut v: Vec<(String, Vec<usize>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.shape().to_vec()))
            .collect();
        v.sort();
        v
    };
    // Mutations near the front reach the header (JSON with dtypes, shapes and offsets), where the
    // bounds live; the tensor bytes after it are opaque.
    let head = valid.len().min(4096);
    let n = iterations(2000);
    let mut rng = Mutator::new(11);
    let mut rejected = 0;
    for i in 0..n {
        let mut input = rng.mutate(&valid[..head]);
        input.extend_from_slice(&valid[head..]);
        fs::write(&file, &input).unwrap();
        let r = std::panic::catch_unwind(|| {
            (
                ck.load_tensors(checkpoint::MODEL_FILE, &expected, &Device::Cpu)
                    .map(|_| ()),
                ck.load_all(checkpoint::MODEL_FILE, &Device::Cpu)
                    .map(|_| ()),
            )
        });
        let (a, b) = r.unwrap_or_else(|_| panic!("input {i} panicked"));
        rejected += usize::from(a.is_err());
        for e in [a.err(), b.err()].into_iter().flatten() {
            assert_eq!(e.path(), file, "input {i}: {e}");
        }
    }
    assert!(rejected > n / 4, "only {rejected} of {n} rejected");
}
