//! The conformance checker must be able to fail. Each test runs it on a temporary copy of reference
//! files with one deliberate defect and asserts that the defect is reported.

use std::path::{Path, PathBuf};

use ddpm_tests::{check_dir, Report};
use serde_json::Value;

fn repo_refs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("refs")
}

/// A temp dir holding copies of `files`, after `edit` has changed the parsed JSON of `target`.
fn copy_with(files: &[&str], target: &str, mut edit: impl FnMut(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        let text = std::fs::read_to_string(repo_refs().join(f)).unwrap();
        let text = if *f == target {
            let mut v: Value = serde_json::from_str(&text).unwrap();
            edit(&mut v);
            serde_json::to_string(&v).unwrap()
        } else {
            text
        };
        std::fs::write(dir.path().join(f), text).unwrap();
    }
    dir
}

fn run(dir: &Path) -> Report {
    let r = check_dir(dir);
    eprintln!("{}", r.line());
    for f in &r.failures {
        eprintln!("  {f}");
    }
    r
}

fn scale_number(v: &mut Value, factor: f64, add: f64) {
    let x = v.as_f64().unwrap();
    *v = Value::from(x * factor + add);
}

#[test]
fn unmodified_copy_passes() {
    let dir = copy_with(&["q_sample.json"], "", |_| {});
    let r = run(dir.path());
    assert_eq!((r.files, r.failed), (1, 0));
    assert!(r.values > 0);
}

#[test]
fn repository_copy_has_all_eleven_files_and_passes() {
    let r = run(&repo_refs());
    assert_eq!(r.files, 11);
    assert_eq!(r.failed, 0, "{:?}", r.failures);
}

#[test]
fn perturbed_sde_trajectory_or_noise_fails() {
    // a late sample of the predictor-corrector case, 1e-8 relative (100x the f64 tolerance)
    let dir = copy_with(&["sde_samplers.json"], "sde_samplers.json", |v| {
        scale_number(
            &mut v["cases"][2]["expected"]["samples"][6][1][0][2][1],
            1.0 + 1e-8,
            1e-8,
        );
    });
    let r = run(dir.path());
    assert!(r.failed > 0);
    assert!(r.failures.iter().any(|f| f.contains("expected.samples")));
    // a stored noise draw of the EDM case changes the churned trajectory
    let dir = copy_with(&["sde_samplers.json"], "sde_samplers.json", |v| {
        scale_number(
            &mut v["cases"][4]["inputs"]["noise"][1][0][1][1][1],
            1.0,
            1e-6,
        );
    });
    let r = run(dir.path());
    assert!(r.failures.iter().any(|f| f.contains("edm_churn_capped_8")));
}

#[test]
fn perturbed_expected_value_fails() {
    // 1e-8 relative is 100x the f64 tolerance.
    let dir = copy_with(&["q_sample.json"], "q_sample.json", |v| {
        scale_number(
            &mut v["cases"][0]["expected"]["x_t"][1][2][3][4],
            1.0 + 1e-8,
            1e-8,
        );
    });
    let r = run(dir.path());
    assert!(r.failed > 0);
    assert!(r.failures.iter().any(|f| f.contains("expected.x_t")));
}

#[test]
fn perturbed_vdm_values_fail() {
    // The learned schedule's derivative at t = 0.5: read by the host and the tensor check.
    let dir = copy_with(&["vdm.json"], "vdm.json", |v| {
        scale_number(&mut v["cases"][2]["expected"]["dgamma"][4], 1.0 + 1e-9, 0.0);
    });
    let r = run(dir.path());
    assert_eq!(r.failed, 2, "{:?}", r.failures);
    // A changed network weight moves every value of the learned case.
    let dir = copy_with(&["vdm.json"], "vdm.json", |v| {
        scale_number(&mut v["cases"][2]["schedule"]["w2"][3], 1.0 + 1e-6, 0.0);
    });
    assert!(run(dir.path()).failed > 5);
    // The reconstruction term of the ELBO case.
    let dir = copy_with(&["vdm.json"], "vdm.json", |v| {
        scale_number(
            &mut v["cases"][4]["expected"]["reconstruction_bpd"][1],
            1.0 + 1e-9,
            0.0,
        );
    });
    let r = run(dir.path());
    assert!(
        r.failures.iter().any(|f| f.contains("reconstruction_bpd")),
        "{:?}",
        r.failures
    );
}

#[test]
fn perturbed_schedule_table_fails() {
    let dir = copy_with(&["schedules.json"], "schedules.json", |v| {
        scale_number(
            &mut v["cases"][3]["posterior_log_variance_clipped"][0],
            1.0 + 1e-9,
            0.0,
        );
    });
    let r = run(dir.path());
    assert_eq!(r.failed, 1, "{:?}", r.failures);
}

#[test]
fn perturbed_f32_reference_embedding_fails() {
    // 2e-6 is twice the f32 embedding tolerance; only the f32 path reads this field.
    let dir = copy_with(
        &["timestep_embedding.json"],
        "timestep_embedding.json",
        |v| {
            scale_number(
                &mut v["cases"][0]["expected"]["embedding_float32_reference"][4][3],
                1.0,
                2e-6,
            );
        },
    );
    let r = run(dir.path());
    assert_eq!(r.failed, 1, "{:?}", r.failures);
    assert!(r.failures[0].contains("embedding_float32_reference"));
}

#[test]
fn perturbed_trajectory_fails() {
    let dir = copy_with(&["dpm_solver.json"], "dpm_solver.json", |v| {
        scale_number(
            &mut v["cases"][0]["dpm_solver_pp_2m"]["samples"][20][1][2][3][0],
            1.0 + 1e-7,
            0.0,
        );
    });
    let r = run(dir.path());
    assert!(r.failed > 0);
    assert!(r
        .failures
        .iter()
        .any(|f| f.contains("dpm_solver_pp_2m.samples")));
}

#[test]
fn unknown_file_fails() {
    let dir = copy_with(&["min_snr.json"], "", |_| {});
    std::fs::write(dir.path().join("surprise.json"), "{}").unwrap();
    let r = run(dir.path());
    assert_eq!(r.failed, 1);
    assert!(r.failures[0].contains("surprise.json"));
}

#[test]
fn unread_field_fails() {
    let dir = copy_with(&["guidance.json"], "guidance.json", |v| {
        v["cases"][1]["expected"]["per_scale"][0]["bonus"] = Value::from(1.5);
    });
    let r = run(dir.path());
    assert_eq!(r.failed, 1, "{:?}", r.failures);
    assert!(r.failures[0].contains("cases[1].expected.per_scale[0].bonus was not checked"));
}

#[test]
fn missing_field_fails() {
    let dir = copy_with(&["vb_terms.json"], "vb_terms.json", |v| {
        v["cases"][0]["expected"]
            .as_object_mut()
            .unwrap()
            .remove("mse");
    });
    let r = run(dir.path());
    assert!(r.failed > 0);
    assert!(r
        .failures
        .iter()
        .any(|f| f.contains("missing field cases[0].expected.mse")));
}

#[test]
fn wrong_declared_shape_fails() {
    let dir = copy_with(&["ddpm_step.json"], "ddpm_step.json", |v| {
        v["cases"][0]["shapes"]["inputs.noise"] = serde_json::json!([4, 3, 8, 9]);
    });
    let r = run(dir.path());
    assert!(r.failed > 0);
}

#[test]
fn empty_directory_fails() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(dir.path());
    assert_eq!((r.files, r.failed), (0, 1));
}
