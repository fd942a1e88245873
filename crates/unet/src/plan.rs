//! The layer plan: which block goes where, with which widths.
//!
//! Both the model constructors and the validation/summary code walk this one list, so the
//! parameter names, the per-level summary and the GroupNorm checks can never disagree with what
//! is actually built. Stage prefixes follow improved-diffusion's `state_dict` keys
//! (`input_blocks.N`, `middle_block`, `output_blocks.N`), and layer indices inside a stage follow
//! its `TimestepEmbedSequential` positions.

use crate::config::{Trunk, UNetConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layer {
    /// The 3x3 input convolution.
    Conv {
        cin: usize,
        cout: usize,
    },
    Res {
        cin: usize,
        cout: usize,
    },
    Attn {
        ch: usize,
        heads: usize,
    },
    Down {
        ch: usize,
    },
    Up {
        ch: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Down,
    Middle,
    Up,
}

#[derive(Debug, Clone)]
pub(crate) struct Stage {
    pub prefix: String,
    pub part: Part,
    pub level: usize,
    /// Resolution of the stage's input.
    pub resolution: usize,
    pub layers: Vec<Layer>,
}

#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub input: Vec<Stage>,
    pub middle: Stage,
    pub output: Vec<Stage>,
    /// Width of the decoder's last feature map.
    pub top_channels: usize,
}

impl Plan {
    pub fn decoder_norm_widths(&self) -> Vec<usize> {
        self.output
            .iter()
            .flat_map(|s| s.layers.iter())
            .filter_map(|l| match l {
                Layer::Res { cin, .. } => Some(*cin),
                _ => None,
            })
            .collect()
    }

    pub fn stages(&self) -> impl Iterator<Item = &Stage> {
        self.input
            .iter()
            .chain(std::iter::once(&self.middle))
            .chain(self.output.iter())
    }
}

/// Encoder half plus middle block; the decoder is filled in only for the U-Net. Returns the plan
/// and the widths of the encoder outputs that the decoder concatenates, in push order.
pub(crate) fn trunk_plan(t: &Trunk<'_>) -> (Vec<Stage>, Stage, Vec<usize>, usize) {
    let ch0 = t.model_channels * t.channel_mult[0];
    let mut input = vec![Stage {
        prefix: "input_blocks.0".into(),
        part: Part::Down,
        level: 0,
        resolution: t.image_size,
        layers: vec![Layer::Conv {
            cin: t.in_channels,
            cout: ch0,
        }],
    }];
    let mut skips = vec![ch0];
    let mut ch = ch0;
    let last = t.channel_mult.len() - 1;
    for (level, &mult) in t.channel_mult.iter().enumerate() {
        let resolution = t.image_size >> level;
        let attention = t.attention_resolutions.contains(&resolution);
        for _ in 0..t.num_res_blocks {
            let cout = t.model_channels * mult;
            let mut layers = vec![Layer::Res { cin: ch, cout }];
            ch = cout;
            if attention {
                layers.push(Layer::Attn {
                    ch,
                    heads: t.heads(ch),
                });
            }
            input.push(Stage {
                prefix: format!("input_blocks.{}", input.len()),
                part: Part::Down,
                level,
                resolution,
                layers,
            });
            skips.push(ch);
        }
        if level != last {
            input.push(Stage {
                prefix: format!("input_blocks.{}", input.len()),
                part: Part::Down,
                level,
                resolution,
                layers: vec![Layer::Down { ch }],
            });
            skips.push(ch);
        }
    }
    let middle = Stage {
        prefix: "middle_block".into(),
        part: Part::Middle,
        level: last,
        resolution: t.image_size >> last,
        layers: vec![
            Layer::Res { cin: ch, cout: ch },
            Layer::Attn {
                ch,
                heads: t.heads(ch),
            },
            Layer::Res { cin: ch, cout: ch },
        ],
    };
    (input, middle, skips, ch)
}

pub(crate) fn unet_plan(cfg: &UNetConfig) -> Plan {
    let t = cfg.trunk();
    let (input, middle, mut skips, bottom) = trunk_plan(&t);
    let mut output = Vec::new();
    let mut ch = bottom;
    for (level, &mult) in t.channel_mult.iter().enumerate().rev() {
        let resolution = t.image_size >> level;
        let attention = t.attention_resolutions.contains(&resolution);
        for i in 0..=t.num_res_blocks {
            let skip = skips.pop().expect("plan: one skip per encoder output");
            let cout = t.model_channels * mult;
            let mut layers = vec![Layer::Res {
                cin: ch + skip,
                cout,
            }];
            ch = cout;
            if attention {
                layers.push(Layer::Attn {
                    ch,
                    heads: t.heads(ch),
                });
            }
            if level > 0 && i == t.num_res_blocks {
                layers.push(Layer::Up { ch });
            }
            output.push(Stage {
                prefix: format!("output_blocks.{}", output.len()),
                part: Part::Up,
                level,
                resolution,
                layers,
            });
        }
    }
    Plan {
        input,
        middle,
        output,
        top_channels: ch,
    }
}
