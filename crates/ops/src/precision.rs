//! The mixed-precision policy of the ops, as PyTorch's bf16 autocast: half-precision (bf16, f16)
//! inputs to GroupNorm and softmax are computed in f32, because their statistics and
//! exponentials lose too much in an 8-bit mantissa; on the CPU the convolution and attention
//! kernels also run on f32 copies (exactly the bf16 values, accumulated in f32, as a GPU's bf16
//! tensor cores do), since candle's CPU bf16 GEMM is a slow generic loop. The result is rounded
//! back to the input's dtype, so the caller's graph stays in half precision, and the casts are
//! ordinary differentiable candle ops.

use candle_core::DType;

/// bf16 or f16.
pub(crate) fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}
