//! The U-Net's building blocks (improved-diffusion's `ResBlock`, `AttentionBlock`, `Downsample`,
//! `Upsample`, the timestep MLP, guided-diffusion's `AttentionPool2d`). Each takes a
//! [`ParamBuilder`] already prefixed with its own name, so the parameter names below are relative.

use candle_core::{Module, Tensor};
use candle_nn::Init;
use ddpm_diffusion::embedding::timestep_embedding;

use crate::ctx::ForwardCtx;
use crate::error::{Result, UNetError};
use crate::layers::{upsample_nearest2x, Conv2d, GroupNorm, Linear, Proj1x1};
use crate::params::ParamBuilder;

/// `silu(norm(x))`, the pre-activation used before every conv; one function so a fused kernel
/// can replace it.
pub fn norm_silu(norm: &GroupNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    norm.forward_silu(x)
}

/// Sinusoidal features -> Linear -> SiLU -> Linear (`0.*`, `2.*` as improved-diffusion's
/// `time_embed` Sequential).
#[derive(Debug, Clone)]
pub struct TimeEmbed {
    pub lin1: Linear,
    pub lin2: Linear,
    pub freq_dim: usize,
}

impl TimeEmbed {
    pub fn new(pb: &ParamBuilder, freq_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            lin1: Linear::new(&pb.pp("0"), freq_dim, dim, false)?,
            lin2: Linear::new(&pb.pp("2"), dim, dim, false)?,
            freq_dim,
        })
    }

    /// `t`: `[B]` model timesteps in any float dtype (converted to the parameters' dtype).
    pub fn forward(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let t = t.to_dtype(self.lin1.weight.dtype())?;
        self.forward_features(&timestep_embedding(&t, self.freq_dim, 10_000.0)?)
    }

    /// The MLP alone, on precomputed sinusoidal features `[B, freq_dim]`.
    pub fn forward_features(&self, f: &Tensor) -> candle_core::Result<Tensor> {
        self.lin2.forward(&self.lin1.forward(f)?.silu()?)
    }
}

/// Label embedding with `num_classes + 1` rows; the last row is the "null" label that
/// classifier-free guidance trains with dropped labels and samples as the unconditional branch.
#[derive(Debug, Clone)]
pub struct ClassEmbed {
    pub weight: Tensor,
    pub num_classes: usize,
}

impl ClassEmbed {
    pub fn new(pb: &ParamBuilder, num_classes: usize, dim: usize) -> Result<Self> {
        // N(0, 1) as torch.nn.Embedding.
        let weight = pb.get(
            (num_classes + 1, dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        Ok(Self {
            weight,
            num_classes,
        })
    }

    /// `y`: `[B]` integer labels in `0..=num_classes` (`num_classes` = null).
    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        let y = y.to_dtype(candle_core::DType::U32)?;
        let labels = y.to_vec1::<u32>()?;
        if let Some(bad) = labels.iter().find(|&&l| l as usize > self.num_classes) {
            return Err(UNetError::Input(format!(
                "label {bad} out of range: labels must be in 0..={} ({} = null label)",
                self.num_classes, self.num_classes
            )));
        }
        Ok(self.weight.index_select(&y, 0)?)
    }
}

/// improved-diffusion's ResBlock. Names: `in_layers.0` (GroupNorm), `in_layers.2` (conv),
/// `emb_layers.1` (Linear), `out_layers.0` (GroupNorm), `out_layers.3` (zero-initialised conv),
/// `skip_connection` (1x1 conv, only when the width changes).
#[derive(Debug, Clone)]
pub struct ResBlock {
    pub in_norm: GroupNorm,
    pub in_conv: Conv2d,
    pub emb_proj: Linear,
    pub out_norm: GroupNorm,
    pub out_conv: Conv2d,
    pub skip: Option<Conv2d>,
    pub scale_shift: bool,
    pub dropout: f64,
    /// Index of this block's dropout stream (`StreamKey::dropout(.., layer, ..)`).
    pub dropout_layer: u32,
    pub out_channels: usize,
}

/// Construction arguments of a [`ResBlock`].
#[derive(Debug, Clone, Copy)]
pub struct ResBlockSpec {
    pub cin: usize,
    pub cout: usize,
    pub emb_dim: usize,
    pub groups: usize,
    pub scale_shift: bool,
    pub dropout: f64,
    pub dropout_layer: u32,
}

impl ResBlock {
    pub fn new(pb: &ParamBuilder, s: ResBlockSpec) -> Result<Self> {
        let emb_out = if s.scale_shift { 2 * s.cout } else { s.cout };
        Ok(Self {
            in_norm: GroupNorm::new(&pb.pp("in_layers.0"), s.groups, s.cin)?,
            in_conv: Conv2d::new(&pb.pp("in_layers.2"), s.cin, s.cout, 3, 1, false)?,
            emb_proj: Linear::new(&pb.pp("emb_layers.1"), s.emb_dim, emb_out, false)?,
            out_norm: GroupNorm::new(&pb.pp("out_layers.0"), s.groups, s.cout)?,
            out_conv: Conv2d::new(&pb.pp("out_layers.3"), s.cout, s.cout, 3, 1, true)?,
            skip: if s.cin != s.cout {
                Some(Conv2d::new(
                    &pb.pp("skip_connection"),
                    s.cin,
                    s.cout,
                    1,
                    1,
                    false,
                )?)
            } else {
                None
            },
            scale_shift: s.scale_shift,
            dropout: s.dropout,
            dropout_layer: s.dropout_layer,
            out_channels: s.cout,
        })
    }

