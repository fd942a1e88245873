//! `ddpm-train`: trains a DDPM (or a noise-aware classifier) from a TOML config, on one process or
//! on every rank of an `mpirun`/`srun` job.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use ddpm_config::{Overrides, TrainConfig};
use ddpm_train::signals::{StopFlag, EXIT_PREEMPTED};
use ddpm_train::trainer::{train, ResumeFrom, TrainOptions};

#[derive(Parser)]
#[command(
    name = "ddpm-train",
    version,
    about = "Train a DDPM (data-parallel under mpirun/srun) from a TOML config",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    config: ConfigArgs,
    /// Continue from a checkpoint: `auto` (newest valid one in the run directory, or start fresh),
    /// a checkpoint directory, or a run directory.
    #[arg(long, value_name = "auto|PATH")]
    resume: Option<String>,
    /// The task, overriding the config's `task`: diffusion, classifier or distill.
    #[arg(long, value_name = "TASK")]
    task: Option<String>,
    /// task = distill: the teacher, a run directory (its newest valid checkpoint) or a checkpoint
    /// directory; implies `--task distill`. Without `--config` the teacher's config is the base
    /// (change it with `--set`, e.g. `--set distill.teacher_steps=256`).
    #[arg(long, value_name = "RUN_OR_CHECKPOINT")]
    teacher: Option<PathBuf>,
    /// Where to train: `cpu`, or `cuda` (needs a build with `--features cuda`; one GPU per rank).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bar even on a terminal (log lines instead).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Training config (TOML). Required, except for `--teacher` (distillation).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config value, e.g. `--set optim.lr=1e-4` (value parsed as TOML). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Total training steps (schedule.total_steps).
    #[arg(long)]
    steps: Option<u64>,
    /// Per-rank batch size (data.batch).
    #[arg(long)]
    batch: Option<usize>,
    /// Run directory (out_dir).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the parameter count and the per-level summary of the config's model.
    InspectModel(ConfigArgs),
    /// Validate a config (with overrides) and print it resolved, with its hash.
    CheckConfig(ConfigArgs),
}

impl ConfigArgs {
    fn load(&self) -> Result<TrainConfig> {
        let Some(path) = &self.config else {
            bail!("--config FILE is required")
        };
        let ov = Overrides {
            sets: self.sets.clone(),
            steps: self.steps,
            batch: self.batch,
            out: self.out.clone(),
        };
        // inspect-model and check-config need no run directory
        let cfg = match TrainConfig::load(path, &ov) {
            Err(ddpm_config::ConfigError::Invalid { key, .. })
                if key == "out_dir" && ov.out.is_none() =>
            {
                let ov = Overrides {
                    out: Some(PathBuf::from("runs/unnamed")),
                    ..ov
                };
                let mut c = TrainConfig::load(path, &ov)?;
                c.out_dir = None;
                c
            }
            other => other?,
        };
        Ok(cfg)
    }
}

/// Prints a line to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

fn main() -> ExitCode {
    // Before any thread exists: thread counts, candle's spin-waiting pool, malloc (ddpm-ops).
    ddpm_ops::init_cpu();
    let cli = Cli::parse();
    ddpm_dist::init_tracing("info");
    let result = match &cli.cmd {
        Some(Cmd::InspectModel(a)) => a.load().and_then(|c| {
            say(&ddpm_train::inspect_model(&c)?);
            Ok(ExitCode::SUCCESS)
        }),
        Some(Cmd::CheckConfig(a)) => a.load().map(|c| {
            say(c.to_toml().trim_end());
            say(&format!(
                "# config hash (excluding {}): {}",
                ddpm_config::HASH_EXCLUDED_KEYS.join(", "),
                c.hash()
            ));
            ExitCode::SUCCESS
        }),
        None => run_training(&cli),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The run's config: the file with the overrides, or for a distillation round (`--teacher`,
/// `--task distill` or `task = "distill"`) the round's config built from its teacher.
fn training_config(cli: &Cli) -> Result<TrainConfig> {
    let a = &cli.config;
    let mut ov = Overrides {
        sets: a.sets.clone(),
        steps: a.steps,
        batch: a.batch,
        out: a.out.clone(),
    };
    if let Some(t) = &cli.task {
        ov.sets.insert(0, format!("task={t}"));
    }
    let path = a.config.as_deref();
    if cli.teacher.is_some() || ddpm_train::distill::requested(path, &ov.sets)? {
        return ddpm_train::distill::load_config(path, cli.teacher.as_deref(), &ov);
    }
    let Some(path) = path else {
        bail!("--config FILE is required")
    };
    Ok(TrainConfig::load(path, &ov)?)
}

fn run_training(cli: &Cli) -> Result<ExitCode> {
    let cfg = training_config(cli)?;
    let resume = match cli.resume.as_deref() {
        None => None,
        Some("auto") => Some(ResumeFrom::Auto),
        Some(p) => Some(ResumeFrom::Path(PathBuf::from(p))),
    };
    let stop = StopFlag::install()?;
    let dist_opts = ddpm_dist::DistOptions::with_timeout_s(cfg.dist.timeout_s)?;
    let (comm, device) = ddpm_dist::start_with(&cli.device, "info", &dist_opts)?;
    let opts = TrainOptions {
        resume,
        stop,
        progress_bar: !cli.no_progress,
        device,
    };
    match train(&cfg, &*comm, opts) {
        Ok(out) => {
            if comm.rank() == 0 {
                let ck = out
                    .checkpoint
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                say(&format!("step {} checkpoint {ck}", out.step));
                if let Some(g) = &out.sample_grid {
                    say(&format!("samples: {}", g.display()));
                }
                if let Some(p) = &out.loss_plot {
                    say(&format!("loss plot: {}", p.display()));
                }
                say(&format!(
                    "metrics: {}",
                    out.run_dir.join("metrics.jsonl").display()
                ));
            }
            drop(comm);
            Ok(if out.stopped_by_signal {
                ExitCode::from(EXIT_PREEMPTED as u8)
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(e) => {
            if comm.world_size() > 1 {
                ddpm_dist::fail(
                    &*comm,
                    &*Box::<dyn std::error::Error + Send + Sync>::from(format!("{e:#}")),
                );
            }
            Err(e)
        }
    }
}
