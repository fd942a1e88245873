//! Shared helpers: a tiny synthetic labelled HDF5 dataset and a tiny training config.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ddpm_config::{Overrides, TrainConfig};
use ddpm_data::{DatasetMeta, DatasetWriter, WriteOptions};

pub const SIZE: usize = 8;

/// `n` 8x8 grey images of two classes: class 0 a bright horizontal bar, class 1 a bright vertical
/// bar, at a position that varies with the index. Simple enough that a tiny model's loss falls
/// within a few dozen steps.
pub fn make_dataset(path: &Path, n: usize) {
    let mut w = DatasetWriter::create(path, n, [SIZE, SIZE, 1], &WriteOptions::default()).unwrap();
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % 2;
        let pos = 2 + (i / 2) % 4;
        let mut img = vec![20u8; SIZE * SIZE];
        for k in 0..SIZE {
            let (y, x) = if class == 0 { (pos, k) } else { (k, pos) };
            img[y * SIZE + x] = 235;
        }
        w.push_images(&img).unwrap();
        labels.push(class as i64);
    }
    w.push_labels(&labels);
    w.finish(&DatasetMeta {
        source: "synthetic bars (ddpm-train tests)".into(),
        class_names: Some(vec!["horizontal".into(), "vertical".into()]),
    })
    .unwrap();
}

/// A complete config for the tiny dataset; `extra` is appended (TOML) and may add tables.
pub fn tiny_config_text(data: &Path, out: &Path, model_extra: &str, extra: &str) -> String {
    format!(
        r#"
seed = 7
out_dir = "{out}"

[model]
image_size = 8
in_channels = 1
model_channels = 8
num_res_blocks = 1
attention_resolutions = [4]
channel_mult = [1, 2]
num_classes = 2
num_heads = 1
num_groups = 4
{model_extra}

[data]
path = "{data}"
batch = 8
flip = true
prefetch = 2

[optim]
lr = 2e-3
warmup_steps = 2
grad_clip = 1.0
weight_decay = 0.01

[ema]
rates = [0.9, 0.99]
warmup = true

[preview]
steps = 4
per_class = 2

{extra}
"#,
        out = out.display(),
        data = data.display(),
    )
}

pub fn load(text: &str, ov: &Overrides) -> TrainConfig {
    TrainConfig::from_toml_str(text, ov).unwrap()
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
}

pub fn fixture(n: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bars.h5");
    make_dataset(&data, n);
    Fixture { dir, data }
}
