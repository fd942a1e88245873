//! `mpirun -n 2` over the `mpi_shard_check` example: two real processes, each with its own Loader,
//! all-gather what they read and prove that no example was read twice.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// The example binary cargo builds next to this test (`cargo test` builds examples); built on demand
/// when only this test target was selected.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("examples").join("mpi_shard_check");
    if !bin.is_file() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "ddpm-data", "--example", "mpi_shard_check"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo to build the example");
        assert!(
            status.success(),
            "building the mpi_shard_check example failed"
        );
    }
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

fn mpirun(np: usize, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            &np.to_string(),
        ])
        .arg(example_binary())
        .args(args)
        // Container-friendly shared-memory transport; harmless elsewhere.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .output()
        .expect("mpirun not found: install openmpi-bin (scripts/setup.sh does)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn two_mpi_ranks_read_disjoint_shards_through_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::write_synthetic(&dir.path().join("mpi.h5"), 1003, [6, 5, 3], Some(10), 7);
    let (ok, stdout, stderr) = mpirun(
        2,
        &[
            f.to_str().unwrap(),
            "--batch",
            "8",
            "--seed",
            "11",
            "--epochs",
            "3",
            "--flip",
            "--unique-content",
        ],
    );
    assert!(ok, "mpirun failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("mpi_shard_check OK: world 2"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // 1003 - 1003 mod 16 = 992 examples per epoch, 3 epochs.
    assert!(stdout.contains("2976 examples checked"), "{stdout}");
    assert!(
        stdout.contains("no image content delivered twice"),
        "{stdout}"
    );
}
