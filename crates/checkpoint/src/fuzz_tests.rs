//! Bounded fuzz pass over the manifest reader: mutations of a valid checkpoint's manifest must be
//! accepted or rejected with an error naming a file of the checkpoint, never panic, never read a
//! file outside the directory. `DDPM_FUZZ_ITERS=N` runs N inputs instead of the default.

use std::fs;
use std::path::Path;

use crate::{
    fixture_manifest, open_manifest, sha256_hex, verify_file, FileEntry, MANIFEST, MODEL_FILE,
};
use ddpm_io::mutate::{iterations, Mutator};

#[test]
fn fuzz_manifest_json() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("checkpoints").join("step_000000003");
    fs::create_dir_all(&dir).unwrap();
    let weights = b"not really safetensors";
    fs::write(dir.join(MODEL_FILE), weights).unwrap();
    let mut m = fixture_manifest(3);
    m.files = vec![FileEntry {
        name: MODEL_FILE.into(),
        bytes: weights.len() as u64,
        sha256: sha256_hex(weights),
    }];
    let valid = m.to_sealed_json().into_bytes();
    fs::write(dir.join(MANIFEST), &valid).unwrap();
    open_manifest(&dir).expect("the seed input is valid");

    let n = iterations(3000);
    let mut rng = Mutator::new(0x5eed);
    let (mut accepted, mut rejected) = (0usize, 0usize);
    for i in 0..n {
        let input = rng.mutate(&valid);
        fs::write(dir.join(MANIFEST), &input).unwrap();
        let outcome = std::panic::catch_unwind(|| check_one(&dir));
        match outcome {
            Ok(true) => accepted += 1,
            Ok(false) => rejected += 1,
            Err(_) => panic!("input {i} panicked: {:?}", String::from_utf8_lossy(&input)),
        }
    }
    assert_eq!(accepted + rejected, n);
    // the mutations must reach the checks, not only the JSON parser's first byte
    assert!(rejected > n / 2, "accepted {accepted}, rejected {rejected}");
}

/// True when accepted; a rejection must name a path inside the checkpoint directory.
fn check_one(dir: &Path) -> bool {
    match open_manifest(dir) {
        Ok(m) => {
            for f in &m.files {
                if let Err(e) = verify_file(dir, &m, &f.name) {
                    assert!(e.path().starts_with(dir), "{e} names {:?}", e.path());
                }
            }
            true
        }
        Err(e) => {
            assert!(e.path().starts_with(dir), "{e}");
            assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
            false
        }
    }
}
