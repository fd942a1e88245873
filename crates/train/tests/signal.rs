//! SIGTERM / SIGUSR1 make the binary finish its step, write a checkpoint and exit 0; the run then
//! continues with --resume auto. Also covers the CLI's config errors and inspect-model.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ddpm_checkpoint::{self as checkpoint, Checkpoint};

const BIN: &str = env!("CARGO_BIN_EXE_ddpm-train");

fn write_config(f: &common::Fixture, total: u64) -> std::path::PathBuf {
    let out = f.dir.path().join("run");
    let text = common::tiny_config_text(
        &f.data,
        &out,
        "",
        &format!("[schedule]\ntotal_steps = {total}\nlog_every = 1\ncheckpoint_every = 1000000\n"),
    );
    let p = f.dir.path().join("cfg.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn signal_stops_cleanly(sig: i32) {
    let f = common::fixture(32);
    let cfg = write_config(&f, 1_000_000);
    let out = f.dir.path().join("run");
    let mut child = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait until a few steps are logged
    let t0 = Instant::now();
    loop {
        let n = ddpm_train::metrics::read_lines(&out.join("metrics.jsonl"))
            .map(|l| l.len())
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        if let Some(s) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            panic!(
                "exited early with {s}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "exit {:?}: {stderr}", o.status);
    assert!(stderr.contains("stopped by signal"), "{stderr}");
    assert!(
        stderr.contains("rank=0"),
        "the stop line names the rank: {stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "no ANSI colour codes when stderr is not a terminal: {stderr:?}"
    );
    let cks = checkpoint::list_checkpoints(&out);
    assert_eq!(cks.len(), 1, "{cks:?}");
    let (step, dir) = &cks[0];
    assert!(*step >= 3 && *step < 1_000_000);
    let ck = Checkpoint::open_verified(dir).unwrap();
    assert_eq!(ck.manifest.step, *step);
    // the metrics file ends at the checkpoint step
    let lines = ddpm_train::metrics::read_lines(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.last().unwrap()["step"].as_u64(), Some(*step));

    // continue two more steps
    let o = Command::new(BIN)
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--no-progress",
            "--resume",
            "auto",
        ])
        .args(["--steps", &(step + 2).to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(checkpoint::list_checkpoints(&out)[0].0, step + 2);
}

#[test]
fn sigterm_checkpoints_and_exits_zero() {
    signal_stops_cleanly(libc::SIGTERM);
}

#[test]
fn sigusr1_checkpoints_and_exits_zero() {
    signal_stops_cleanly(libc::SIGUSR1);
}

#[test]
fn cli_reports_bad_config_and_inspects_models() {
    let f = common::fixture(8);
    let cfg = write_config(&f, 5);
    let o = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "--set", "optim.lr=-1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("optim.lr must be > 0, got -1"), "{e}");
    assert!(
        !f.dir.path().join("run").exists(),
        "nothing may be written for a bad config"
    );

    let o = Command::new(BIN)
        .args(["inspect-model", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    let n: usize = s
        .lines()
        .find_map(|l| l.strip_prefix("parameters: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(n > 1000, "{s}");
    assert!(s.contains("middle"), "{s}");

    let cifar = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/cifar10.toml");
    let o = Command::new(BIN)
        .args(["inspect-model", "--config", cifar.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("parameters: 35746307"), "{s}");
}
