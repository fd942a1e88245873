//! Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").
//!
//! The weight equalises how much each timestep contributes: it caps the x0-space weight at `gamma`, then
//! divides by the factor that the chosen prediction target already carries (snr for eps, snr + 1 for v).

use crate::gaussian_diffusion::ModelMeanType;

/// The Min-SNR-gamma weight of one timestep with signal-to-noise ratio `snr`.
pub fn min_snr_weight(snr: f64, gamma: f64, mean_type: ModelMeanType) -> f64 {
    let clipped = snr.min(gamma);
    match mean_type {
        ModelMeanType::Epsilon => clipped / snr,
        ModelMeanType::V => clipped / (snr + 1.0),
        ModelMeanType::StartX => clipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_weights() {
        // High SNR (early t): eps weight gamma/snr, v weight gamma/(snr+1), x0 weight gamma.
        assert_eq!(min_snr_weight(20.0, 5.0, ModelMeanType::Epsilon), 0.25);
        assert_eq!(min_snr_weight(19.0, 5.0, ModelMeanType::V), 0.25);
        assert_eq!(min_snr_weight(20.0, 5.0, ModelMeanType::StartX), 5.0);
        // Low SNR: eps weight 1, v weight snr/(snr+1), x0 weight snr.
        assert_eq!(min_snr_weight(1.0, 5.0, ModelMeanType::Epsilon), 1.0);
        assert_eq!(min_snr_weight(1.0, 5.0, ModelMeanType::V), 0.5);
        assert_eq!(min_snr_weight(0.5, 5.0, ModelMeanType::StartX), 0.5);
    }
}
