//! `ddpm-unet-inspect`: parameter count and per-level layout of a model config.

use anyhow::{bail, Context, Result};
use clap::Parser;
use ddpm_unet::{UNet, UNetConfig};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Print the parameter count and per-level summary of a U-Net config")]
struct Args {
    /// A preset: cifar10 (Ho et al.), cifar10-small (9M), fashion-mnist.
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// A training config TOML; its `[model]` table is read.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = match (&args.preset, &args.config) {
        (Some(p), None) => UNetConfig::preset(p).with_context(|| {
            format!(
                "unknown preset {p:?}; known: {}",
                UNetConfig::PRESETS.join(", ")
            )
        })?,
        (None, Some(path)) => UNetConfig::from_toml_file(path)?,
        _ => bail!("pass --preset NAME or --config FILE.toml"),
    };
    // Zero-filled parameters: only shapes matter here, and nothing random is drawn.
    let vb = candle_nn::VarBuilder::zeros(candle_core::DType::F32, &candle_core::Device::Cpu);
    let model = UNet::new(&cfg, vb)?;
    print!("{}", model.summary());
    Ok(())
}
