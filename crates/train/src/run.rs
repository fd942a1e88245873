//! What a run is made of: the network, its parameters in a fixed order, the diffusion process,
//! and the mutable training state that checkpoints capture.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ddpm_data::LoaderPosition;
use ddpm_diffusion::GaussianDiffusion;
use ddpm_dist::Communicator;
use ddpm_unet::{EncoderUNet, UNet};

use crate::config::{Task, TrainConfig};
use crate::ema::Ema;
use crate::metrics::Window;
use crate::optim::{AdamW, AdamWParams};
use crate::timesteps::TimestepSampler;

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
        Task::Diffusion => {
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

pub(crate) struct Run<'a> {
    pub(crate) cfg: &'a TrainConfig,
    pub(crate) comm: &'a dyn Communicator,
    pub(crate) device: Device,
    pub(crate) net: Net,
    pub(crate) names: Vec<String>,
    pub(crate) vars: Vec<Var>,
    pub(crate) diffusion: GaussianDiffusion,
    pub(crate) sqrt_ac: Vec<f32>,
    pub(crate) sqrt_1m_ac: Vec<f32>,
    pub(crate) num_classes: Option<usize>,
    pub(crate) run_dir: PathBuf,
    pub(crate) hash: String,
}

impl Run<'_> {
    pub(crate) fn adamw_params(&self) -> AdamWParams {
        let o = &self.cfg.optim;
        AdamWParams {
            lr: o.lr,
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
            weight_decay: o.weight_decay,
            warmup_steps: o.warmup_steps,
        }
    }

    pub(crate) fn fresh_state(&self) -> Result<State> {
        Ok(State {
            step: 0,
            opt: AdamW::new(&self.vars, self.adamw_params())?,
            emas: self
                .cfg
                .ema
                .rates
                .iter()
                .map(|&r| Ema::new(r, &self.vars))
                .collect::<candle_core::Result<_>>()?,
            sampler: TimestepSampler::new(
                self.diffusion.num_timesteps(),
                self.cfg.diffusion.timestep_sampling == crate::config::TimestepSampling::LossAware,
            ),
            window: Window::default(),
            skipped: 0,
            loader_pos: LoaderPosition::default(),
        })
    }

    pub(crate) fn expected_shapes(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| (format!("{prefix}{n}"), v.dims().to_vec()))
            .collect()
    }
}
