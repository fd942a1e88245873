//! Module wrappers holding their parameters, for code that composes `candle_core::Module`s.

use candle_core::{Module, Result, Tensor};

/// A conv layer running [`crate::conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `[cout, cin, kh, kw]`
    pub weight: Tensor,
    /// `[cout]`
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
    }
}

/// A GroupNorm layer running [`crate::group_norm`], with SiLU fused when `silu`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// `[C]`
    pub weight: Tensor,
    /// `[C]`
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::group_norm(
            x,
            &self.weight,
            &self.bias,
            self.groups,
            self.eps,
            self.silu,
        )
    }
}
