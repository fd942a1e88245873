//! CPU tests of the fused noising op: equality with the unfused candle expression, the RNG mapping,
//! noise statistics, and independence from thread count and from how a batch is split across ranks.

use candle_core::{Device, Tensor};
use ddpm_kernels::{fused_noising, unfused_noising, KernelError, NoiseKey, Noised, Prediction};
use ddpm_rng::{Stream, StreamKey};

const PREDS: [Prediction; 3] = [Prediction::Epsilon, Prediction::V, Prediction::StartX];

/// A linear-schedule table (T = 1000) as f32, the way the trainer would pass it.
fn tables() -> (Vec<f32>, Vec<f32>) {
    let mut ab = 1.0f64;
    let (mut a, mut s) = (Vec::new(), Vec::new());
    for i in 0..1000 {
        let beta = 1e-4 + (0.02 - 1e-4) * i as f64 / 999.0;
        ab *= 1.0 - beta;
        a.push(ab.sqrt() as f32);
        s.push((1.0 - ab).sqrt() as f32);
    }
    (a, s)
}

/// Deterministic "images" in [-1, 1].
fn images(dims: &[usize], salt: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let k = StreamKey::new(99, Stream::Flip, salt, 0);
    let mut v = vec![0f32; n];
    k.fill_uniform(&mut v);
    let v: Vec<f32> = v.into_iter().map(|u| 2.0 * u - 1.0).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    flat(t).into_iter().map(f32::to_bits).collect()
}

