//! Samplers and evaluation for ddpm-rs: DDPM (ancestral), DDIM, DPM-Solver++(2M) and a Heun
//! probability-flow ODE sampler over any [`Denoiser`], with class labels, classifier-free guidance and
//! classifier guidance; and the pieces of the `ddpm-sample` / `ddpm-eval` binaries (checkpoint
//! reading, image output, bits/dim, Frechet distance).
//!
//! The step arithmetic lives in `ddpm-diffusion` (checked against reference vectors); this crate owns
//! the loops, the randomness (ddpm-rng `Stream::Sampler`, keyed by seed, step and global image index)
//! and the I/O.

pub mod denoiser;
pub mod error;
pub mod guidance;
pub mod linalg;
pub mod sampler;
pub mod steps;

pub use denoiser::{Denoiser, EncoderClassifier, NoisyClassifier, UNetDenoiser};
pub use error::{Result, SamplerError};
pub use guidance::{classifier_grad, guided_model_output, ClassifierGuidance, Guidance};
pub use sampler::{heun_timesteps, respacing_for, BatchSpec, Progress, Sampler, SamplerKind, SamplerSettings};
pub use steps::{
    ancestral_step, ddim_step, fused_step, guided_eps, AncestralStep, DdimOptions, DdimResult, FusedUpdate, ScaledGrad,
};
