//! Multi-rank tests: `mpirun -n 2|3` of the `ddpm-dist-check` program (src/bin/check.rs).
//!
//! These need OpenMPI's mpirun on PATH (scripts/setup.sh installs it). A missing mpirun is a test
//! failure, not a skip.
#![cfg(feature = "mpi")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One mpirun at a time: the machine has 2 cores and the failure tests measure how long a job takes
/// to die.
static SERIAL: Mutex<()> = Mutex::new(());

struct Run {
    code: Option<i32>,
    output: String,
    elapsed: Duration,
}

impl Run {
    fn lines(&self, prefix: &str) -> Vec<&str> {
        self.output
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }
}

/// Runs `mpirun -n ranks ddpm-dist-check args...`, killing it after `limit`.
fn mpirun(ranks: usize, args: &[&str], limit: Duration) -> Run {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bin = env!("CARGO_BIN_EXE_ddpm-dist-check");
    let out = tempfile_path();
    let file = std::fs::File::create(&out).unwrap();
    let start = Instant::now();
    let mut child = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args(["-n", &ranks.to_string(), bin])
        .args(args)
        // Containers often forbid the ptrace-based single-copy mechanism of the shared-memory
        // transport; MPI then still works through copy-in/copy-out.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RUST_BACKTRACE", "0")
        .env_remove("DDPM_DIST")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("could not start mpirun: is OpenMPI installed (scripts/setup.sh)?");
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code().or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                status.signal().map(|s| 128 + s)
            });
        }
        if start.elapsed() > limit {
            // SIGTERM lets mpirun take its ranks down with it; then make sure.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(3));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let mut output = String::new();
    std::fs::File::open(&out)
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    let _ = std::fs::remove_file(&out);
    Run {
        code,
        output,
        elapsed,
    }
}

fn tempfile_path() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "ddpm-dist-mpirun-{}-{}.log",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

const LIMIT: Duration = Duration::from_secs(120);

fn assert_ok(r: &Run, ranks: usize, mode: &str) {
    assert_eq!(r.code, Some(0), "mpirun failed:\n{}", r.output);
    for rank in 0..ranks {
        let want = format!("rank {rank}: {mode} ok");
        assert!(
            r.output.lines().any(|l| l.starts_with(&want)),
            "no `{want}` line:\n{}",
            r.output
        );
    }
}

#[test]
fn info_sees_mpi_world_and_local_ranks() {
    let r = mpirun(2, &["info"], LIMIT);
    assert_ok(&r, 2, "info");
    assert!(
        r.output.contains("mpi rank 0/2 (local 0/2)"),
        "{}",
        r.output
    );
    assert!(
        r.output.contains("mpi rank 1/2 (local 1/2)"),
        "{}",
        r.output
    );
}

#[test]
fn primitives_on_two_and_three_ranks() {
    for n in [2, 3] {
        let r = mpirun(n, &["primitives"], LIMIT);
        assert_ok(&r, n, "primitives");
    }
}

#[test]
fn bucketed_mean_equals_serial_mean() {
    // Odd sizes, several tensors straddling buckets of 40000 bytes (10000 floats): 41 buckets.
    let r = mpirun(2, &["allreduce"], LIMIT);
    assert_ok(&r, 2, "allreduce");
    assert!(r.output.contains("41 buckets"), "{}", r.output);
    assert!(r.output.contains("max |diff| 0e0"), "{}", r.output);
    // Tiny buckets (3 floats: every tensor split, many collectives) and one bucket for everything.
    let r = mpirun(
        2,
        &["allreduce", "--sizes", "7,1,10,2", "--bucket-bytes", "12"],
        LIMIT,
    );
    assert_ok(&r, 2, "allreduce");
    assert!(r.output.contains("20 elements, 7 buckets"), "{}", r.output);
    let r = mpirun(3, &["allreduce", "--bucket-bytes", "100000000"], LIMIT);
    assert_ok(&r, 3, "allreduce");
    assert!(r.output.contains(", 1 buckets"), "{}", r.output);
}