fn assert_same(a: &Noised, b: &Noised, what: &str) {
    assert_eq!(bits(&a.noise), bits(&b.noise), "{what}: noise");
    assert_eq!(bits(&a.x_t), bits(&b.x_t), "{what}: x_t");
    assert_eq!(bits(&a.target), bits(&b.target), "{what}: target");
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fused_equals_unfused_for_every_prediction() {
    let (sa, sm) = tables();
    // 189 elements per example (not a multiple of 4: tail blocks), and 27648 (> one CPU chunk).
    for (dims, t) in [
        (vec![5usize, 3, 7, 9], vec![0u32, 1, 499, 998, 999]),
        (vec![2usize, 3, 96, 96], vec![17u32, 640]),
    ] {
        let x0 = images(&dims, dims[3] as u64);
        let key = NoiseKey {
            seed: 0xDEAD_BEEF_0123,
            step: 41,
            first_example: 7,
        };
        for pred in PREDS {
            let f = fused_noising(&x0, &t, &sa, &sm, key, pred).unwrap();
            let u = unfused_noising(&x0, &t, &sa, &sm, key, pred).unwrap();
            assert_eq!(f.x_t.dims(), &dims[..]);
            assert_eq!(f.target.dims(), &dims[..]);
            // Both compute two rounded products and a rounded sum per element: identical bits, which is
            // stricter than "equal to float rounding".
            assert_same(&f, &u, &format!("{dims:?} {pred:?}"));
            assert_eq!(max_abs_diff(&f.x_t, &u.x_t), 0.0);
        }
    }
}

#[test]
fn targets_follow_their_definitions() {
    let (sa, sm) = tables();
    let x0 = images(&[3, 2, 5, 5], 3);
    let t = [10u32, 500, 900];
    let key = NoiseKey {
        seed: 5,
        step: 0,
        first_example: 0,
    };
    let eps = fused_noising(&x0, &t, &sa, &sm, key, Prediction::Epsilon).unwrap();
    let v = fused_noising(&x0, &t, &sa, &sm, key, Prediction::V).unwrap();
    let x = fused_noising(&x0, &t, &sa, &sm, key, Prediction::StartX).unwrap();
    assert_eq!(bits(&eps.target), bits(&eps.noise));
    assert_eq!(bits(&x.target), bits(&x0));
    let (x0v, zv, vv, xtv) = (flat(&x0), flat(&v.noise), flat(&v.target), flat(&v.x_t));
    let n = 50;
    for i in 0..3 {
        let (a, s) = (sa[t[i] as usize] as f64, sm[t[i] as usize] as f64);
        for e in 0..n {
            let k = i * n + e;
            let (x, z) = (x0v[k] as f64, zv[k] as f64);
            assert!((vv[k] as f64 - (a * z - s * x)).abs() < 1e-6, "v");
            assert!((xtv[k] as f64 - (a * x + s * z)).abs() < 1e-6, "x_t");
            // v and x_t recover x0: x0 = a x_t - s v (a^2 + s^2 = 1)
            assert!(
                (a * xtv[k] as f64 - s * vv[k] as f64 - x).abs() < 1e-5,
                "x0 from v"
            );
        }
    }
}

#[test]
fn noise_is_the_documented_stream() {
    let (sa, sm) = tables();
    let x0 = images(&[3, 1, 3, 5], 1); // 15 elements per example
    let key = NoiseKey {
        seed: u64::MAX - 3,
        step: (1 << 32) + 9,
        first_example: 1000,
    };
    let out = fused_noising(&x0, &[1, 2, 3], &sa, &sm, key, Prediction::Epsilon).unwrap();
    let z = flat(&out.noise);
    for i in 0..3 {
        let sk = StreamKey::new(key.seed, Stream::Noise, key.step, 1000 + i as u64);
        for e in 0..15 {
            assert_eq!(
                z[i * 15 + e].to_bits(),
                sk.normal(e as u64).to_bits(),
                "example {i} element {e}"
            );
        }
    }
}

#[test]
fn noise_has_unit_moments_and_no_correlations() {
    let (sa, sm) = tables();
    let (b, n) = (8usize, 3 * 64 * 64);
    let x0 = Tensor::zeros((b, 3, 64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let t = vec![0u32; b];
    let draw = |step: u64, seed: u64| {
        let key = NoiseKey {
            seed,
            step,
            first_example: 0,
        };
        flat(
            &fused_noising(&x0, &t, &sa, &sm, key, Prediction::Epsilon)
                .unwrap()
                .noise,
        )
    };
    let z = draw(0, 11);
    let m = z.len() as f64;
    let mean = z.iter().map(|&x| x as f64).sum::<f64>() / m;
    let var = z.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / m;
    let kurt = z.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / m / (var * var);
    // 5-sigma bounds for m = 98304: sd(mean) = 1/sqrt(m), sd(var) = sqrt(2/m), sd(kurtosis) ~ sqrt(24/m).
    let sd = 1.0 / m.sqrt();
    assert!(mean.abs() < 5.0 * sd, "mean {mean}");
    assert!((var - 1.0).abs() < 5.0 * (2.0f64).sqrt() * sd, "var {var}");
    assert!(
        (kurt - 3.0).abs() < 5.0 * (24.0f64).sqrt() * sd,
        "kurtosis {kurt}"
    );

    let corr = |a: &[f32], b: &[f32]| {
        let k = a.len() as f64;
        let (ma, mb) = (
            a.iter().map(|&x| x as f64).sum::<f64>() / k,
            b.iter().map(|&x| x as f64).sum::<f64>() / k,
        );
        let cov = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - ma) * (y as f64 - mb))
            .sum::<f64>()
            / k;
        let va = a.iter().map(|&x| (x as f64 - ma).powi(2)).sum::<f64>() / k;
        let vb = b.iter().map(|&y| (y as f64 - mb).powi(2)).sum::<f64>() / k;
        cov / (va * vb).sqrt()
    };
    // Neighbouring elements: lags 1..=4 cover the two normals of one Box-Muller pair, the two pairs of
    // one Philox block, and adjacent blocks. Also squares (dependence that is not linear).
    for lag in 1..=4 {
        let c = corr(&z[..z.len() - lag], &z[lag..]);
        assert!(c.abs() < 5.0 * sd, "lag {lag} correlation {c}");
        let sq: Vec<f32> = z.iter().map(|x| x * x).collect();
        let c2 = corr(&sq[..sq.len() - lag], &sq[lag..]);
        assert!(c2.abs() < 5.0 * sd, "lag {lag} correlation of squares {c2}");
    }
    // Across examples of one batch, across steps, across seeds.
    let c = corr(&z[..n], &z[n..2 * n]);
    assert!(c.abs() < 5.0 / (n as f64).sqrt(), "example 0 vs 1: {c}");
    let z1 = draw(1, 11);
    let c = corr(&z, &z1);
    assert!(c.abs() < 5.0 * sd, "step 0 vs 1: {c}");
    let zs = draw(0, 12);
    let c = corr(&z, &zs);
    assert!(c.abs() < 5.0 * sd, "seed 11 vs 12: {c}");
    assert_ne!(z, z1);
}

#[test]
fn identical_for_one_and_two_threads() {
    let (sa, sm) = tables();
    let x0 = images(&[3, 3, 80, 80], 9); // 19200 elements per example: two chunks each
    let t = [3u32, 300, 999];
    let key = NoiseKey {
        seed: 77,
        step: 12,
        first_example: 64,
    };
    for pred in PREDS {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| fused_noising(&x0, &t, &sa, &sm, key, pred).unwrap())
        };
        let (one, two) = (run(1), run(2));
        assert_same(&one, &two, &format!("{pred:?} 1 vs 2 threads"));
        assert_same(&one, &run(3), &format!("{pred:?} 1 vs 3 threads"));
    }
}

