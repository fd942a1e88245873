//! Human-readable per-level description of a model, for `ddpm-unet-inspect` and the trainer.

use candle_core::Tensor;
use std::fmt;

use crate::plan::{Layer, Part, Stage};

/// One row of a [`ModelSummary`]: a group of stages at one resolution, or the embedding/head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelSummary {
    /// `embed`, `down N`, `middle`, `up N` or `out`.
    pub name: String,
    /// Input resolution of the level (0 for rows without a feature map).
    pub resolution: usize,
    /// Output width of the level's ResBlocks.
    pub channels: usize,
    pub res_blocks: usize,
    /// Heads of the level's attention blocks, if it has any.
    pub attention_heads: Option<usize>,
    /// `down`, `up` or empty.
    pub resample: &'static str,
    pub params: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSummary {
    pub rows: Vec<LevelSummary>,
    pub total_params: usize,
    pub description: String,
}

fn count(params: &[(String, Tensor)], prefix: &str) -> usize {
    let dotted = format!("{prefix}.");
    params
        .iter()
        .filter(|(n, _)| n.starts_with(&dotted))
        .map(|(_, t)| t.elem_count())
        .sum()
}

pub(crate) fn summarize(
    stages: &[Stage],
    params: &[(String, Tensor)],
    embed_prefixes: &[&str],
    head_prefix: &str,
    description: String,
) -> ModelSummary {
    let mut rows = vec![LevelSummary {
        name: "embed".into(),
        resolution: 0,
        channels: 0,
        res_blocks: 0,
        attention_heads: None,
        resample: "",
        params: embed_prefixes.iter().map(|p| count(params, p)).sum(),
    }];
    let mut current: Option<(Part, usize)> = None;
    for s in stages {
        if current != Some((s.part, s.level)) {
            current = Some((s.part, s.level));
            rows.push(LevelSummary {
                name: match s.part {
                    Part::Down => format!("down {}", s.level),
                    Part::Middle => "middle".into(),
                    Part::Up => format!("up {}", s.level),
                },
                resolution: s.resolution,
                channels: 0,
                res_blocks: 0,
                attention_heads: None,
                resample: "",
                params: 0,
            });
        }
        let row = rows.last_mut().expect("row pushed above");
        row.params += count(params, &s.prefix);
        for l in &s.layers {
            match *l {
                Layer::Conv { cout, .. } => row.channels = row.channels.max(cout),
                Layer::Res { cout, .. } => {
                    row.res_blocks += 1;
                    row.channels = cout;
                }
                Layer::Attn { heads, .. } => row.attention_heads = Some(heads),
                Layer::Down { .. } => row.resample = "down",
                Layer::Up { .. } => row.resample = "up",
            }
        }
    }
    rows.push(LevelSummary {
        name: head_prefix.into(),
        resolution: 0,
        channels: 0,
        res_blocks: 0,
        attention_heads: None,
        resample: "",
        params: count(params, head_prefix),
    });
    ModelSummary {
        rows,
        total_params: params.iter().map(|(_, t)| t.elem_count()).sum(),
        description,
    }
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "parameters: {}", self.total_params)?;
        writeln!(
            f,
            "{:<8} {:>10} {:>8} {:>10} {:>9} {:>8} {:>12}",
            "level", "resolution", "channels", "res_blocks", "attention", "resample", "params"
        )?;
        for r in &self.rows {
            let dash = |v: usize| {
                if v == 0 {
                    "-".to_string()
                } else {
                    v.to_string()
                }
            };
            let res = if r.resolution == 0 {
                "-".into()
            } else {
                format!("{0}x{0}", r.resolution)
            };
            let attn = r
                .attention_heads
                .map(|h| format!("{h} head{}", if h == 1 { "" } else { "s" }));
            writeln!(
                f,
                "{:<8} {:>10} {:>8} {:>10} {:>9} {:>8} {:>12}",
                r.name,
                res,
                dash(r.channels),
                dash(r.res_blocks),
                attn.unwrap_or_else(|| "-".into()),
                if r.resample.is_empty() {
                    "-"
                } else {
                    r.resample
                },
                r.params
            )?;
        }
        Ok(())
    }
}
