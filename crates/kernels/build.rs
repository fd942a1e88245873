//! With feature `cuda`: compiles src/ddpm_kernels.cu to a cubin (machine code for one GPU architecture,
//! sm_90 = H100/H200 by default) that src/cuda.rs embeds with `include_bytes!`. A cubin needs no PTX JIT and
//! no NVRTC at run time, so a binary built with a newer nvcc still loads on an older driver.
//!
//! nvcc is found as `$NVCC`, else `$CUDA_ROOT/bin/nvcc` (also CUDA_PATH, CUDA_HOME), else `nvcc` on PATH.
//! `DDPM_CUDA_ARCH` overrides the architecture (e.g. `sm_80`); the default is `sm_90`.
//! Without feature `cuda` nothing runs and no CUDA is needed.

use std::env;
use std::path::PathBuf;
use std::process::Command;

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
        "DDPM_CUDA_ARCH",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let nvcc = find_nvcc();
    let arch = env::var("DDPM_CUDA_ARCH").unwrap_or_else(|_| "sm_90".to_string());
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("ddpm_kernels.cubin");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("src/ddpm_kernels.cu");

    // -fmad=false etc.: no FMA contraction, IEEE division and square root, no flush-to-zero. The kernels
    // already spell every operation with __f*_rn intrinsics; the flags keep it so if someone forgets one.
    let status = Command::new(&nvcc)
        .arg("-cubin")
        .arg(format!("-arch={arch}"))
        .args(["-O3", "-fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"])
        .arg("-I")
        .arg(manifest.join("src"))
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "ddpm-kernels: could not run nvcc ({}): {e}. Feature `cuda` needs CUDA 13 nvcc at build \
                 time: run scripts/cuda-toolchain.sh and `source .gpu/env.sh`",
                nvcc.display()
            )
        });
    if !status.success() {
        panic!(
            "ddpm-kernels: nvcc failed ({status}) compiling {}",
            src.display()
        );
    }
    println!("cargo:rustc-env=DDPM_CUBIN_ARCH={arch}");
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
