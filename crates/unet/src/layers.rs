//! Primitive layers. Each is a thin, separately testable wrapper so that a faster kernel (a fused
//! GroupNorm+SiLU, a GEMM-based conv with its own backward) can replace one of them without
//! touching the blocks. Initial values follow PyTorch's defaults, as improved-diffusion relies on
//! them: weights and biases `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, GroupNorm `(1, 0)`, and zeros for
//! the layers improved-diffusion wraps in `zero_module`.

use candle_core::{Module, Tensor};
use candle_nn::Init;

use crate::error::Result;
use crate::params::ParamBuilder;

fn fan_in_uniform(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

fn init_for(fan_in: usize, zero: bool) -> Init {
    if zero {
        Init::Const(0.0)
    } else {
        fan_in_uniform(fan_in)
    }
}

/// 2-D convolution with bias (`weight [out, in, k, k]`, `bias [out]`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// `zero`: start at zero (improved-diffusion's `zero_module`), so a residual branch is the
    /// identity at initialisation.
    pub fn new(
        pb: &ParamBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        zero: bool,
    ) -> Result<Self> {
        let fan_in = cin * k * k;
        let weight = pb.get((cout, cin, k, k), "weight", init_for(fan_in, zero))?;
        let bias = pb.get(cout, "bias", init_for(fan_in, zero))?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding: k / 2,
        })
    }
}

impl Conv2d {
    /// This conv as the second half of a fused [`GroupNorm::silu_conv`].
    pub fn args(&self) -> ddpm_ops::ConvArgs<'_> {
        ddpm_ops::ConvArgs {
            weight: &self.weight,
            bias: &self.bias,
            stride: self.stride,
            padding: self.padding,
        }
    }
}

impl Module for Conv2d {
    /// ddpm-ops' GEMM conv with its own backward on CPU (candle's built-in conv elsewhere, or
    /// with `DDPM_OPS=candle`).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ddpm_ops::conv2d(x, &self.weight, Some(&self.bias), self.stride, self.padding)
    }
}

/// Fully connected layer (`weight [out, in]`, `bias [out]`) on `[B, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn new(pb: &ParamBuilder, cin: usize, cout: usize, zero: bool) -> Result<Self> {
        let weight = pb.get((cout, cin), "weight", init_for(cin, zero))?;
        let bias = pb.get(cout, "bias", init_for(cin, zero))?;
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// A 1x1 1-D convolution (`weight [out, in, 1]`, the shape improved-diffusion's `qkv`/`proj_out`
/// have) applied to token-major features `[B, T, in] -> [B, T, out]` as one matrix product.
#[derive(Debug, Clone)]
pub struct Proj1x1 {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Proj1x1 {
    pub fn new(pb: &ParamBuilder, cin: usize, cout: usize, zero: bool) -> Result<Self> {
        let weight = pb.get((cout, cin, 1), "weight", init_for(cin, zero))?;
        let bias = pb.get(cout, "bias", init_for(cin, zero))?;
        Ok(Self { weight, bias })
    }
}

impl Module for Proj1x1 {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let w = self.weight.squeeze(2)?;
        let y = x
            .reshape((b * t, c))?
            .matmul(&w.t()?)?
            .broadcast_add(&self.bias)?;
        y.reshape((b, t, ()))
    }
}

/// Group normalisation over `[B, C, ...]` (statistics per example and group, affine per channel),
/// eps 1e-5 as PyTorch's `GroupNorm`. Runs ddpm-ops' fused kernel (its composite fallback off
/// the CPU).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(pb: &ParamBuilder, groups: usize, channels: usize) -> Result<Self> {
        let weight = pb.get(channels, "weight", Init::Const(1.0))?;
        let bias = pb.get(channels, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps: 1e-5,
        })
    }

    /// `silu(self.forward(x))` in one fused op (ddpm-ops; candle's composite off the CPU).
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ddpm_ops::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
    }

    /// `conv(silu(self.forward(x)) * mask) + residual` in one op (the normalised activation is
    /// no node of the graph: no gradient buffer for it). `mask`: a dropout mask, or none.
    pub fn silu_conv(
        &self,
        x: &Tensor,
        conv: ddpm_ops::ConvArgs,
        mask: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.affine_silu_conv(x, (&self.weight, &self.bias), conv, mask, residual)
    }

    /// [`Self::silu_conv`] with scale-shift conditioning: `silu(self.forward(x) * (1 + scale) +
    /// shift)` for per-example `scale`, `shift` `[B, C]`, which is the same GroupNorm with the
    /// per-example affine `gamma (1 + scale)`, `beta (1 + scale) + shift`.
    pub fn scale_shift_silu_conv(
        &self,
        x: &Tensor,
        (scale, shift): (&Tensor, &Tensor),
        conv: ddpm_ops::ConvArgs,
        mask: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let scale1 = (scale + 1.0)?;
        let gamma = scale1.broadcast_mul(&self.weight)?;
        let beta = (scale1.broadcast_mul(&self.bias)? + shift)?;
        self.affine_silu_conv(x, (&gamma, &beta), conv, mask, residual)
    }

    fn affine_silu_conv(
        &self,
        x: &Tensor,
        (gamma, beta): (&Tensor, &Tensor),
        conv: ddpm_ops::ConvArgs,
        mask: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let norm = ddpm_ops::NormArgs {
            gamma,
            beta,
            groups: self.groups,
            eps: self.eps,
            silu: true,
            mask,
        };
        ddpm_ops::norm_conv2d(x, norm, conv, residual)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ddpm_ops::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
    }
}

/// Nearest-neighbour x2 upsampling of `[B, C, H, W]` (ddpm-ops' op; its composite off the CPU has
/// a plain-sum gradient, unlike candle 0.11's `upsample_nearest2d`, whose backward is wrong when its
/// input is reused).
pub fn upsample_nearest2x(x: &Tensor) -> candle_core::Result<Tensor> {
    ddpm_ops::upsample_nearest2x(x)
}
