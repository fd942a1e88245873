//! The CUDA kernels against the CPU implementation on the same inputs.

use crate::report::{Diff, Report};
use anyhow::Result;
use candle_core::{Device, Tensor};
use ddpm_diffusion::{BetaSchedule, NoiseSchedule};
use ddpm_kernels::{
    fused_noising, fused_sampler_step, philox_normal, NoiseKey, Prediction, StepCoefs, StepNoise,
};
use ddpm_rng::{Stream, StreamKey};

/// The linear schedule's `sqrt(abar)` and `sqrt(1 - abar)` tables as f32 (what the trainer passes).
pub fn tables() -> Result<(Vec<f32>, Vec<f32>)> {
    let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000)?;
    Ok((
        s.sqrt_alphas_cumprod.iter().map(|&v| v as f32).collect(),
        s.sqrt_one_minus_alphas_cumprod
            .iter()
            .map(|&v| v as f32)
            .collect(),
    ))
}

/// Deterministic data: normals scaled by `scale`.
pub fn host_data(n: usize, salt: u64, scale: f32) -> Vec<f32> {
    let mut v = vec![0f32; n];
    StreamKey::new(0xC0FFEE, Stream::Timestep, salt, 7).fill_normal(&mut v);
    v.iter_mut().for_each(|x| *x *= scale);
    v
}

fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
}

/// `data` on `dev` as `dims`; with `misalign` the tensor starts one float into its buffer, so the kernels
/// take their scalar (non-float4) path.
fn upload(data: &[f32], dims: &[usize], dev: &Device, misalign: bool) -> Result<Tensor> {
    if !misalign {
        return Ok(Tensor::from_slice(data, dims, dev)?);
    }
    let mut padded = vec![0f32; data.len() + 1];
    padded[1..].copy_from_slice(data);
    let t = Tensor::from_vec(padded, data.len() + 1, dev)?
        .narrow(0, 1, data.len())?
        .reshape(dims)?;
    assert!(t.is_contiguous() && t.layout().start_offset() == 1);
    Ok(t)
}

fn step_noise<'a>(mode: &str, key: NoiseKey, ts: &'a [Tensor; 3]) -> StepNoise<'a> {
    match mode {
        "none" => StepNoise::None,
        "philox" => StepNoise::Philox(key),
        _ => StepNoise::Given(&ts[2]),
    }
}

const LAYOUTS: [(&str, [usize; 4], bool); 3] = [
    ("64x3x32x32", [64, 3, 32, 32], false),
    ("5x3x7x9 tail", [5, 3, 7, 9], false),
    ("4x3x16x16 misaligned", [4, 3, 16, 16], true),
];

pub fn run(dev: &Device, rep: &mut Report) -> Result<()> {
    let (sa, sm) = tables()?;
    let key = NoiseKey {
        seed: 0x5EED_0000_0001,
        step: 123_456,
        first_example: 1000,
    };

    for (label, dims, misalign) in LAYOUTS {
        let n: usize = dims.iter().product();
        let x0 = host_data(n, 1, 0.7);
        let cpu_x0 = Tensor::from_slice(&x0, &dims[..], &Device::Cpu)?;
        let gpu_x0 = upload(&x0, &dims, dev, misalign)?;
        let t: Vec<u32> = (0..dims[0] as u64)
            .map(|i| StreamKey::new(1, Stream::Timestep, 0, i).below(0, 1000))
            .collect();
        for pred in [Prediction::Epsilon, Prediction::V, Prediction::StartX] {
            let c = fused_noising(&cpu_x0, &t, &sa, &sm, key, pred)?;
            let g = fused_noising(&gpu_x0, &t, &sa, &sm, key, pred)?;
            let dn = Diff::new(&to_host(&c.noise)?, &to_host(&g.noise)?);
            let dx = Diff::new(&to_host(&c.x_t)?, &to_host(&g.x_t)?);
            let dt = Diff::new(&to_host(&c.target)?, &to_host(&g.target)?);
            rep.check(
                format!("noising {label} {pred:?}"),
                dn.bit_identical() && dx.within_rounding() && dt.within_rounding(),
                format!(
                    "noise {}; x_t {}; target {}",
                    dn.describe(),
                    dx.describe(),
                    dt.describe()
                ),
            );
        }
    }

    for (label, dims, misalign) in LAYOUTS {
        let n: usize = dims.iter().product();
        let b = dims[0];
        let (xt, m, z) = (
            host_data(n, 2, 1.2),
            host_data(n, 3, 1.0),
            host_data(n, 4, 1.0),
        );
        let coefs: Vec<StepCoefs> = (0..b)
            .map(|i| {
                let ab = 0.05 + 0.9 * i as f64 / b as f64;
                if i % 2 == 0 {
                    StepCoefs::ddpm(Prediction::Epsilon, ab, (ab + 0.02).min(1.0), 0.05)
                } else {
                    StepCoefs::ddim(Prediction::V, ab, (ab + 0.02).min(1.0), 0.5)
                }
            })
            .collect();
        let cpu = [
            Tensor::from_slice(&xt, &dims[..], &Device::Cpu)?,
            Tensor::from_slice(&m, &dims[..], &Device::Cpu)?,
            Tensor::from_slice(&z, &dims[..], &Device::Cpu)?,
        ];
        let gpu = [
            upload(&xt, &dims, dev, misalign)?,
            upload(&m, &dims, dev, misalign)?,
            upload(&z, &dims, dev, misalign)?,
        ];
        for clip in [None, Some((-1.0f32, 1.0f32))] {
            for mode in ["none", "philox", "given"] {
                let c = fused_sampler_step(
                    &cpu[0],
                    &cpu[1],
                    &coefs,
                    clip,
                    step_noise(mode, key, &cpu),
                )?;
                let g = fused_sampler_step(
                    &gpu[0],
                    &gpu[1],
                    &coefs,
                    clip,
                    step_noise(mode, key, &gpu),
                )?;
                let dp = Diff::new(&to_host(&c.x_prev)?, &to_host(&g.x_prev)?);
                let d0 = Diff::new(&to_host(&c.x0_pred)?, &to_host(&g.x0_pred)?);
                rep.check(
                    format!("sampler step {label} noise={mode} clip={}", clip.is_some()),
                    dp.within_rounding() && d0.within_rounding(),
                    format!("x_prev {}; x0_pred {}", dp.describe(), d0.describe()),
                );
            }
        }
    }

    for dims in [vec![16usize, 3, 32, 32], vec![3, 37]] {
        let c = philox_normal(dims.as_slice(), Stream::Sampler as u32, key, &Device::Cpu)?;
        let g = philox_normal(dims.as_slice(), Stream::Sampler as u32, key, dev)?;
        let d = Diff::new(&to_host(&c)?, &to_host(&g)?);
        rep.check(
            format!("philox_normal {dims:?}"),
            d.bit_identical(),
            d.describe(),
        );
    }
    Ok(())
}
