//! Fused element-wise ops of the diffusion training and sampling loops, on CPU and (feature `cuda`) GPU.
//!
//! - [`fused_noising`]: the forward process of one training step in a single pass over memory: per-sample
//!   coefficients gathered from the schedule, Gaussian noise drawn in place, `x_t`, the noise and the
//!   training target (eps, v or x0) written together.
//! - [`fused_sampler_step`]: one DDPM/DDIM-style update `x_prev = c_x0 x0_pred + c_xt x_t + sigma z`, with
//!   `x0_pred` formed (and optionally clipped) from the model output in the same pass.
//! - [`philox_normal`]: a tensor of counter-based normals on any device (e.g. a sampler's `x_T`).
//!
//! The ops are candle custom ops applied with `apply_op*_no_bwd`: **they have no backward**. Their inputs
//! are data (images, the current sample, a detached model output), so nothing upstream needs a gradient;
//! gradients flow through what the caller does with the outputs (the model sees `x_t`, the loss compares
//! the model output with `target`). Do not route a tensor that needs a gradient *into* them.
//!
//! # Random numbers: the exact mapping
//! All noise comes from `ddpm-rng` (crates/rng), never from candle's RNG:
//!
//! - noise element `e` (flat index within one example, `0 <= e < C*H*W`) of local example `i` is
//!   `StreamKey::new(seed, stream, step, first_example + i).normal(e)`, with `stream` =
//!   [`ddpm_rng::Stream::Noise`] for [`fused_noising`] and [`ddpm_rng::Stream::Sampler`] for
//!   [`fused_sampler_step`] with [`StepNoise::Philox`].
//! - that is: Philox4x32-10 with key `(seed as u32, (seed >> 32) as u32)` and counter
//!   `[e / 4, (first_example + i) as u32, step as u32, stream]`; the block's words `(w0, w1)` give normals
//!   `e % 4 = 0, 1` and `(w2, w3)` give `2, 3`, through `u32_to_open01` and the portable Box-Muller of
//!   `ddpm_rng::box_muller` (`r = sqrt(-2 ln u1)`, `(r cos 2 pi u2, r sin 2 pi u2)`), evaluated with
//!   IEEE-rounded f32 add/sub/mul/div/sqrt only and fixed polynomials for `ln` and `sincos`.
//! - `first_example` is the position of local example 0 in the *global* batch (`rank * per_rank_batch`),
//!   so splitting a batch across ranks or threads does not change any value, and a resumed run that
//!   reuses `(seed, step)` draws the same noise.
//! - The CUDA kernels (src/philox.cuh, src/ddpm_kernels.cu) perform the same operations in the same order with
//!   `__fmul_rn`/`__fadd_rn`/`__fsub_rn`/`__fdiv_rn`/`__fsqrt_rn` and are compiled with `-fmad=false`, so
//!   the GPU noise is bit-identical to the CPU noise, and so are `x_t`, the targets and the sampler update
//!   (both sides compute `a*x + b*z` as two rounded products and a rounded sum, never an FMA).
//!
//! # CUDA
//! With feature `cuda`, build.rs compiles the kernels with nvcc to a fatbin holding machine code for
//! sm_80, sm_86, sm_89 and sm_90 (A100, A10/3090, L4/4090, H100/H200) and compute_90 PTX for newer GPUs
//! (`DDPM_CUDA_SM`/`DDPM_CUDA_PTX` override). It is embedded in the binary and loaded into the tensor's
//! CUDA context the first time an op runs there (one module per candle device); the driver picks the image
//! for the GPU ([`arch`] mirrors its rule), and a GPU with none gets an error naming its compute
//! capability. No NVRTC is involved; only a GPU newer than every cubin JITs the PTX.
//! Build it with `scripts/cuda-toolchain.sh`, `source .gpu/env.sh`, then
//! `cargo build --features cuda --target-dir target-cuda`; no GPU is needed to build.
//!
//! # How this is tested
//! - CPU (`cargo test -p ddpm-kernels`): fused = unfused candle expression bit for bit for every prediction
//!   type and noise mode, the documented stream, noise moments and correlations, 1/2/3 threads and
//!   rank splits give identical bits.
//! - The CUDA source without a GPU: tests/cuda_emulation.rs compiles src/ddpm_kernels.cu for the host with
//!   shims for the intrinsics and runs it thread by thread for several launch shapes, float4 and scalar
//!   paths: bit-identical to the CPU ops. src/cuda_source_tests.rs checks its constants against Rust.
//! - On a GPU: the `ddpm-gpu-selftest` binary (scripts/gpu-check.sh) compares the real kernels with the
//!   CPU path and measures their bandwidth against a device-to-device copy.

pub mod arch;
mod error;
mod noising;
mod normal;
mod sampler;
mod util;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod cuda_source_tests;

pub use error::KernelError;
pub use noising::{
    fused_noising, noise_coefficients, unfused_noising, NoiseKey, Noised, NoisingOp, Prediction,
};
pub use normal::philox_normal;
pub use sampler::{
    fused_sampler_step, unfused_sampler_step, SamplerStepOp, StepCoefs, StepNoise, StepOut,
};

/// Whether this build carries the CUDA implementations (feature `cuda`).
pub const HAS_CUDA: bool = cfg!(feature = "cuda");