#[test]
fn config_hash_agreement_and_mismatch() {
    let r = mpirun(2, &["config"], LIMIT);
    assert_ok(&r, 2, "config");
    let r = mpirun(2, &["config", "--differ-on", "1"], LIMIT);
    assert_ne!(r.code, Some(0), "{}", r.output);
    assert!(r.code.is_some(), "mismatch hung:\n{}", r.output);
    for rank in 0..2 {
        let l = r.lines(&format!("rank {rank}: error: "));
        assert_eq!(
            l.len(),
            1,
            "rank {rank} did not report the mismatch:\n{}",
            r.output
        );
        assert!(l[0].contains("rank(s) 1 differ from rank 0"), "{}", l[0]);
    }
}

#[test]
fn broadcast_from_any_root_and_shape_mismatch() {
    for root in ["0", "1"] {
        let r = mpirun(2, &["broadcast", "--root", root], LIMIT);
        assert_ok(&r, 2, "broadcast");
    }
    let r = mpirun(2, &["broadcast", "--shape-differs-on", "1"], LIMIT);
    assert_ne!(r.code, Some(0), "{}", r.output);
    assert!(r.code.is_some(), "mismatch hung:\n{}", r.output);
    for rank in 0..2 {
        let l = r.lines(&format!("rank {rank}: error: "));
        assert_eq!(l.len(), 1, "rank {rank}:\n{}", r.output);
        assert!(
            l[0].contains("first difference at tensor 1: rank 0 F32[5], rank 1 F32[3, 2]"),
            "{}",
            l[0]
        );
    }
}

#[test]
fn non_finite_flag_is_agreed() {
    let r = mpirun(2, &["nonfinite", "--nan-on", "1"], LIMIT);
    assert_ok(&r, 2, "nonfinite");
    assert!(
        r.output
            .contains("rank 0: nonfinite ok: local=false skip=true"),
        "{}",
        r.output
    );
    assert!(
        r.output
            .contains("rank 1: nonfinite ok: local=true skip=true"),
        "{}",
        r.output
    );
    let r = mpirun(2, &["nonfinite"], LIMIT);
    assert_ok(&r, 2, "nonfinite");
    assert_eq!(
        r.lines("rank")
            .iter()
            .filter(|l| l.contains("skip=false"))
            .count(),
        2
    );
}

/// The requirement: one rank dying mid-run ends the job, non-zero, within 60 s.
fn assert_job_dies(how: &str, victim: &str, expect_line: Option<&str>) {
    let r = mpirun(
        2,
        &["fail", "--victim", victim, "--how", how, "--after", "3"],
        Duration::from_secs(90),
    );
    assert!(
        r.code.is_some(),
        "{how}: mpirun still running after 90 s (hang):\n{}",
        r.output
    );
    assert_ne!(r.code, Some(0), "{how}: mpirun exited 0:\n{}", r.output);
    assert!(
        r.elapsed < Duration::from_secs(60),
        "{how}: the job took {:?} to end",
        r.elapsed
    );
    assert!(
        r.output
            .contains(&format!("rank {victim}: failing on purpose ({how})")),
        "{how}: the victim never reached its failure point:\n{}",
        r.output
    );
    if let Some(l) = expect_line {
        assert!(r.output.contains(l), "{how}: no `{l}` in:\n{}", r.output);
    }
    eprintln!("{how}: mpirun exit {:?} after {:?}", r.code, r.elapsed);
}

#[test]
fn sigkill_of_one_rank_ends_the_job() {
    assert_job_dies("kill", "1", Some("exited on signal 9"));
}

#[test]
fn sigterm_of_one_rank_ends_the_job() {
    assert_job_dies("term", "0", Some("exited on signal 15"));
}

#[test]
fn panic_of_one_rank_ends_the_job_and_names_it() {
    assert_job_dies(
        "panic",
        "1",
        Some("rank 1: panic: injected panic at iteration 3"),
    );
    assert_job_dies(
        "thread-panic",
        "1",
        Some("rank 1: panic: injected panic in a helper thread (thread loader"),
    );
}

#[test]
fn error_or_exit_of_one_rank_ends_the_job() {
    assert_job_dies(
        "error",
        "1",
        Some("rank 1: error: launch: injected error at iteration 3"),
    );
    assert_job_dies("exit", "1", None);
}

