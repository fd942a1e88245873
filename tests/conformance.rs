//! The conformance suite: every reference file in `DDPM_REFS_DIR` (default `tests/data/refs`) against
//! `ddpm-diffusion`.
//!
//! This target uses `harness = false`: it is a plain `main` that prints one summary line per file, any
//! failures, and finally exactly one line `conformance: F files, C cases, V values checked, N failed`,
//! then exits non-zero if anything failed. Without libtest nothing captures stdout, so the line shows in
//! plain `cargo test` runs, not only with `--nocapture`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = ddpm_tests::refs_dir();
    eprintln!("reference directory: {}", dir.display());
    let report = ddpm_tests::check_dir(&dir);
    for s in &report.summaries {
        eprintln!("  {s}");
    }
    const SHOWN: usize = 50;
    for f in report.failures.iter().take(SHOWN) {
        eprintln!("FAILED: {f}");
    }
    if report.failures.len() > SHOWN {
        eprintln!(
            "... and {} more failure messages",
            report.failures.len() - SHOWN
        );
    }
    println!("{}", report.line());
    if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
