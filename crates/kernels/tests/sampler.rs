//! CPU tests of the fused sampler update and of philox_normal.

use candle_core::{Device, Tensor};
use ddpm_kernels::{
    fused_sampler_step, philox_normal, unfused_sampler_step, NoiseKey, Prediction, StepCoefs,
    StepNoise, StepOut,
};
use ddpm_rng::{Stream, StreamKey};

fn data(dims: &[usize], salt: u64, scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let mut v = vec![0f32; n];
    StreamKey::new(5, Stream::Timestep, salt, 1).fill_normal(&mut v);
    Tensor::from_vec(
        v.into_iter().map(|x| x * scale).collect::<Vec<_>>(),
        dims,
        &Device::Cpu,
    )
    .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_same(a: &StepOut, b: &StepOut, what: &str) {
    assert_eq!(bits(&a.x_prev), bits(&b.x_prev), "{what}: x_prev");
    assert_eq!(bits(&a.x0_pred), bits(&b.x0_pred), "{what}: x0_pred");
}

fn coefs(b: usize) -> Vec<StepCoefs> {
    (0..b)
        .map(|i| {
            let ab = 0.9f64.powi(i as i32 + 1);
            if i % 2 == 0 {
                StepCoefs::ddpm(Prediction::Epsilon, ab, ab / 0.9, 0.1 + 0.01 * i as f64)
            } else {
                StepCoefs::ddim(Prediction::V, ab, ab / 0.9, 0.5)
            }
        })
        .collect()
}

#[test]
fn fused_equals_unfused_for_every_noise_mode() {
    for dims in [vec![4usize, 3, 5, 7], vec![2usize, 3, 80, 80]] {
        let b = dims[0];
        let xt = data(&dims, 1, 1.5);
        let m = data(&dims, 2, 1.0);
        let z = data(&dims, 3, 1.0);
        let c = coefs(b);
        let key = NoiseKey {
            seed: 9,
            step: 33,
            first_example: 100,
        };
        for clip in [None, Some((-1.0f32, 1.0f32))] {
            for noise in [
                StepNoise::None,
                StepNoise::Philox(key),
                StepNoise::Given(&z),
            ] {
                let f = fused_sampler_step(&xt, &m, &c, clip, noise).unwrap();
                let u = unfused_sampler_step(&xt, &m, &c, clip, noise).unwrap();
                assert_eq!(f.x_prev.dims(), &dims[..]);
                assert_same(&f, &u, &format!("{dims:?} clip {clip:?} noise {noise:?}"));
            }
        }
    }
}

#[test]
fn philox_noise_is_the_sampler_stream_and_thread_independent() {
    let dims = [3usize, 2, 100, 91];
    let xt = data(&dims, 1, 1.0);
    let m = data(&dims, 2, 1.0);
    let c = vec![
        StepCoefs {
            a_xt: 0.0,
            a_m: 0.0,
            c_x0: 0.0,
            c_xt: 0.0,
            sigma: 1.0
        };
        3
    ];
    let key = NoiseKey {
        seed: 4,
        step: 8,
        first_example: 16,
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| fused_sampler_step(&xt, &m, &c, None, StepNoise::Philox(key)).unwrap())
    };
    let one = run(1);
    assert_same(&one, &run(2), "1 vs 2 threads");
    // With all other coefficients 0, x_prev = 0 + 0 + 1 * z: the raw stream.
    let z = one.x_prev.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = 2 * 100 * 91;
    for i in [0usize, 2] {
        let sk = StreamKey::new(4, Stream::Sampler, 8, 16 + i as u64);
        for e in [0usize, 1, 2, 3, 4, 16383, 16384, n - 1] {
            assert_eq!(
                z[i * n + e].to_bits(),
                sk.normal(e as u64).to_bits(),
                "example {i} element {e}"
            );
        }
    }
    let pn = philox_normal(&dims[..], Stream::Sampler as u32, key, &Device::Cpu).unwrap();
    assert_eq!(bits(&pn), bits(&one.x_prev));
}

/// x0_from inverts the forward process for each prediction type.
#[test]
fn x0_from_recovers_x0() {
    for ab in [0.9999f64, 0.5, 1e-4] {
        let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
        for (x0, eps) in [(0.3f64, -1.2f64), (-0.9, 0.4)] {
            let xt = a * x0 + s * eps;
            for (pred, m) in [
                (Prediction::Epsilon, eps),
                (Prediction::V, a * eps - s * x0),
                (Prediction::StartX, x0),
            ] {
                let (ax, am) = StepCoefs::x0_from(pred, ab);
                let got = ax * xt + am * m;
                assert!(
                    (got - x0).abs() < 1e-9 * (1.0 + ax.abs()),
                    "{pred:?} abar {ab}: {got} vs {x0}"
                );
            }
        }
    }
}

