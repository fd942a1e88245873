//! What a run is made of: the network, its parameters in a fixed order, and the mutable training
//! state that checkpoints capture.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ddpm_data::LoaderPosition;
use ddpm_unet::{EncoderUNet, UNet};

use crate::ema::Ema;
use crate::metrics::Window;
use crate::optim::AdamW;
use crate::timesteps::TimestepSampler;
use ddpm_config::{Task, TrainConfig};

/// The network being trained.
pub(crate) enum Net {
    Diffusion(UNet),
    Classifier(EncoderUNet),
}

impl Net {
    pub(crate) fn num_parameters(&self) -> usize {
        match self {
            Net::Diffusion(m) => m.num_parameters(),
            Net::Classifier(m) => m.num_parameters(),
        }
    }
}

/// Builds the model of `cfg` with freshly initialised (seeded) parameters.
pub(crate) fn build_net(cfg: &TrainConfig, device: &Device) -> Result<(Net, VarMap)> {
    Ok(match cfg.task {
        Task::Diffusion | Task::Distill => {
            let (m, vm) = UNet::init(
                cfg.model.as_ref().expect("validated"),
                cfg.seed,
                DType::F32,
                device,
            )?;
            (Net::Diffusion(m), vm)
        }
        Task::Classifier => {
            let (m, vm) = EncoderUNet::init(
                cfg.classifier.as_ref().expect("validated"),
                cfg.seed,
                DType::F32,
                device,
            )?;
            (Net::Classifier(m), vm)
        }
    })
}

/// Builds a U-Net whose parameters are the given tensors (the EMA weights for previews).
pub fn unet_from_tensors(
    cfg: &ddpm_unet::UNetConfig,
    tensors: Vec<(String, Tensor)>,
    device: &Device,
) -> Result<UNet> {
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    Ok(UNet::new(
        cfg,
        VarBuilder::from_tensors(map, DType::F32, device),
    )?)
}

/// `parameters: N` and the per-level summary of the config's model (ddpm-unet's summary).
pub fn inspect_model(cfg: &TrainConfig) -> Result<String> {
    let (net, _) = build_net(cfg, &Device::Cpu)?;
    let summary = match &net {
        Net::Diffusion(m) => m.summary(),
        Net::Classifier(m) => m.summary(),
    };
    // ModelSummary's Display starts with the "parameters: N" line.
    Ok(summary.to_string())
}

/// Parameters sorted by name: the order of gradients, moments, EMA lists and bucket plans.
pub(crate) fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().expect("VarMap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// All the mutable state of a run.
pub(crate) struct State {
    pub(crate) step: u64,
    pub(crate) opt: AdamW,
    pub(crate) emas: Vec<Ema>,
    pub(crate) sampler: TimestepSampler,
    pub(crate) window: Window,
    pub(crate) skipped: u64,
    pub(crate) loader_pos: LoaderPosition,
}