#[test]
fn identical_when_the_batch_is_split_across_ranks() {
    let (sa, sm) = tables();
    let x0 = images(&[6, 3, 8, 8], 4);
    let t = [5u32, 50, 500, 950, 0, 999];
    let key = NoiseKey {
        seed: 3,
        step: 1234,
        first_example: 12,
    };
    for pred in PREDS {
        let whole = fused_noising(&x0, &t, &sa, &sm, key, pred).unwrap();
        // rank 0 holds examples 0..2 (global 12..14), rank 1 holds 2..6 (global 14..18)
        let lo = fused_noising(&x0.narrow(0, 0, 2).unwrap(), &t[..2], &sa, &sm, key, pred).unwrap();
        let k1 = NoiseKey {
            first_example: 14,
            ..key
        };
        let hi = fused_noising(&x0.narrow(0, 2, 4).unwrap(), &t[2..], &sa, &sm, k1, pred).unwrap();
        let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0).unwrap();
        let split = Noised {
            x_t: cat(&lo.x_t, &hi.x_t),
            noise: cat(&lo.noise, &hi.noise),
            target: cat(&lo.target, &hi.target),
        };
        assert_same(&whole, &split, &format!("{pred:?} split"));
    }
}

#[test]
fn resume_draws_the_same_noise_and_steps_differ() {
    let (sa, sm) = tables();
    let x0 = images(&[2, 1, 4, 4], 2);
    let key = NoiseKey {
        seed: 1,
        step: 10,
        first_example: 0,
    };
    let a = fused_noising(&x0, &[1, 2], &sa, &sm, key, Prediction::Epsilon).unwrap();
    let b = fused_noising(&x0, &[1, 2], &sa, &sm, key, Prediction::Epsilon).unwrap();
    assert_same(&a, &b, "same key");
    let c = fused_noising(
        &x0,
        &[1, 2],
        &sa,
        &sm,
        NoiseKey { step: 11, ..key },
        Prediction::Epsilon,
    )
    .unwrap();
    assert_ne!(bits(&a.noise), bits(&c.noise));
}

#[test]
fn strided_input_gives_the_contiguous_result() {
    let (sa, sm) = tables();
    let x0 = images(&[2, 3, 5, 6], 8);
    let xt = x0.transpose(2, 3).unwrap(); // non-contiguous view
    let key = NoiseKey {
        seed: 2,
        step: 3,
        first_example: 4,
    };
    let a = fused_noising(&xt, &[7, 8], &sa, &sm, key, Prediction::V).unwrap();
    let b = fused_noising(
        &xt.contiguous().unwrap(),
        &[7, 8],
        &sa,
        &sm,
        key,
        Prediction::V,
    )
    .unwrap();
    assert_same(&a, &b, "strided");
    assert_eq!(a.x_t.dims(), &[2, 3, 6, 5]);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (sa, sm) = tables();
    let x0 = images(&[2, 1, 2, 2], 0);
    let key = NoiseKey {
        seed: 0,
        step: 0,
        first_example: 0,
    };
    let msg = |r: Result<Noised, KernelError>| match r {
        Err(KernelError::BadInput { msg, .. }) => msg,
        other => panic!("expected BadInput, got {other:?}"),
    };
    assert!(
        msg(fused_noising(&x0, &[1], &sa, &sm, key, Prediction::Epsilon))
            .contains("1 timesteps for a batch of 2")
    );
    assert!(msg(fused_noising(
        &x0,
        &[1, 1000],
        &sa,
        &sm,
        key,
        Prediction::Epsilon
    ))
    .contains("t[1] = 1000"));
    assert!(msg(fused_noising(
        &x0,
        &[1, 1],
        &sa,
        &sm[..10],
        key,
        Prediction::Epsilon
    ))
    .contains("differ in length"));
    let x64 = x0.to_dtype(candle_core::DType::F64).unwrap();
    assert!(msg(fused_noising(
        &x64,
        &[1, 1],
        &sa,
        &sm,
        key,
        Prediction::Epsilon
    ))
    .contains("must be f32"));
    // An empty batch is fine.
    let empty = Tensor::zeros((0, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let out = fused_noising(&empty, &[], &sa, &sm, key, Prediction::Epsilon).unwrap();
    assert_eq!(out.x_t.dims(), &[0, 1, 2, 2]);
}
