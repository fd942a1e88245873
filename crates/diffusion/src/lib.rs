//! Diffusion mathematics for ddpm-rs: noise schedules, the forward process and its posterior, training
//! objectives (L_simple, L_hybrid, the variational bound in bits/dim, Min-SNR weights), timestep
//! respacing, the sinusoidal timestep embedding and the step math of the samplers.
//!
//! The shape of the code follows improved-diffusion (`gaussian_diffusion.py`, `respace.py`,
//! `losses.py`, `nn.py`). It does no I/O and knows nothing of MPI or HDF5: scalar tables are f64 on the
//! host, tensor math runs on any candle device in the dtype of its inputs, and per-sample timesteps are
//! host slices. Every formula is checked against reference vectors by the `conformance` test of
//! `ddpm-tests`.

pub mod distill;
pub mod elbo;
pub mod embedding;
pub mod error;
pub mod gaussian_diffusion;
pub mod losses;
pub mod respace;
pub mod schedule;
pub mod snr;
pub mod steps;
pub mod tensor;
pub mod vdm;

pub use distill::{distill_losses, trailing_timesteps, DistillWeighting};
pub use elbo::{ElboAccumulator, ElboBreakdown};
pub use embedding::{timestep_embedding, timestep_embedding_f64, DEFAULT_MAX_PERIOD};
pub use error::{DiffusionError, Result};
pub use gaussian_diffusion::{
    BpdTerm, GaussianDiffusion, LossType, ModelMeanType, ModelVarType, PMeanVariance,
    TrainingLosses, VbTerms,
};
pub use respace::space_timesteps;
pub use schedule::{BetaSchedule, NoiseSchedule};
pub use snr::min_snr_weight;

#[cfg(test)]
mod tests;