/// ddpm-train catches SIGTERM/SIGUSR1 to checkpoint at the next step boundary. When a rank dies, mpirun
/// SIGTERMs the survivors, which are blocked in a collective and never reach that boundary: mpirun's
/// follow-up SIGKILL must still end them.
#[test]
fn survivors_that_catch_sigterm_are_still_stopped() {
    for how in ["kill", "panic"] {
        let r = mpirun(
            2,
            &["fail", "--victim", "1", "--how", how, "--catch-term", "1"],
            Duration::from_secs(90),
        );
        assert!(r.code.is_some(), "{how}: hang:\n{}", r.output);
        assert_ne!(r.code, Some(0), "{how}:\n{}", r.output);
        assert!(
            r.elapsed < Duration::from_secs(60),
            "{how}: {:?}",
            r.elapsed
        );
        assert!(r.output.contains("failing on purpose"), "{}", r.output);
        eprintln!(
            "{how} with SIGTERM caught: mpirun exit {:?} after {:?}",
            r.code, r.elapsed
        );
    }
}

/// Issue 13 item 2: a rank that stops (SIGSTOP) or never reaches a collective (sleeping before it)
/// must not hang the others forever. With `--timeout-s 3` the watchdog ends the job within the
/// timeout plus start-up and grace, every live rank naming the collective and the missing rank.
#[test]
fn stalled_rank_ends_the_job_and_is_named() {
    for how in ["stop", "sleep"] {
        let r = mpirun(
            2,
            &[
                "stall",
                "--victim",
                "1",
                "--how",
                how,
                "--after",
                "3",
                "--timeout-s",
                "3",
            ],
            Duration::from_secs(60),
        );
        assert!(
            r.code.is_some(),
            "{how}: still running after 60 s (hang):\n{}",
            r.output
        );
        assert_eq!(
            r.code,
            Some(ddpm_dist::WATCHDOG_EXIT_CODE),
            "{how}: exit status:\n{}",
            r.output
        );
        assert!(
            r.output.contains(&format!(
                "rank 1: stalling on purpose ({how}) before collective iteration 3"
            )),
            "{how}: the victim never stalled:\n{}",
            r.output
        );
        // Start-up of two ranks is a few seconds on a loaded machine; the deadline is 3 s, the
        // grace before MPI_Abort 1.5 s.
        assert!(
            r.elapsed < Duration::from_secs(25),
            "{how}: the job took {:?} to end:\n{}",
            r.elapsed,
            r.output
        );
        let l = r.lines("rank 0: error: watchdog: ");
        assert_eq!(
            l.len(),
            1,
            "{how}: no watchdog line from rank 0:\n{}",
            r.output
        );
        assert!(
            l[0].contains("collective all_reduce_sum_f32 #4 did not complete within 3 s")
                && l[0].contains("rank(s) 1 did not arrive (seen waiting: rank(s) 0)"),
            "{how}: {}",
            l[0]
        );
        eprintln!("{how}: mpirun exit {:?} after {:?}", r.code, r.elapsed);
    }
}

/// The deadline is per collective and only for ranks that do not arrive: a rank that is slow
/// (2 s before each of three all-reduces, 6 s in all) under a 4 s deadline finishes normally.
#[test]
fn slow_rank_below_the_timeout_does_not_fire() {
    let r = mpirun(
        2,
        &[
            "stall",
            "--victim",
            "1",
            "--how",
            "sleep",
            "--sleep-s",
            "2",
            "--after",
            "0",
            "--iterations",
            "3",
            "--timeout-s",
            "4",
        ],
        LIMIT,
    );
    assert_ok(&r, 2, "stall");
    assert!(!r.output.contains("watchdog"), "{}", r.output);
    assert!(r.elapsed >= Duration::from_secs(6), "{:?}", r.elapsed);
}

/// Timeouts outside 1 s ..= 1 week are refused before MPI starts.
#[test]
fn bad_timeout_is_refused() {
    let r = mpirun(2, &["info", "--timeout-s", "0"], LIMIT);
    assert_ne!(r.code, Some(0), "{}", r.output);
    assert!(
        r.output.contains("collective timeout must be between"),
        "{}",
        r.output
    );
}
