//! `ddpm-sample`: generate images from a trained checkpoint, on one process or across MPI ranks
//! (the command is `ddpm_sampler::sample_cmd`).

use clap::Parser;
use ddpm_sampler::sample_cmd::{run_sample, SampleArgs};

/// Generate images from a ddpm-train checkpoint.
///
/// Samplers: `ddpm` (ancestral; fixed-small, fixed-large or learned variance as trained), `ddim`
/// (any --eta), `dpm-solver` (DPM-Solver++(2M)) and `heun` (probability-flow ODE, Karras et al.'s
/// Heun in sigma space). Classifier-free guidance: eps = (1 + w) eps_cond - w eps_uncond with
/// w = --cfg (w = 0 is the conditional model). Under `mpirun -n k` the images are split across ranks
/// and rank 0 writes one file; the images do not depend on k.
#[derive(Parser, Debug)]
#[command(name = "ddpm-sample", version)]
struct Cli {
    #[command(flatten)]
    args: SampleArgs,
}

fn main() {
    // Before any thread exists: thread counts, candle's spin-waiting pool, malloc (ddpm-ops).
    ddpm_ops::init_cpu();
    let (comm, _) = ddpm_dist::start_or_exit("cpu", "warn");
    let cli = Cli::parse();
    ddpm_dist::or_fail(&*comm, run_sample(&cli.args, &*comm));
}
