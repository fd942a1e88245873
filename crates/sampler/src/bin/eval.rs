//! `ddpm-eval`: bits/dim and the classifier Frechet distance of a trained model (the commands are
//! `ddpm_sampler::eval_cmd`'s).

use clap::{Parser, Subcommand};
use ddpm_sampler::eval_cmd::{run_bpd, run_fid, BpdArgs, FidArgs};

#[derive(Parser, Debug)]
#[command(
    name = "ddpm-eval",
    version,
    about = "Evaluate ddpm-rs models: bits/dim and the classifier Frechet distance"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Variational bound in bits/dim on a test set (T model evaluations per example).
    Bpd(BpdArgs),
    /// Frechet distance in the features of a classifier trained on the data, and its accuracy on samples.
    Fid(FidArgs),
}

fn main() {
    // Before any thread exists: thread counts, candle's spin-waiting pool, malloc (ddpm-ops).
    ddpm_ops::init_cpu();
    let (comm, _) = ddpm_dist::start_or_exit("cpu", "warn");
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Bpd(a) => run_bpd(a, &*comm),
        Cmd::Fid(a) => run_fid(a, &*comm),
    };
    ddpm_dist::or_fail(&*comm, r);
}
