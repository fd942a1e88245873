//! The DDPM U-Net in candle (Ho et al. 2020; Nichol & Dhariwal 2021), and guided-diffusion's
//! noise-aware classifier for classifier guidance.
//!
//! # Architecture
//! - Timestep `t` -> sinusoidal features (`model_channels` wide, cosines first) -> Linear -> SiLU ->
//!   Linear, `4 * model_channels` wide. With `num_classes`, a label embedding of
//!   `num_classes + 1` rows is added; the last row is the "null" label of classifier-free guidance.
//! - Encoder: a 3x3 input conv, then per level `num_res_blocks` ResBlocks (each followed by
//!   self-attention when the level's resolution is in `attention_resolutions`), and a strided 3x3
//!   conv between levels. Middle: ResBlock, attention, ResBlock. Decoder: per level
//!   `num_res_blocks + 1` ResBlocks on the concatenation of the upsampled path and the matching
//!   encoder output, nearest x2 upsampling + 3x3 conv between levels. Head: GroupNorm, SiLU,
//!   zero-initialised 3x3 conv to `in_channels` (or `2 * in_channels` with `learn_sigma`).
//! - ResBlock: GroupNorm -> SiLU -> conv3x3 -> add the projected embedding (or, with
//!   `use_scale_shift_norm`, `GroupNorm(h) * (1 + scale) + shift`) -> GroupNorm -> SiLU ->
//!   dropout -> zero-initialised conv3x3, plus a 1x1-conv skip when the width changes.
//! - Image sizes: every downsampled level must have an even input size. `validate()` rejects a
//!   config otherwise (28x28 works with up to 3 levels: 28, 14, 7) instead of padding, because a
//!   padded feature map would not line up with its skip connection.
//! - Tiny test models use `num_groups` (GroupNorm groups, default 32) to avoid 32-channel minimums.
//!
//! # Parameter names
//! Names follow the `state_dict` keys of improved-diffusion's `UNetModel` (and guided-diffusion's
//! `EncoderUNetModel` for the classifier), with the same shapes, so the two can be converted by
//! renaming nothing. `N` numbers the entries of the `input_blocks` / `output_blocks` lists and the
//! second index is the layer's position in its stage:
//!
//! | name | shape | what |
//! |---|---|---|
//! | `time_embed.0.{weight,bias}`, `time_embed.2.{weight,bias}` | `[4c, c]`, `[4c, 4c]` | timestep MLP |
//! | `label_emb.weight` | `[num_classes + 1, 4c]` | class embedding (last row: null label) |
//! | `input_blocks.0.0.{weight,bias}` | `[c, in, 3, 3]` | input conv |
//! | `{input_blocks.N,middle_block,output_blocks.N}.K.in_layers.0.{weight,bias}` | `[cin]` | ResBlock GroupNorm 1 |
//! | `... .K.in_layers.2.{weight,bias}` | `[cout, cin, 3, 3]` | ResBlock conv 1 |
//! | `... .K.emb_layers.1.{weight,bias}` | `[cout or 2cout, 4c]` | embedding projection |
//! | `... .K.out_layers.0.{weight,bias}` | `[cout]` | ResBlock GroupNorm 2 |
//! | `... .K.out_layers.3.{weight,bias}` | `[cout, cout, 3, 3]` | ResBlock conv 2 (zero init) |
//! | `... .K.skip_connection.{weight,bias}` | `[cout, cin, 1, 1]` | only when `cin != cout` |
//! | `... .K.norm.{weight,bias}` | `[ch]` | attention GroupNorm |
//! | `... .K.qkv.{weight,bias}` | `[3ch, ch, 1]` | q/k/v, heads-first channel order |
//! | `... .K.proj_out.{weight,bias}` | `[ch, ch, 1]` | attention output (zero init) |
//! | `input_blocks.N.0.op.{weight,bias}` | `[ch, ch, 3, 3]` | strided downsampling conv |
//! | `output_blocks.N.K.conv.{weight,bias}` | `[ch, ch, 3, 3]` | conv after upsampling |
//! | `out.0.{weight,bias}`, `out.2.{weight,bias}` | `[c]`, `[out, c, 3, 3]` | head (conv zero init) |
//!
//! The classifier has `time_embed`, `input_blocks`, `middle_block` as above and the head
//! `out.0` (GroupNorm) plus either `out.3.{weight,bias}` (`[K, ch, 1, 1]`, adaptive pooling) or
//! `out.2.positional_embedding` (`[ch, HW + 1]`), `out.2.qkv_proj.*` (`[3ch, ch, 1]`, q/k/v-first
//! order) and `out.2.c_proj.*` (`[K, ch, 1]`) (attention pooling).
//!
//! # Randomness
//! Initial values come from ddpm-rng keyed by `(seed, parameter name)` ([`SeededInit`]); dropout
//! masks from `StreamKey::dropout(seed, layer, step, global example index)` where `layer` numbers
//! the ResBlocks in construction order ([`ForwardCtx`], [`DropoutKey`]).

pub mod blocks;
pub mod config;
pub mod ctx;
pub mod encoder;
pub mod error;
pub mod layers;
pub mod params;
mod plan;
pub mod summary;
pub mod unet;

pub use config::{EncoderUNetConfig, LevelPlan, PoolKind, UNetConfig};
pub use ctx::{DropoutKey, ForwardCtx};
pub use encoder::EncoderUNet;
pub use error::{Result, UNetError};
pub use params::{
    load_checked, load_varmap, safetensors_bytes, save_safetensors, save_varmap, ParamBuilder,
    SeededInit,
};
pub use summary::{LevelSummary, ModelSummary};
pub use unet::UNet;
