//! The denoising U-Net (Ho et al. 2020, improved-diffusion's `UNetModel`).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::blocks::{
    norm_silu, AttentionBlock, ClassEmbed, Downsample, ResBlock, ResBlockSpec, TimeEmbed, Upsample,
};
use crate::config::{Trunk, UNetConfig};
use crate::ctx::ForwardCtx;
use crate::error::{Result, UNetError};
use crate::layers::{Conv2d, GroupNorm};
use crate::params::{ParamBuilder, SeededInit};
use crate::plan::{unet_plan, Layer, Plan, Stage};
use crate::summary::{summarize, ModelSummary};

/// One built layer of a stage.
#[derive(Debug, Clone)]
pub(crate) enum Built {
    Conv(Conv2d),
    Res(Box<ResBlock>),
    Attn(AttentionBlock),
    Down(Downsample),
    Up(Upsample),
}

/// improved-diffusion's `TimestepEmbedSequential`.
#[derive(Debug, Clone)]
pub(crate) struct BuiltStage {
    pub layers: Vec<Built>,
}

impl BuiltStage {
    pub fn forward(&self, x: &Tensor, emb: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = match l {
                Built::Conv(c) => c.forward(&h)?,
                Built::Res(r) => r.forward(&h, emb, ctx)?,
                Built::Attn(a) => a.forward(&h)?,
                Built::Down(d) => d.forward(&h)?,
                Built::Up(u) => u.forward(&h)?,
            };
        }
        Ok(h)
    }
}

/// Builds the layers of one stage; `dropout_layer` numbers the ResBlocks in construction order
/// (input blocks, middle block, output blocks), which fixes each block's dropout stream.
pub(crate) fn build_stage(
    pb: &ParamBuilder,
    stage: &Stage,
    trunk: &Trunk<'_>,
    emb_dim: usize,
    scale_shift: bool,
    dropout_layer: &mut u32,
) -> Result<BuiltStage> {
    let pb = pb.pp(&stage.prefix);
    let mut layers = Vec::with_capacity(stage.layers.len());
    for (i, l) in stage.layers.iter().enumerate() {
        let pbi = pb.pp(i);
        layers.push(match *l {
            Layer::Conv { cin, cout } => Built::Conv(Conv2d::new(&pbi, cin, cout, 3, 1, false)?),
            Layer::Res { cin, cout } => {
                let spec = ResBlockSpec {
                    cin,
                    cout,
                    emb_dim,
                    groups: trunk.num_groups,
                    scale_shift,
                    dropout: trunk.dropout,
                    dropout_layer: *dropout_layer,
                };
                *dropout_layer += 1;
                Built::Res(Box::new(ResBlock::new(&pbi, spec)?))
            }
            Layer::Attn { ch, heads } => {
                Built::Attn(AttentionBlock::new(&pbi, ch, heads, trunk.num_groups)?)
            }
            Layer::Down { ch } => Built::Down(Downsample::new(&pbi, ch)?),
            Layer::Up { ch } => Built::Up(Upsample::new(&pbi, ch)?),
        });
    }
    Ok(BuiltStage { layers })
}

/// Checks `x` is `[B, in_channels, image_size, image_size]` and `t` is `[B]`.
pub(crate) fn check_input(
    x: &Tensor,
    t: &Tensor,
    in_channels: usize,
    image_size: usize,
) -> Result<usize> {
    let dims = x.dims();
    if dims.len() != 4 || dims[1] != in_channels || dims[2] != image_size || dims[3] != image_size {
        return Err(UNetError::Input(format!(
            "x has shape {dims:?}, the model takes [B, {in_channels}, {image_size}, {image_size}]"
        )));
    }
    if t.dims() != [dims[0]] {
        return Err(UNetError::Input(format!(
            "t has shape {:?}, expected [{}] (one timestep per example)",
            t.dims(),
            dims[0]
        )));
    }
    Ok(dims[0])
}

/// The denoising network. Parameter names (stable; they match improved-diffusion's `state_dict`
/// keys, see the crate documentation) are listed by [`UNet::named_parameters`].
#[derive(Debug, Clone)]
pub struct UNet {
    config: UNetConfig,
    plan: Plan,
    time_embed: TimeEmbed,
    label_emb: Option<ClassEmbed>,
    input_blocks: Vec<BuiltStage>,
    middle_block: BuiltStage,
    output_blocks: Vec<BuiltStage>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    params: Vec<(String, Tensor)>,
    dtype: DType,
}

