//! Model configuration: the `[model]` table of the training TOML, its validation, and presets.
//!
//! Validation happens here, before any tensor is allocated, so a typo in a config fails in
//! milliseconds with the name of the key to fix instead of deep inside a forward pass.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{config_err, Result, UNetError};

fn default_num_heads() -> usize {
    1
}
fn default_num_groups() -> usize {
    32
}

/// The denoising U-Net's hyper-parameters (improved-diffusion's `UNetModel` arguments).
///
/// `attention_resolutions` lists feature-map *resolutions* (e.g. `[16]` puts attention on the
/// 16x16 level of a 32x32 model), not improved-diffusion's downsample rates. `num_groups` is the
/// GroupNorm group count (32 in every published model); it exists so tests can build tiny models
/// whose channel counts are not multiples of 32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Height and width of the (square) input images.
    pub image_size: usize,
    /// Image channels (3 for RGB, 1 for grey scale).
    pub in_channels: usize,
    /// Base channel count; level `i` has `model_channels * channel_mult[i]` channels.
    pub model_channels: usize,
    /// ResBlocks per level in the encoder (the decoder has one more per level).
    pub num_res_blocks: usize,
    /// Feature-map resolutions that get a self-attention block after each ResBlock.
    #[serde(default)]
    pub attention_resolutions: Vec<usize>,
    /// Dropout probability inside every ResBlock (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Channel multiplier per level; the number of levels is its length.
    pub channel_mult: Vec<usize>,
    /// Number of classes for class conditioning; the embedding gets one extra row, the "null"
    /// label (index `num_classes`) used by classifier-free guidance.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Attention heads (ignored when `num_head_channels` is set).
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    /// Channels per attention head; the head count then varies with the level's width.
    #[serde(default)]
    pub num_head_channels: Option<usize>,
    /// FiLM-style conditioning: the timestep embedding scales and shifts the second GroupNorm.
    #[serde(default)]
    pub use_scale_shift_norm: bool,
    /// Output `2 * in_channels` channels: epsilon and the learned-range variance interpolant.
    #[serde(default)]
    pub learn_sigma: bool,
    /// GroupNorm groups (default 32).
    #[serde(default = "default_num_groups")]
    pub num_groups: usize,
}

/// How the noise-aware classifier turns the last feature map into logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// GroupNorm -> SiLU -> global average pool -> zero-initialised 1x1 conv.
    Adaptive,
    /// GroupNorm -> SiLU -> CLIP-style attention pooling (guided-diffusion's default classifier).
    Attention,
}

/// The noise-aware classifier's hyper-parameters (guided-diffusion's `EncoderUNetModel`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderUNetConfig {
    pub image_size: usize,
    pub in_channels: usize,
    pub model_channels: usize,
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attention_resolutions: Vec<usize>,
    #[serde(default)]
    pub dropout: f64,
    pub channel_mult: Vec<usize>,
    /// Number of output logits.
    pub num_classes: usize,
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    #[serde(default)]
    pub num_head_channels: Option<usize>,
    #[serde(default)]
    pub use_scale_shift_norm: bool,
    #[serde(default = "default_num_groups")]
    pub num_groups: usize,
    pub pool: PoolKind,
}

/// Upper bounds on every dimension read from a config file, a `--set` or a checkpoint manifest,
/// checked before anything is allocated: a typo or a damaged file must give an error naming the key,
/// not an allocation abort. Far above any model this crate is meant for (a 256x256 ImageNet U-Net
/// has model_channels 256, channel_mult up to 4, ~550 M parameters).
pub mod limits {
    pub const IMAGE_SIZE: usize = 1024;
    pub const IN_CHANNELS: usize = 64;
    pub const MODEL_CHANNELS: usize = 1024;
    pub const NUM_RES_BLOCKS: usize = 16;
    pub const LEVELS: usize = 8;
    /// Channels of the widest level (`model_channels * max(channel_mult)`).
    pub const LEVEL_CHANNELS: usize = 4096;
    pub const NUM_HEADS: usize = 256;
    pub const NUM_GROUPS: usize = 1024;
    pub const NUM_CLASSES: usize = 100_000;
    /// Estimated parameters (3x3 conv weights of every ResBlock, encoder and decoder).
    pub const PARAMETERS: u64 = 4_000_000_000;
}

fn at_most(key: &'static str, value: usize, max: usize) -> Result<()> {
    if value > max {
        return Err(config_err(
            key,
            format!("must be at most {max}, got {value}"),
        ));
    }
    Ok(())
}

/// One resolution level of the encoder, as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelPlan {
    pub resolution: usize,
    pub channels: usize,
    pub attention: bool,
}

