//! With feature `cuda`: compiles src/ddpm_kernels.cu into a fatbin that src/cuda.rs embeds with
//! `include_bytes!` and loads with `cuModuleLoadData`, which lets the driver pick the image for the GPU:
//!
//! - machine code (cubin) for each of [`DEFAULT_SM`]: sm_80 (A100), sm_86 (A10, RTX 3090), sm_89 (L4,
//!   RTX 4090), sm_90 (H100, H200). A cubin also runs on later GPUs of the same major version (sm_80
//!   code on an sm_87 Orin, sm_86 code on sm_88), never across majors.
//! - PTX for [`DEFAULT_PTX`] (compute_90), which the driver compiles at load time on any newer GPU
//!   (Blackwell 10.x and 12.x). PTX runs only on its own capability and newer ones, so the *oldest*
//!   capability above the cubins is the one that covers every later GPU: compute_120 PTX, the newest this
//!   nvcc (13.0) emits, would leave a B200 (10.0) with no image at all.
//!
//! Every image is built with the same exactness flags, so all of them compute the same bits.
//! `DDPM_CUDA_SM` (comma-separated capabilities, e.g. `90` or `80,90`) and `DDPM_CUDA_PTX` (one capability,
//! or `none`) override the defaults. nvcc is found as `$NVCC`, else `$CUDA_ROOT/bin/nvcc` (also CUDA_PATH,
//! CUDA_HOME), else `nvcc` on PATH. Without feature `cuda` nothing runs and no CUDA is needed.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Capabilities that get machine code by default.
const DEFAULT_SM: &str = "80,86,89,90";
/// Capability whose PTX is embedded by default, for GPUs newer than every cubin.
const DEFAULT_PTX: &str = "90";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for f in ["src/ddpm_kernels.cu", "src/philox.cuh"] {
        println!("cargo:rerun-if-changed={f}");
    }
    for v in [
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "DDPM_CUDA_SM",
        "DDPM_CUDA_PTX",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let sm = caps("DDPM_CUDA_SM", DEFAULT_SM);
    let ptx = caps("DDPM_CUDA_PTX", DEFAULT_PTX);
    if sm.is_empty() && ptx.is_empty() {
        panic!("ddpm-kernels: DDPM_CUDA_SM and DDPM_CUDA_PTX name no GPU architecture at all");
    }
    if ptx.len() > 1 {
        panic!(
            "ddpm-kernels: DDPM_CUDA_PTX names one capability (the PTX JITs on every newer GPU)"
        );
    }

    let nvcc = find_nvcc();
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("ddpm_kernels.fatbin");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("src/ddpm_kernels.cu");

    let mut cmd = Command::new(&nvcc);
    cmd.arg("-fatbin");
    for c in &sm {
        cmd.arg(format!("-gencode=arch=compute_{c},code=sm_{c}"));
    }
    for c in &ptx {
        cmd.arg(format!("-gencode=arch=compute_{c},code=compute_{c}"));
    }
    // -fmad=false etc.: no FMA contraction, IEEE division and square root, no flush-to-zero. The kernels
    // already spell every operation with __f*_rn intrinsics; the flags keep it so if someone forgets one.
    cmd.args([
        "-O3",
        "-fmad=false",
        "-ftz=false",
        "-prec-div=true",
        "-prec-sqrt=true",
    ])
    .arg("-I")
    .arg(manifest.join("src"))
    .arg("-o")
    .arg(&out)
    .arg(&src);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "ddpm-kernels: could not run nvcc ({}): {e}. Feature `cuda` needs CUDA 13 nvcc at build \
             time: run scripts/cuda-toolchain.sh and `source .gpu/env.sh`",
            nvcc.display()
        )
    });
    if !status.success() {
        panic!("ddpm-kernels: nvcc failed ({status}): {cmd:?}");
    }
    let list = |v: &[u32], prefix: &str| {
        v.iter()
            .map(|c| format!("{prefix}{c}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    println!("cargo:rustc-env=DDPM_FATBIN_SM={}", list(&sm, "sm_"));
    println!("cargo:rustc-env=DDPM_FATBIN_PTX={}", list(&ptx, "compute_"));
}

/// Capabilities from `$var` (or `default`): comma-separated numbers such as `86`; `none` for none.
fn caps(var: &str, default: &str) -> Vec<u32> {
    let text = env::var(var).unwrap_or_else(|_| default.to_string());
    if text.trim() == "none" {
        return Vec::new();
    }
    text.split(',')
        .map(|s| {
            let s = s
                .trim()
                .trim_start_matches("sm_")
                .trim_start_matches("compute_");
            s.parse::<u32>()
                .ok()
                .filter(|c| (50..=200).contains(c))
                .unwrap_or_else(|| {
                    panic!(
                        "ddpm-kernels: {var}={text:?}: {s:?} is not a compute capability like 86"
                    )
                })
        })
        .collect()
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for v in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env::var_os(v) {
            let p = PathBuf::from(root).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}
