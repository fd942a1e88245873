//! Fused noising and sampler-update ops with CPU and CUDA implementations