/// The architecture fields shared by the U-Net and the encoder classifier.
pub(crate) struct Trunk<'a> {
    pub image_size: usize,
    pub in_channels: usize,
    pub model_channels: usize,
    pub num_res_blocks: usize,
    pub attention_resolutions: &'a [usize],
    pub dropout: f64,
    pub channel_mult: &'a [usize],
    pub num_heads: usize,
    pub num_head_channels: Option<usize>,
    pub num_groups: usize,
}

impl Trunk<'_> {
    fn levels(&self) -> Vec<LevelPlan> {
        self.channel_mult
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let resolution = self.image_size >> i;
                LevelPlan {
                    resolution,
                    channels: self.model_channels * m,
                    attention: self.attention_resolutions.contains(&resolution),
                }
            })
            .collect()
    }

    pub fn heads(&self, channels: usize) -> usize {
        match self.num_head_channels {
            Some(c) if c > 0 => channels / c,
            _ => self.num_heads,
        }
    }

    /// Checks everything that does not depend on the decoder; `norm_channels` are the extra
    /// GroupNorm widths the caller's head/decoder uses.
    /// The upper bounds of [`limits`], before any product of them is formed.
    fn check_limits(&self) -> Result<()> {
        at_most("image_size", self.image_size, limits::IMAGE_SIZE)?;
        at_most("in_channels", self.in_channels, limits::IN_CHANNELS)?;
        at_most(
            "model_channels",
            self.model_channels,
            limits::MODEL_CHANNELS,
        )?;
        at_most(
            "num_res_blocks",
            self.num_res_blocks,
            limits::NUM_RES_BLOCKS,
        )?;
        if self.channel_mult.len() > limits::LEVELS {
            return Err(config_err(
                "channel_mult",
                format!(
                    "has {} levels, at most {} allowed",
                    self.channel_mult.len(),
                    limits::LEVELS
                ),
            ));
        }
        let widest = self.channel_mult.iter().copied().max().unwrap_or(0);
        if widest > limits::LEVEL_CHANNELS || self.model_channels * widest > limits::LEVEL_CHANNELS
        {
            return Err(config_err(
                "channel_mult",
                format!(
                    "gives a level of model_channels {} x {widest} channels, at most {} allowed",
                    self.model_channels,
                    limits::LEVEL_CHANNELS
                ),
            ));
        }
        at_most("num_heads", self.num_heads, limits::NUM_HEADS)?;
        if let Some(c) = self.num_head_channels {
            at_most("num_head_channels", c, limits::LEVEL_CHANNELS)?;
        }
        at_most("num_groups", self.num_groups, limits::NUM_GROUPS)?;
        let per_block: u64 = self
            .channel_mult
            .iter()
            .map(|&m| 18 * ((self.model_channels * m) as u64).pow(2))
            .sum();
        let estimate = per_block * 2 * (self.num_res_blocks as u64 + 1);
        if estimate > limits::PARAMETERS {
            return Err(config_err(
                "model_channels",
                format!(
                    "with channel_mult {:?} and num_res_blocks {} gives about {estimate} \
                     parameters, more than the {} allowed",
                    self.channel_mult,
                    self.num_res_blocks,
                    limits::PARAMETERS
                ),
            ));
        }
        Ok(())
    }

    fn validate(&self, norm_channels: &[usize]) -> Result<()> {
        self.check_limits()?;
        if self.image_size == 0 {
            return Err(config_err("image_size", "must be positive"));
        }
        if self.in_channels == 0 {
            return Err(config_err("in_channels", "must be positive"));
        }
        if self.model_channels == 0 {
            return Err(config_err("model_channels", "must be positive"));
        }
        if self.num_res_blocks == 0 {
            return Err(config_err("num_res_blocks", "must be at least 1"));
        }
        if self.channel_mult.is_empty() {
            return Err(config_err("channel_mult", "needs at least one level"));
        }
        if let Some(i) = self.channel_mult.iter().position(|&m| m == 0) {
            return Err(config_err("channel_mult", format!("entry {i} is 0")));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(config_err(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        // Strided 3x3 convs map an odd size n to (n+1)/2, and nearest x2 upsampling cannot give the
        // odd size back, so the skip connections would not line up: reject instead of padding.
        let downsamples = self.channel_mult.len() - 1;
        let factor = 1usize << downsamples.min(63);
        if downsamples >= 63 || !self.image_size.is_multiple_of(factor) {
            let sizes: Vec<String> = (0..=downsamples.min(8))
                .map(|i| format!("{}", self.image_size as f64 / (1u64 << i) as f64))
                .collect();
            return Err(config_err(
                "channel_mult",
                format!(
                    "{} levels halve the resolution {} times, so image_size must be divisible by \
                     {factor}; image_size {} gives sizes {} (use fewer levels)",
                    self.channel_mult.len(),
                    downsamples,
                    self.image_size,
                    sizes.join(" -> ")
                ),
            ));
        }
        let levels = self.levels();
        for &r in self.attention_resolutions {
            if !levels.iter().any(|l| l.resolution == r) {
                let have: Vec<String> = levels.iter().map(|l| l.resolution.to_string()).collect();
                return Err(config_err(
                    "attention_resolutions",
                    format!(
                        "{r} is not a feature-map resolution of this model (levels: {})",
                        have.join(", ")
                    ),
                ));
            }
        }
        if self.num_heads == 0 {
            return Err(config_err("num_heads", "must be at least 1"));
        }
        if self.num_head_channels == Some(0) {
            return Err(config_err("num_head_channels", "must be positive"));
        }
        // The middle block always has attention, at the last level's width.
        let mut attn_channels: Vec<usize> = levels
            .iter()
            .filter(|l| l.attention)
            .map(|l| l.channels)
            .collect();
        attn_channels.push(levels.last().map(|l| l.channels).unwrap_or(0));
        for &c in &attn_channels {
            match self.num_head_channels {
                Some(hc) if !c.is_multiple_of(hc) => {
                    return Err(config_err(
                        "num_head_channels",
                        format!("{hc} does not divide the {c} channels of an attention block"),
                    ))
                }
                Some(_) => {}
                None if !c.is_multiple_of(self.num_heads) => {
                    return Err(config_err(
                        "num_heads",
                        format!(
                            "{} heads do not divide the {c} channels of an attention block",
                            self.num_heads
                        ),
                    ))
                }
                None => {}
            }
        }
        if self.num_groups == 0 {
            return Err(config_err("num_groups", "must be positive"));
        }
        let mut widths: Vec<usize> = levels.iter().map(|l| l.channels).collect();
        widths.push(self.model_channels * self.channel_mult[0]);
        widths.extend_from_slice(norm_channels);
        for c in widths {
            if !c.is_multiple_of(self.num_groups) {
                return Err(config_err(
                    "num_groups",
                    format!(
                        "GroupNorm with {} groups needs channel counts divisible by it, but a \
                         layer has {c} channels (model_channels {} x channel_mult {:?}); \
                         change model_channels or num_groups",
                        self.num_groups, self.model_channels, self.channel_mult
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl UNetConfig {
    /// Ho et al. (2020) CIFAR-10 model: 35.7M parameters.
    pub fn ho_cifar10() -> Self {
        Self {
            image_size: 32,
            in_channels: 3,
            model_channels: 128,
            num_res_blocks: 2,
            attention_resolutions: vec![16],
            dropout: 0.1,
            channel_mult: vec![1, 2, 2, 2],
            num_classes: None,
            num_heads: 1,
            num_head_channels: None,
            use_scale_shift_norm: false,
            learn_sigma: false,
            num_groups: 32,
        }
    }

    /// The ~9M-parameter CIFAR-sized model of the speed issue (base 64, same layout as Ho's).
    pub fn cifar10_small() -> Self {
        Self {
            model_channels: 64,
            ..Self::ho_cifar10()
        }
    }

    /// A small class-conditional model for 28x28 Fashion-MNIST (10 classes plus the null label),
    /// cheap enough to train on a 2-core CPU: 28 -> 14 -> 7, attention at 14x14 with 4 heads of 16
    /// channels, scale-shift conditioning.
    pub fn fashion_mnist() -> Self {
        Self {
            image_size: 28,
            in_channels: 1,
            model_channels: 32,
            num_res_blocks: 2,
            attention_resolutions: vec![14],
            dropout: 0.1,
            channel_mult: vec![1, 2, 2],
            num_classes: Some(10),
            num_heads: 4,
            num_head_channels: None,
            use_scale_shift_norm: true,
            learn_sigma: false,
            num_groups: 32,
        }
    }

    /// Looks a preset up by the name the CLIs accept.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "cifar10" | "ho_cifar10" | "ho-cifar10" => Some(Self::ho_cifar10()),
            "cifar10-small" | "cifar10_small" => Some(Self::cifar10_small()),
            "fashion-mnist" | "fashion_mnist" => Some(Self::fashion_mnist()),
            _ => None,
        }
    }

    /// Preset names, for help texts.
    pub const PRESETS: &'static [&'static str] = &["cifar10", "cifar10-small", "fashion-mnist"];

    pub(crate) fn trunk(&self) -> Trunk<'_> {
        Trunk {
            image_size: self.image_size,
            in_channels: self.in_channels,
            model_channels: self.model_channels,
            num_res_blocks: self.num_res_blocks,
            attention_resolutions: &self.attention_resolutions,
            dropout: self.dropout,
            channel_mult: &self.channel_mult,
            num_heads: self.num_heads,
            num_head_channels: self.num_head_channels,
            num_groups: self.num_groups,
        }
    }

    /// Channels of the model output: `in_channels`, doubled with a learned variance.
    pub fn out_channels(&self) -> usize {
        self.in_channels * if self.learn_sigma { 2 } else { 1 }
    }

    /// Width of the timestep embedding (4 x base, as in Ho et al.).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }

    /// Resolution, width and attention of every level (the config must be valid).
    pub fn levels(&self) -> Vec<LevelPlan> {
        self.trunk().levels()
    }

    /// Rejects inconsistent settings with an error naming the field to fix.
    pub fn validate(&self) -> Result<()> {
        if self.num_classes == Some(0) {
            return Err(config_err(
                "num_classes",
                "must be positive (omit it for no classes)",
            ));
        }
        if let Some(k) = self.num_classes {
            at_most("num_classes", k, limits::NUM_CLASSES)?;
        }
        let trunk = self.trunk();
        trunk.validate(&[])?;
        // Decoder GroupNorms see the concatenation of the upsampled path and the skip.
        for block in crate::plan::unet_plan(self).decoder_norm_widths() {
            if !block.is_multiple_of(self.num_groups) {
                return Err(config_err(
                    "num_groups",
                    format!(
                        "a decoder ResBlock normalises {block} concatenated channels, not \
                         divisible by {} groups",
                        self.num_groups
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Parses the `[model]` table of a training config (other tables are ignored).
    pub fn from_toml_str(text: &str) -> Result<Self> {
        model_table(text, None)
    }

    /// Reads the `[model]` table of a training config file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| UNetError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        model_table(&text, Some(path))
    }
}

fn model_table<T: serde::de::DeserializeOwned>(text: &str, path: Option<&Path>) -> Result<T> {
    let perr = |message: String| UNetError::ConfigParse {
        path: path.map(Path::to_path_buf),
        message,
    };
    let doc: toml::Table = toml::from_str(text).map_err(|e| perr(e.to_string()))?;
    let model = doc
        .get("model")
        .ok_or_else(|| perr("no [model] table".to_string()))?
        .clone();
    model
        .try_into()
        .map_err(|e: toml::de::Error| perr(format!("[model]: {}", e.message())))
}

impl EncoderUNetConfig {
    /// A small noise-aware classifier for CIFAR-10 (guided-diffusion's classifier layout, scaled down).
    pub fn cifar10_classifier() -> Self {
        Self {
            image_size: 32,
            in_channels: 3,
            model_channels: 64,
            num_res_blocks: 2,
            attention_resolutions: vec![16, 8],
            dropout: 0.0,
            channel_mult: vec![1, 2, 2, 2],
            num_classes: 10,
            num_heads: 1,
            num_head_channels: Some(64),
            use_scale_shift_norm: true,
            num_groups: 32,
            pool: PoolKind::Attention,
        }
    }

    pub(crate) fn trunk(&self) -> Trunk<'_> {
        Trunk {
            image_size: self.image_size,
            in_channels: self.in_channels,
            model_channels: self.model_channels,
            num_res_blocks: self.num_res_blocks,
            attention_resolutions: &self.attention_resolutions,
            dropout: self.dropout,
            channel_mult: &self.channel_mult,
            num_heads: self.num_heads,
            num_head_channels: self.num_head_channels,
            num_groups: self.num_groups,
        }
    }

    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }

    pub fn levels(&self) -> Vec<LevelPlan> {
        self.trunk().levels()
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_classes == 0 {
            return Err(config_err("num_classes", "must be positive"));
        }
        at_most("num_classes", self.num_classes, limits::NUM_CLASSES)?;
        self.trunk().validate(&[])
    }

    /// Reads the `[classifier]` table of a config file.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| UNetError::ConfigParse {
            path: None,
            message: e.to_string(),
        })?;
        let t = doc
            .get("classifier")
            .cloned()
            .ok_or_else(|| UNetError::ConfigParse {
                path: None,
                message: "no [classifier] table".into(),
            })?;
        t.try_into()
            .map_err(|e: toml::de::Error| UNetError::ConfigParse {
                path: None,
                message: format!("[classifier]: {}", e.message()),
            })
    }
}