/// Without noise in x_t, a DDPM posterior mean and a deterministic DDIM step land exactly on the
/// noise-free trajectory: c_x0 + c_xt sqrt(abar) = sqrt(abar_prev); DDIM(eta=0) also carries the noise
/// over: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps.
#[test]
fn step_coefficients_follow_the_trajectory() {
    for (ab, abp) in [(0.5f64, 0.6f64), (0.01, 0.02), (0.9, 1.0)] {
        let d = StepCoefs::ddpm(Prediction::StartX, ab, abp, 0.0);
        let sum = d.c_x0 as f64 + d.c_xt as f64 * ab.sqrt();
        assert!((sum - abp.sqrt()).abs() < 1e-6, "ddpm {ab} {abp}: {sum}");
        let (x0, eps) = (0.7f64, -0.3f64);
        let xt = ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps;
        let i = StepCoefs::ddim(Prediction::Epsilon, ab, abp, 0.0);
        assert_eq!(i.sigma, 0.0);
        let x0p = i.a_xt as f64 * xt + i.a_m as f64 * eps;
        let xp = i.c_x0 as f64 * x0p + i.c_xt as f64 * xt;
        let want = abp.sqrt() * x0 + (1.0 - abp).sqrt() * eps;
        assert!((xp - want).abs() < 1e-5, "ddim {ab} {abp}: {xp} vs {want}");
    }
    // eta = 1 gives DDPM's fixed-small sigma: sqrt(beta_tilde).
    let (ab, abp) = (0.3f64, 0.4f64);
    let i = StepCoefs::ddim(Prediction::Epsilon, ab, abp, 1.0);
    let beta = 1.0 - ab / abp;
    let tilde = beta * (1.0 - abp) / (1.0 - ab);
    assert!((i.sigma as f64 - tilde.sqrt()).abs() < 1e-7);
}

/// improved-diffusion's DDIM formula step by step (eps from the clipped x0) against the folded coefficients.
#[test]
fn ddim_matches_improved_diffusion_formula() {
    let (ab, abp, eta) = (0.2f64, 0.35f64, 0.3f64);
    let dims = [2usize, 1, 4, 4];
    let xt = data(&dims, 7, 2.0);
    let m = data(&dims, 8, 1.0);
    let z = data(&dims, 9, 1.0);
    let c = vec![StepCoefs::ddim(Prediction::Epsilon, ab, abp, eta); 2];
    let out = fused_sampler_step(&xt, &m, &c, Some((-1.0, 1.0)), StepNoise::Given(&z)).unwrap();
    let (xv, mv, zv) = (
        xt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        m.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        z.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    let got = out.x_prev.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let sigma = eta * ((1.0 - abp) / (1.0 - ab)).sqrt() * (1.0 - ab / abp).sqrt();
    for k in 0..xv.len() {
        let (x, e, zz) = (xv[k] as f64, mv[k] as f64, zv[k] as f64);
        let x0 = ((1.0 / ab).sqrt() * x - (1.0 / ab - 1.0).sqrt() * e).clamp(-1.0, 1.0);
        let eps = ((1.0 / ab).sqrt() * x - x0) / (1.0 / ab - 1.0).sqrt();
        let want = x0 * abp.sqrt() + (1.0 - abp - sigma * sigma).sqrt() * eps + sigma * zz;
        assert!(
            (got[k] as f64 - want).abs() < 2e-5 * (1.0 + want.abs()),
            "{k}: {} vs {want}",
            got[k]
        );
    }
}

#[test]
fn bad_inputs_are_errors() {
    let xt = data(&[2, 1, 2, 2], 1, 1.0);
    let m = data(&[2, 1, 2, 3], 2, 1.0);
    let c = coefs(2);
    assert!(fused_sampler_step(&xt, &m, &c, None, StepNoise::None).is_err());
    assert!(fused_sampler_step(&xt, &xt, &c[..1], None, StepNoise::None).is_err());
    assert!(fused_sampler_step(&xt, &xt, &c, Some((1.0, -1.0)), StepNoise::None).is_err());
    assert!(fused_sampler_step(&xt, &xt, &c, None, StepNoise::Given(&m)).is_err());
}
