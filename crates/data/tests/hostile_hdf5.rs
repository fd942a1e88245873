//! Files that crash or hang libhdf5 1.10.8 (Debian 12) inside the library, found by the any-byte
//! fuzz pass (tests/fuzz.rs) and kept as fixtures: two SIGSEGVs in `H5HG_read` (a variable-length
//! string attribute pointing into a corrupt global heap; one of them in its `memcpy`) and an endless
//! loop in `H5HG__protect`. Each must be an error naming the file, from the library and from the
//! CLI, and the process must live on. The test first shows that each fixture still crashes or hangs
//! the process that reads it without the checking child (`ddpm_data::probe`).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ddpm_data::probe::{PROBE_ENV, TIMEOUT_ENV};
use ddpm_data::Hdf5Dataset;

const HANG_TIMEOUT_S: &str = "3";

fn fixtures() -> Vec<PathBuf> {
    [
        "segv-h5hg-read.h5",
        "segv-h5hg-read-memcpy.h5",
        "hang-h5hg-protect.h5",
    ]
    .iter()
    .map(|f| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(f)
    })
    .collect()
}

/// Runs this test binary as the checking child on `file` with the check done in-process, as every
/// ddpm process did before: the status it dies with.
fn unprotected_read(file: &Path) -> std::process::ExitStatus {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(PROBE_ENV, file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap(); // still running after 10 s: the hang
    child.wait().unwrap()
}

#[test]
fn files_that_crash_or_hang_libhdf5_are_errors_naming_them() {
    // The only test in this binary: no other thread reads the environment.
    std::env::set_var(TIMEOUT_ENV, HANG_TIMEOUT_S);
    let dir = tempfile::tempdir().unwrap();
    for fixture in fixtures() {
        let name = fixture.file_name().unwrap().to_string_lossy().into_owned();
        // Fresh copies: a file version is checked once per process.
        let file = dir.path().join(&name);
        std::fs::copy(&fixture, &file).unwrap();

        let status = unprotected_read(&file);
        let want = if name.starts_with("segv") { 11 } else { 9 };
        assert_eq!(
            status.signal(),
            Some(want),
            "{name}: read in-process no longer ends with signal {want} but {status:?}: has libhdf5 \
             changed? Regenerate the fixtures with the any-byte fuzz pass"
        );

        let e = Hdf5Dataset::open(&file).expect_err(&name).to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
        let what = if name.starts_with("segv") {
            "libhdf5 crashed reading it in a checking process (SIGSEGV)"
        } else {
            "did not finish within 3 s"
        };
        assert!(e.contains(what), "{name}: {e}");

        let out = Command::new(env!("CARGO_BIN_EXE_ddpm-data"))
            .args(["inspect", file.to_str().unwrap()])
            .env(TIMEOUT_ENV, HANG_TIMEOUT_S)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(&name) && stderr.contains(what), "{stderr}");
    }
}