    /// `x [B, cin, H, W]`, `emb [B, emb_dim]` -> `[B, cout, H, W]`.
    pub fn forward(&self, x: &Tensor, emb: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, c) = (x.dim(0)?, self.out_channels);
        let e = self.emb_proj.forward(&emb.silu()?)?;
        let (_, _, hh, ww) = x.dims4()?;
        let mask = ctx.dropout_mask(
            self.dropout_layer,
            self.dropout,
            &[b, c, hh, ww],
            x.dtype(),
            x.device(),
        )?;
        let pre = norm_silu(&self.in_norm, x)?;
        let h = if self.scale_shift {
            self.in_conv.forward(&pre)?
        } else {
            // The embedding folded into a per-example conv bias: no pass over the activations.
            let conv = &self.in_conv;
            let bias = e.broadcast_add(&conv.bias)?;
            ddpm_ops::conv2d(&pre, &conv.weight, Some(&bias), conv.stride, conv.padding)?
        };
        let skip = match &self.skip {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        // The output half (GroupNorm, scale-shift, SiLU, dropout, conv, skip connection) is one
        // op. (The input half stays two: fusing it measured slower in ddpm-train's batch-shard
        // step, bench/RESULTS.md.)
        let (mask, out) = (mask.as_ref(), self.out_conv.args());
        Ok(if self.scale_shift {
            let scale_shift = (&e.narrow(1, 0, c)?, &e.narrow(1, c, c)?);
            self.out_norm
                .scale_shift_silu_conv(&h, scale_shift, out, mask, Some(&skip))?
        } else {
            self.out_norm.silu_conv(&h, out, mask, Some(&skip))?
        })
    }
}

/// Order of the q/k/v channels inside the qkv projection's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvOrder {
    /// improved-diffusion (guided-diffusion's `QKVAttentionLegacy`): split heads, then q/k/v, i.e.
    /// channel layout `[head][q|k|v][head_dim]`.
    HeadsFirst,
    /// guided-diffusion's `QKVAttention` (used by `AttentionPool2d`): `[q|k|v][head][head_dim]`.
    QkvFirst,
}

/// Multi-head dot-product attention over tokens: `qkv [B, T, 3C] -> [B, T, C]`. Uses ddpm-ops'
/// softmax (with backward; `candle_nn::ops::softmax_last_dim` has none in candle 0.11).
pub fn qkv_attention(qkv: &Tensor, heads: usize, order: QkvOrder) -> candle_core::Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let d = c / heads;
    let (split_dim, qkv) = match order {
        QkvOrder::HeadsFirst => (3, qkv.reshape((b, t, heads, 3, d))?),
        QkvOrder::QkvFirst => (2, qkv.reshape((b, t, 3, heads, d))?),
    };
    // [B, T, H, d] -> [B, H, T, d]
    let part = |i: usize| -> candle_core::Result<Tensor> {
        qkv.narrow(split_dim, i, 1)?
            .squeeze(split_dim)?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = (part(0)? * (1.0 / (d as f64).sqrt()))?;
    let k = part(1)?;
    let v = part(2)?;
    let w = q.matmul(&k.t()?)?;
    let w = ddpm_ops::softmax_last_dim(&w)?;
    let a = w.matmul(&v)?; // [B, H, T, d]
    a.transpose(1, 2)?.reshape((b, t, c))
}

