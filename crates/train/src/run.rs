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
use ddpm_config::{Precision, Task, TrainConfig};

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

impl Net {
    /// The network computing in `precision`'s dtype on casts of the f32 variables `vars` (named
    /// `names`): rebuilt every step, because a cast is a copy that would not follow the optimizer's
    /// in-place updates. The casts are differentiable, so the gradients land on the f32 variables
    /// (the master weights). `None` for f32: the network itself computes then.
    pub(crate) fn compute_view(
        &self,
        cfg: &TrainConfig,
        names: &[String],
        vars: &[Var],
        device: &Device,
    ) -> Result<Option<Net>> {
        let dtype = match cfg.train.precision {
            Precision::F32 => return Ok(None),
            Precision::Bf16 => DType::BF16,
        };
        let map: std::collections::HashMap<String, Tensor> = names
            .iter()
            .cloned()
            .zip(vars.iter().map(|v| v.as_tensor().clone()))
            .collect();
        // The HashMap backend casts each tensor to the builder's dtype on lookup.
        let vb = VarBuilder::from_tensors(map, dtype, device);
        Ok(Some(match self {
            Net::Diffusion(m) => Net::Diffusion(UNet::new(m.config(), vb)?),
            Net::Classifier(m) => Net::Classifier(EncoderUNet::new(m.config(), vb)?),
        }))
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
