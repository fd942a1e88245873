//! Continuous-time variance-preserving diffusion with a (possibly learned) noise schedule, after
//! Kingma et al. 2021, "Variational Diffusion Models" (VDM).
//!
//! Time is `t` in `[0, 1]`. The schedule is `gamma(t) = -log SNR(t)`, increasing in `t`, and the
//! forward process is `z_t = alpha_t x + sigma_t eps` with `alpha_t^2 = sigmoid(-gamma(t))` and
//! `sigma_t^2 = sigmoid(gamma(t))`, so `alpha^2 + sigma^2 = 1` for any gamma.
//!
//! The negative ELBO of one example splits into three terms, all reported in bits/dim here:
//! * prior: `KL(q(z_1|x) || N(0, I))`, which depends only on `gamma(1)` (the seed's L_T);
//! * diffusion: in continuous time `0.5 gamma'(t) ||eps - eps_hat||^2` with `t ~ U(0, 1)`; for `T`
//!   steps `0.5 T expm1(gamma(t) - gamma(s)) ||eps - eps_hat||^2` with `s = t - 1/T` and `t` on the
//!   grid `{1/T, .., 1}`. Both are positive because gamma increases (the paper's `-SNR'(t)` form);
//! * reconstruction: `-log p(x|z_0)` under the discretised Gaussian decoder of `losses.rs` with mean
//!   `z_0 / alpha_0` and standard deviation `sigma_0 / alpha_0 = exp(gamma(0) / 2)` (the seed's L_0).
//!
//! [`schedule`] holds the fixed gammas and the learned monotone network, [`loss`] the ELBO terms,
//! [`sample`] the continuous-time sampler steps. No I/O: the trainer and the sampler own files.

pub mod loss;
pub mod sample;
pub mod schedule;

pub use loss::{
    diffusion_bpd_continuous, diffusion_bpd_continuous_f64, diffusion_bpd_discrete,
    diffusion_bpd_discrete_f64, discretize_time, low_discrepancy_times, prior_bpd, prior_bpd_f64,
    reconstruction_bpd, reconstruction_bpd_f64, ContinuousElbo,
};
pub use schedule::{
    FixedGamma, GammaEval, MonotoneGamma, MonotoneGammaInit, DEFAULT_GAMMA_MAX, DEFAULT_GAMMA_MIN,
};

/// The logistic function, evaluated without overflow for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `alpha^2 = sigmoid(-gamma)`: the signal variance at noise level `gamma`.
pub fn alpha2(gamma: f64) -> f64 {
    sigmoid(-gamma)
}

/// `sigma^2 = sigmoid(gamma)`: the noise variance at noise level `gamma`.
pub fn sigma2(gamma: f64) -> f64 {
    sigmoid(gamma)
}

/// `SNR = alpha^2 / sigma^2 = exp(-gamma)`.
pub fn snr(gamma: f64) -> f64 {
    (-gamma).exp()
}

/// `ln sigmoid(x) = -softplus(-x)`, accurate for large |x| (the log-variances of the prior term).
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

#[cfg(test)]
mod tests;
