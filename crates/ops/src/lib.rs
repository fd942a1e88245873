//! Fast CPU kernels for the U-Net's hot ops, as candle custom ops with their own backward.
//!
//! candle 0.11's CPU backward of `conv2d` computes the input gradient with a direct
//! `conv_transpose2d` loop (no GEMM) and the weight gradient as a convolution with batch and
//! channels swapped, a badly shaped product; GroupNorm and softmax are multi-pass composites
//! whose backward walks the graph op by op. Here each of these is one op:
//!
//! - [`conv2d`]: 3x3 stride-1 "same" convolutions (nearly all of the U-Net's work) use Winograd
//!   in all three directions: F(4x4, 3x3) (36 GEMMs over transformed tiles, 4x fewer
//!   multiply-adds than direct convolution) on maps of 8+ pixels a side with 16+ channels in or out,
//!   F(2x2, 3x3) (16 GEMMs, 2.25x fewer) on the others. Other shapes (stride 2, 1x1) are one GEMM per
//!   example and direction (`W . im2col(x)`, `col2im(W^T . dY)`, `dY . im2col(x)^T`). GEMMs use
//!   the `gemm` crate candle itself uses; work is spread over threads, scratch reused per thread.
//! - [`group_norm`]: GroupNorm with an optional fused SiLU, statistics accumulated in f64, and a
//!   two-pass backward; [`group_norm_masked`] also multiplies by a dropout mask in the same pass.
//! - [`norm_conv2d`]: GroupNorm (+SiLU, dropout mask), a conv and a residual as one op (a
//!   ResBlock's second half): the normalised activation costs no zero-filled gradient buffer and
//!   add in candle's backward, the residual no serial pass.
//! - [`softmax_last_dim`] / [`softmax_scaled`]: softmax over the last dimension with backward
//!   (`candle_nn::ops::softmax_last_dim` has none).
//! - [`cat_channels`]: the decoder's skip concatenation, copied on all threads.
//! - [`upsample_nearest2x`]: the decoder's nearest 2x upsampling, forward and 2x2-sum backward in
//!   one parallel pass each.
//! - [`attention`]: `v softmax(scale q^T k)^T` over channel-major q, k, v in one op, its backward
//!   four GEMMs on strided views.
//!
//! All ops work in f32 and f64 on the CPU (f64 so that finite-difference gradient checks are
//! meaningful; the f64 path is the same code). bf16 and f16 inputs (mixed-precision training) are
//! computed in f32 by GroupNorm, softmax and, on the CPU, conv2d and attention, and rounded back
//! (`precision.rs`). Other devices and dtypes, or `DDPM_OPS=candle` in
//! the environment, take candle's built-in ops, so a CUDA build behaves as before;
//! `DDPM_OPS_WINOGRAD=0` keeps the im2col path for 3x3 convs and `DDPM_OPS_WINOGRAD4=0` uses
//! F(2x2) only. Binaries call [`init_cpu`] first (thread count, candle's spin limit, malloc
//! tuning). Measurements: bench/RESULTS.md.
//!
//! # Determinism
//! Results are bitwise reproducible for a given thread count and CPU kind: on CPUs with AVX-512F
//! the f32 convolutions' forward-shaped GEMMs run this crate's AVX-512 kernel (`sgemm512.rs`;
//! `DDPM_OPS_AVX512=0` keeps the `gemm` crate's), which sums in a different order than the AVX2
//! kernel, so the last bits differ between the two kinds of CPU (the elementwise kernels' AVX-512
//! and AVX2 builds agree bitwise; so do the gathered and scalar Winograd transforms, whichever
//! the per-process measurement picks). Weight and bias gradients are sums
//! over the batch that are split into one fixed, contiguous chunk per thread and then added in
//! chunk order, so a different thread count can change them in the last bits.

mod attention;
mod cat;
mod conv;
mod elem;
mod gemm;
mod im2col;
mod norm;
mod norm_conv;
mod precision;
mod runtime;
mod sgemm512;
mod simd;
mod softmax;
mod upsample;
mod winograd;

pub use attention::attention;
pub use cat::cat_channels;
pub use conv::{conv2d, conv2d_grads};
pub use norm::{group_norm, group_norm_masked};
pub use norm_conv::{norm_conv2d, ConvArgs, NormArgs};
pub use runtime::{
    fast_path_enabled, gather_enabled, init_cpu, kernel_summary, num_threads, set_fast_path,
    set_gather, set_num_threads, set_sgemm512, set_tile_bytes, set_winograd, set_winograd4,
    set_winograd_block_bytes, sgemm512_enabled, thread_shards, tile_bytes, tune_malloc,
    winograd4_enabled, winograd_enabled, DEFAULT_TILE_BYTES, SHARD_MAX_PARAMS,
};
pub use softmax::{softmax_last_dim, softmax_scaled};
pub use upsample::upsample_nearest2x;