/// Self-attention over the spatial positions of a feature map, with a residual connection.
/// Names: `norm`, `qkv` (`[3C, C, 1]`), `proj_out` (`[C, C, 1]`, zero-initialised).
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    pub norm: GroupNorm,
    pub qkv: Proj1x1,
    pub proj_out: Proj1x1,
    pub heads: usize,
}

impl AttentionBlock {
    pub fn new(pb: &ParamBuilder, channels: usize, heads: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(&pb.pp("norm"), groups, channels)?,
            qkv: Proj1x1::new(&pb.pp("qkv"), channels, 3 * channels, false)?,
            proj_out: Proj1x1::new(&pb.pp("proj_out"), channels, channels, true)?,
            heads,
        })
    }

    /// Channel-major, as improved-diffusion's `QKVAttentionLegacy`: q, k and v come from three
    /// 1x1 convolutions with the matching rows of `qkv` (so the activations are never split or
    /// transposed), `v softmax(q^T k / sqrt(d))^T` is one ddpm-ops op, and `proj_out` is a 1x1
    /// convolution. The same function as splitting one `qkv` projection `[head][q|k|v][d]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let heads = self.heads;
        let d = c / heads;
        let normed = self.norm.forward(x)?;
        let weight = self.qkv.weight.reshape((heads, 3, d, c))?;
        let bias = self.qkv.bias.reshape((heads, 3, d))?;
        let part = |i: usize| -> candle_core::Result<Tensor> {
            let wi = weight.narrow(1, i, 1)?.reshape((c, c, 1, 1))?;
            let bi = bias.narrow(1, i, 1)?.reshape(c)?;
            ddpm_ops::conv2d(&normed, &wi, Some(&bi), 1, 0)?.reshape((b * heads, d, h * w))
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let a = ddpm_ops::attention(&q, &k, &v, 1.0 / (d as f64).sqrt())?.reshape((b, c, h, w))?;
        let proj = self.proj_out.weight.reshape((c, c, 1, 1))?;
        x + ddpm_ops::conv2d(&a, &proj, Some(&self.proj_out.bias), 1, 0)?
    }
}

/// Strided 3x3 convolution halving the resolution (`op`).
#[derive(Debug, Clone)]
pub struct Downsample {
    pub op: Conv2d,
}

impl Downsample {
    pub fn new(pb: &ParamBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            op: Conv2d::new(&pb.pp("op"), channels, channels, 3, 2, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.op.forward(x)
    }
}

/// Nearest x2 upsampling followed by a 3x3 convolution (`conv`).
#[derive(Debug, Clone)]
pub struct Upsample {
    pub conv: Conv2d,
}

impl Upsample {
    pub fn new(pb: &ParamBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&pb.pp("conv"), channels, channels, 3, 1, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(&upsample_nearest2x(x)?)
    }
}

/// CLIP-style attention pooling (guided-diffusion's `AttentionPool2d`): the mean token, prepended
/// to the spatial tokens with learned positional embeddings, attends to all of them; its output is
/// projected to the logits. Names: `positional_embedding [C, HW+1]`, `qkv_proj [3C, C, 1]`,
/// `c_proj [out, C, 1]`.
#[derive(Debug, Clone)]
pub struct AttentionPool2d {
    pub positional_embedding: Tensor,
    pub qkv_proj: Proj1x1,
    pub c_proj: Proj1x1,
    pub heads: usize,
}

impl AttentionPool2d {
    pub fn new(
        pb: &ParamBuilder,
        spatial: usize,
        channels: usize,
        heads: usize,
        out: usize,
    ) -> Result<Self> {
        let std = 1.0 / (channels as f64).sqrt();
        Ok(Self {
            positional_embedding: pb.get(
                (channels, spatial * spatial + 1),
                "positional_embedding",
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
            qkv_proj: Proj1x1::new(&pb.pp("qkv_proj"), channels, 3 * channels, false)?,
            c_proj: Proj1x1::new(&pb.pp("c_proj"), channels, out, false)?,
            heads,
        })
    }

    /// `[B, C, H, W] -> [B, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let x = x.reshape((b, c, h * w))?;
        let x = Tensor::cat(&[x.mean_keepdim(2)?, x], 2)?;
        let x = x.broadcast_add(&self.positional_embedding.unsqueeze(0)?)?;
        let tokens = x.transpose(1, 2)?.contiguous()?; // [B, HW+1, C]
        let a = qkv_attention(
            &self.qkv_proj.forward(&tokens)?,
            self.heads,
            QkvOrder::QkvFirst,
        )?;
        self.c_proj.forward(&a)?.narrow(1, 0, 1)?.squeeze(1)
    }
}