impl UNet {
    /// Builds the model, fetching (or creating) its parameters through `vb`.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let pb = ParamBuilder::new(vb);
        let trunk = config.trunk();
        let plan = unet_plan(config);
        let emb_dim = config.time_embed_dim();
        let time_embed = TimeEmbed::new(&pb.pp("time_embed"), config.model_channels, emb_dim)?;
        let label_emb = match config.num_classes {
            Some(n) => Some(ClassEmbed::new(&pb.pp("label_emb"), n, emb_dim)?),
            None => None,
        };
        let ss = config.use_scale_shift_norm;
        let mut dl = 0u32;
        let input_blocks = plan
            .input
            .iter()
            .map(|s| build_stage(&pb, s, &trunk, emb_dim, ss, &mut dl))
            .collect::<Result<Vec<_>>>()?;
        let middle_block = build_stage(&pb, &plan.middle, &trunk, emb_dim, ss, &mut dl)?;
        let output_blocks = plan
            .output
            .iter()
            .map(|s| build_stage(&pb, s, &trunk, emb_dim, ss, &mut dl))
            .collect::<Result<Vec<_>>>()?;
        let out_norm = GroupNorm::new(&pb.pp("out.0"), config.num_groups, plan.top_channels)?;
        let out_conv = Conv2d::new(
            &pb.pp("out.2"),
            plan.top_channels,
            config.out_channels(),
            3,
            1,
            true,
        )?;
        Ok(Self {
            config: config.clone(),
            plan,
            time_embed,
            label_emb,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm,
            out_conv,
            params: pb.recorded(),
            dtype: pb.dtype(),
        })
    }

    /// Builds the model with fresh parameters in a new `VarMap`, initialised reproducibly from
    /// `seed` (see [`SeededInit`]). The `VarMap` holds the trainable variables.
    pub fn init(
        config: &UNetConfig,
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

    /// Predicts from a noisy batch.
    ///
    /// - `x`: `[B, in_channels, image_size, image_size]`, converted to the model's dtype.
    /// - `t`: `[B]` model timesteps (float; a respaced diffusion passes its `timestep_map` values).
    /// - `y`: `[B]` integer labels for a class-conditional model (`num_classes` is the null label);
    ///   must be `None` for an unconditional one.
    ///
    /// Returns `[B, out_channels, H, W]`: epsilon (and, with `learn_sigma`, the variance interpolant
    /// as the second half of the channels).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        y: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let b = check_input(x, t, self.config.in_channels, self.config.image_size)?;
        let mut emb = self.time_embed.forward(t)?;
        match (&self.label_emb, y) {
            (Some(le), Some(y)) => {
                if y.dims() != [b] {
                    return Err(UNetError::Input(format!(
                        "y has shape {:?}, expected [{b}]",
                        y.dims()
                    )));
                }
                emb = (emb + le.forward(y)?)?;
            }
            (Some(le), None) => {
                return Err(UNetError::Input(format!(
                    "the model is class-conditional: pass labels (use {} for the null label)",
                    le.num_classes
                )))
            }
            (None, Some(_)) => {
                return Err(UNetError::Input(
                    "the model is unconditional: pass no labels".into(),
                ))
            }
            (None, None) => {}
        }
        let mut h = x.to_dtype(self.dtype)?;
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        for s in &self.input_blocks {
            h = s.forward(&h, &emb, ctx)?;
            skips.push(h.clone());
        }
        h = self.middle_block.forward(&h, &emb, ctx)?;
        for s in &self.output_blocks {
            let skip = skips
                .pop()
                .ok_or_else(|| UNetError::Input("internal: skip stack empty".into()))?;
            h = s.forward(&ddpm_ops::cat_channels(&h, &skip)?, &emb, ctx)?;
        }
        Ok(self.out_conv.forward(&norm_silu(&self.out_norm, &h)?)?)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// All parameters with their stable names, in construction order.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// Per-level description (resolution, width, blocks, attention, parameter count).
    pub fn summary(&self) -> ModelSummary {
        summarize(
            &self.plan.stages().cloned().collect::<Vec<_>>(),
            &self.params,
            &["time_embed", "label_emb"],
            "out",
            format!("{:?}", self.config),
        )
    }
}
