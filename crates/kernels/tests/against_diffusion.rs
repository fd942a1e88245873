//! The fused op against the project's own unfused forward process: ddpm-diffusion's `q_sample` and
//! `training_target` (improved-diffusion's formulas, checked there against reference vectors), fed the same
//! noise, in f32 on the CPU.

use candle_core::{Device, Tensor};
use ddpm_diffusion::{
    BetaSchedule, GaussianDiffusion, LossType, ModelMeanType, ModelVarType, NoiseSchedule,
};
use ddpm_kernels::{fused_noising, NoiseKey, Prediction};
use ddpm_rng::{Stream, StreamKey};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn fused_equals_q_sample_and_training_target() {
    for schedule in [BetaSchedule::Linear, BetaSchedule::Cosine] {
        let s = NoiseSchedule::new(&schedule, 1000).unwrap();
        let sa: Vec<f32> = s.sqrt_alphas_cumprod.iter().map(|&v| v as f32).collect();
        let sm: Vec<f32> = s
            .sqrt_one_minus_alphas_cumprod
            .iter()
            .map(|&v| v as f32)
            .collect();
        let dims = [4usize, 3, 9, 11];
        let n: usize = dims.iter().product();
        let mut x = vec![0f32; n];
        StreamKey::new(3, Stream::Flip, 0, 0).fill_uniform(&mut x);
        let x0 = Tensor::from_vec(
            x.iter().map(|u| 2.0 * u - 1.0).collect::<Vec<_>>(),
            &dims[..],
            &Device::Cpu,
        )
        .unwrap();
        let t = [0u32, 1, 500, 999];
        let tu: Vec<usize> = t.iter().map(|&v| v as usize).collect();
        let key = NoiseKey {
            seed: 17,
            step: 3,
            first_example: 8,
        };
        for (pred, mean_type) in [
            (Prediction::Epsilon, ModelMeanType::Epsilon),
            (Prediction::V, ModelMeanType::V),
            (Prediction::StartX, ModelMeanType::StartX),
        ] {
            let gd = GaussianDiffusion::new(
                s.clone(),
                mean_type,
                ModelVarType::FixedSmall,
                LossType::Mse,
            );
            let f = fused_noising(&x0, &t, &sa, &sm, key, pred).unwrap();
            let x_t = gd.q_sample(&x0, &tu, &f.noise).unwrap();
            let target = gd.training_target(&x0, &f.noise, &tu).unwrap();
            assert_eq!(
                bits(&f.x_t),
                bits(&x_t),
                "{schedule:?} {pred:?}: x_t vs q_sample"
            );
            assert_eq!(
                bits(&f.target),
                bits(&target),
                "{schedule:?} {pred:?}: target vs training_target"
            );
        }
    }
}
