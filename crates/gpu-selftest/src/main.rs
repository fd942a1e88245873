//! `ddpm-gpu-selftest`: the single-GPU smoke test of ddpm-rs (run on one GPU, CUDA device 0).
//!
//! 1. Fused kernels against the CPU path: noise bit-identical, `x_t`, targets and sampler updates within
//!    float rounding (in fact expected bit-identical), for aligned/float4, tail and misaligned layouts.
//! 2. A few training steps of a small class-conditional U-Net on the GPU and on the CPU from the same
//!    initial weights and data: the losses must agree.
//! 3. A world-1 NCCL all-reduce of the real gradient buckets of that model (BucketPlan of ddpm-dist): the
//!    sum over one rank must return the buckets unchanged.
//! 4. A table: fused-kernel GB/s against a device-to-device copy of the same bytes, the fused vs unfused
//!    noising on the device, and training images/s.
//!
//! Exit status: 0 all checks passed, 1 a check failed, 2 built without feature `cuda`, 3 an error
//! (no GPU, a library missing...). Performance targets are reported, not failed on.
//!
//! Needs on the GPU machine: the driver (libcuda.so.1) and the CUDA 13 libraries (cudart, cublas,
//! cublasLt, curand, nvrtc, nccl) on LD_LIBRARY_PATH; no Rust, MPI or HDF5. scripts/gpu-check.sh packs
//! and runs it.
//!
//! Usage: `ddpm-gpu-selftest [--quick] [--markdown FILE]`

#[cfg(feature = "cuda")]
mod bandwidth;
#[cfg(feature = "cuda")]
mod kernels_check;
#[cfg(feature = "cuda")]
mod nccl;
#[cfg(feature = "cuda")]
mod report;
#[cfg(feature = "cuda")]
mod training;

use std::process::ExitCode;

#[cfg(not(feature = "cuda"))]
fn main() -> ExitCode {
    eprintln!(
        "ddpm-gpu-selftest was built without feature `cuda`, so it has nothing to test. Build it with \
         scripts/gpu-check.sh (or `cargo build -p ddpm-gpu-selftest --features cuda`)."
    );
    ExitCode::from(2)
}

#[cfg(feature = "cuda")]
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut quick = false;
    let mut markdown: Option<std::path::PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--markdown" => match it.next() {
                Some(p) => markdown = Some(p.into()),
                None => {
                    eprintln!("--markdown needs a file name");
                    return ExitCode::from(3);
                }
            },
            "-h" | "--help" => {
                println!("usage: ddpm-gpu-selftest [--quick] [--markdown FILE]");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?} (see --help)");
                return ExitCode::from(3);
            }
        }
    }
    match run(quick, markdown.as_deref()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ddpm-gpu-selftest: error: {e:#}");
            ExitCode::from(3)
        }
    }
}

#[cfg(feature = "cuda")]
fn run(quick: bool, markdown: Option<&std::path::Path>) -> anyhow::Result<bool> {
    use anyhow::Context;
    let started = std::time::Instant::now();
    let dev = candle_core::Device::new_cuda(0).context("opening CUDA device 0")?;
    let cuda = dev.as_cuda_device()?;
    let ctx = cuda.cuda_stream().context().clone();
    let name = ctx.name().unwrap_or_else(|e| format!("? ({e})"));
    let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
    let mem = ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let mut rep = report::Report::new(format!(
        "{name}, compute capability {major}.{minor}, {mem:.0} GiB; kernels fatbin {} + {} (image for this GPU: {})",
        ddpm_kernels::cuda::FATBIN_SM,
        ddpm_kernels::cuda::FATBIN_PTX,
        ddpm_kernels::arch::select(&ddpm_kernels::cuda::fatbin_images(), major as u32, minor as u32)
            .map_or_else(|| "none".to_string(), |i| i.to_string())
    ));
    println!("device: {}", rep.device);

    println!("\n== fused kernels: GPU vs CPU ==");
    kernels_check::run(&dev, &mut rep)?;
    println!("\n== training: small U-Net, GPU vs CPU ==");
    let grads = training::run(&dev, quick, &mut rep)?;
    println!("\n== NCCL world-1 all-reduce of the gradient buckets ==");
    nccl::run(&dev, &grads, &mut rep)?;
    println!("\n== bandwidth ==");
    bandwidth::run(&dev, quick, &mut rep)?;

    let text = rep.markdown(started.elapsed());
    println!("\n{text}");
    if let Some(p) = markdown {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(rep.all_passed())
}
