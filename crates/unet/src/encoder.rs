//! Noise-aware classifier for classifier guidance (guided-diffusion's `EncoderUNetModel`): the
//! U-Net's encoder half and middle block, then a pooling head producing class logits.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::blocks::{norm_silu, AttentionPool2d, TimeEmbed};
use crate::config::{EncoderUNetConfig, PoolKind};
use crate::ctx::ForwardCtx;
use crate::error::Result;
use crate::layers::{Conv2d, GroupNorm};
use crate::params::{ParamBuilder, SeededInit};
use crate::plan::{trunk_plan, Stage};
use crate::summary::{summarize, ModelSummary};
use crate::unet::{build_stage, check_input, BuiltStage};

#[derive(Debug, Clone)]
enum Head {
    /// `out.0` GroupNorm, SiLU, global mean, `out.3` zero-initialised 1x1 conv.
    Adaptive { norm: GroupNorm, proj: Conv2d },
    /// `out.0` GroupNorm, SiLU, `out.2` attention pooling.
    Attention {
        norm: GroupNorm,
        pool: AttentionPool2d,
    },
}

/// The classifier `p(y | x_t, t)` whose input gradient guides sampling.
#[derive(Debug, Clone)]
pub struct EncoderUNet {
    config: EncoderUNetConfig,
    stages: Vec<Stage>,
    time_embed: TimeEmbed,
    input_blocks: Vec<BuiltStage>,
    middle_block: BuiltStage,
    head: Head,
    params: Vec<(String, Tensor)>,
    dtype: DType,
}

impl EncoderUNet {
    pub fn new(config: &EncoderUNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let pb = ParamBuilder::new(vb);
        let trunk = config.trunk();
        let (input, middle, _, ch) = trunk_plan(&trunk);
        let emb_dim = config.time_embed_dim();
        let time_embed = TimeEmbed::new(&pb.pp("time_embed"), config.model_channels, emb_dim)?;
        let ss = config.use_scale_shift_norm;
        let mut dl = 0u32;
        let input_blocks = input
            .iter()
            .map(|s| build_stage(&pb, s, &trunk, emb_dim, ss, &mut dl))
            .collect::<Result<Vec<_>>>()?;
        let middle_block = build_stage(&pb, &middle, &trunk, emb_dim, ss, &mut dl)?;
        let norm = GroupNorm::new(&pb.pp("out.0"), config.num_groups, ch)?;
        let head = match config.pool {
            PoolKind::Adaptive => Head::Adaptive {
                norm,
                proj: Conv2d::new(&pb.pp("out.3"), ch, config.num_classes, 1, 1, true)?,
            },
            PoolKind::Attention => {
                let spatial = middle.resolution;
                let heads = trunk.heads(ch);
                Head::Attention {
                    norm,
                    pool: AttentionPool2d::new(
                        &pb.pp("out.2"),
                        spatial,
                        ch,
                        heads,
                        config.num_classes,
                    )?,
                }
            }
        };
        let mut stages = input;
        stages.push(middle);
        Ok(Self {
            config: config.clone(),
            stages,
            time_embed,
            input_blocks,
            middle_block,
            head,
            params: pb.recorded(),
            dtype: pb.dtype(),
        })
    }

    /// Fresh reproducible parameters in a new `VarMap` (see [`SeededInit`]).
    pub fn init(
        config: &EncoderUNetConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        let varmap = VarMap::new();
        let model = Self::new(
            config,
            SeededInit::var_builder(&varmap, seed, dtype, device),
        )?;
        Ok((model, varmap))
    }

    /// `x [B, C, H, W]`, `t [B]` -> logits `[B, num_classes]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        check_input(x, t, self.config.in_channels, self.config.image_size)?;
        let emb = self.time_embed.forward(t)?;
        let mut h = x.to_dtype(self.dtype)?;
        for s in &self.input_blocks {
            h = s.forward(&h, &emb, ctx)?;
        }
        h = self.middle_block.forward(&h, &emb, ctx)?;
        Ok(match &self.head {
            Head::Adaptive { norm, proj } => {
                let pooled = norm_silu(norm, &h)?.mean_keepdim(3)?.mean_keepdim(2)?;
                proj.forward(&pooled)?.flatten_from(1)?
            }
            Head::Attention { norm, pool } => pool.forward(&norm_silu(norm, &h)?)?,
        })
    }

    /// Features and logits: `([B, ch]` global mean of the normalised, activated last feature map
    /// (the input of the adaptive head's projection), `[B, num_classes]` logits as [`Self::forward`]).
    /// The features are the embedding of ddpm-sampler's classifier Frechet distance (`ddpm-eval fid`).
    pub fn forward_features(
        &self,
        x: &Tensor,
        t: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, Tensor)> {
        check_input(x, t, self.config.in_channels, self.config.image_size)?;
        let emb = self.time_embed.forward(t)?;
        let mut h = x.to_dtype(self.dtype)?;
        for s in &self.input_blocks {
            h = s.forward(&h, &emb, ctx)?;
        }
        h = self.middle_block.forward(&h, &emb, ctx)?;
        let (feats, logits) = match &self.head {
            Head::Adaptive { norm, proj } => {
                let pooled = norm_silu(norm, &h)?.mean_keepdim(3)?.mean_keepdim(2)?;
                (pooled.clone(), proj.forward(&pooled)?.flatten_from(1)?)
            }
            Head::Attention { norm, pool } => {
                let a = norm_silu(norm, &h)?;
                (a.mean_keepdim(3)?.mean_keepdim(2)?, pool.forward(&a)?)
            }
        };
        Ok((feats.flatten_from(1)?, logits))
    }

    pub fn config(&self) -> &EncoderUNetConfig {
        &self.config
    }

    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, t)| t.elem_count()).sum()
    }

    pub fn summary(&self) -> ModelSummary {
        summarize(
            &self.stages,
            &self.params,
            &["time_embed"],
            "out",
            format!("{:?}", self.config),
        )
    }
}
