//! The CUDA kernels, compiled for the host with shims for the CUDA intrinsics (tests/cuda_host_emu.cpp) and
//! run thread by thread, must give bit-identical results to the Rust CPU ops, for several launch shapes,
//! both the float4 and the scalar path, and every prediction type and noise mode. This checks the CUDA
//! source's logic (index math, constants, operation order) on machines without a GPU; the compiler and the
//! hardware are checked by ddpm-gpu-selftest on a GPU. Needs a C++ compiler (`$CXX` or `c++`), which
//! scripts/setup.sh installs (build-essential).

use candle_core::{Device, Tensor};
use ddpm_kernels::{
    fused_noising, fused_sampler_step, noise_coefficients, philox_normal, NoiseKey, Prediction,
    StepCoefs, StepNoise,
};
use ddpm_rng::{Stream, StreamKey};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn emulator() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let exe = dir.join("ddpm_cuda_host_emu");
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_host_emu.cpp");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
        let out = Command::new(&cxx)
            .args([
                "-O2",
                "-std=c++17",
                "-ffp-contract=off",
                "-fno-fast-math",
                "-Wno-unknown-pragmas",
                "-o",
            ])
            .arg(&exe)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run the C++ compiler `{cxx}` (install build-essential): {e}")
            });
        assert!(
            out.status.success(),
            "compiling {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

fn run(args: &[String], input: &[f32], misalign: bool) -> Vec<f32> {
    let mut child = Command::new(emulator())
        .args(args)
        .env("MISALIGN", if misalign { "1" } else { "0" })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bytes: Vec<u8> = input.iter().flat_map(|x| x.to_le_bytes()).collect();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "emulator {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn data(b: usize, n: usize, salt: u64) -> Vec<f32> {
    let mut v = vec![0f32; b * n];
    StreamKey::new(21, Stream::Timestep, salt, 3).fill_normal(&mut v);
    v
}

/// The launch shape src/cuda.rs uses, and two odd ones that exercise the stride loops.
fn grids(b: usize, n: usize) -> Vec<(u32, u32)> {
    let natural = (
        (n.div_ceil(4) as u32).div_ceil(256).max(1),
        (b as u32).clamp(1, 65_535),
    );
    vec![natural, (1, 1), (2, 2)]
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {k}: {g} vs {w}");
    }
}

fn tables() -> (Vec<f32>, Vec<f32>) {
    (0..100)
        .map(|i| {
            let ab = (1.0 - i as f64 / 100.0).max(1e-3);
            (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32)
        })
        .unzip()
}

#[test]
fn noising_kernel_matches_cpu() {
    let (sa, sm) = tables();
    let seed = 0x1234_5678_9abc_def0u64;
    // n = 189: tail blocks, scalar path; n = 1100: float4 path (and scalar when misaligned).
    for (b, n, misalign) in [(3usize, 189usize, false), (3, 1100, false), (2, 1100, true)] {
        let x0 = data(b, n, n as u64);
        let t: Vec<u32> = (0..b as u32).map(|i| 7 + 41 * i).collect();
        let key = NoiseKey {
            seed,
            step: 5,
            first_example: u32::MAX as u64 - 1,
        }; // example index wraps
        let coefs = noise_coefficients(&t, &sa, &sm).unwrap();
        let mut input = x0.clone();
        input.extend(coefs.iter().flatten());
        let x0t = Tensor::from_vec(x0, (b, n), &Device::Cpu).unwrap();
        for (code, pred) in [
            (0, Prediction::Epsilon),
            (1, Prediction::V),
            (2, Prediction::StartX),
        ] {
            let cpu = fused_noising(&x0t, &t, &sa, &sm, key, pred).unwrap();
            let mut want = flat(&cpu.x_t);
            want.extend(flat(&cpu.noise));
            want.extend(flat(&cpu.target));
            for (gx, gy) in grids(b, n) {
                let args: Vec<String> = ["noise".to_string()]
                    .into_iter()
                    .chain(
                        [
                            b as u64,
                            n as u64,
                            seed,
                            key.step,
                            key.first_example as u32 as u64,
                            code,
                            gx as u64,
                            gy as u64,
                        ]
                        .map(|v| v.to_string()),
                    )
                    .collect();
                let got = run(&args, &input, misalign);
                assert_bits(
                    &got,
                    &want,
                    &format!("noise b{b} n{n} mis{misalign} {pred:?} grid ({gx},{gy})"),
                );
            }
        }
    }
}

#[test]
fn sampler_kernel_matches_cpu() {
    let seed = 42u64;
    for (b, n, misalign) in [(3usize, 190usize, false), (2, 1024, false), (2, 1024, true)] {
        let xt = data(b, n, 1);
        let m = data(b, n, 2);
        let z = data(b, n, 3);
        let coefs: Vec<StepCoefs> = (0..b)
            .map(|i| {
                StepCoefs::ddim(
                    Prediction::Epsilon,
                    0.3 + 0.1 * i as f64,
                    0.5 + 0.1 * i as f64,
                    0.7,
                )
            })
            .collect();
        let key = NoiseKey {
            seed,
            step: 77,
            first_example: 9,
        };
        let (xtt, mt, zt) = (
            Tensor::from_vec(xt.clone(), (b, n), &Device::Cpu).unwrap(),
            Tensor::from_vec(m.clone(), (b, n), &Device::Cpu).unwrap(),
            Tensor::from_vec(z.clone(), (b, n), &Device::Cpu).unwrap(),
        );
        for clip in [None, Some((-1.0f32, 1.0f32))] {
            for (mode, noise) in [
                (0u64, StepNoise::None),
                (1, StepNoise::Philox(key)),
                (2, StepNoise::Given(&zt)),
            ] {
                let cpu = fused_sampler_step(&xtt, &mt, &coefs, clip, noise).unwrap();
                let mut want = flat(&cpu.x_prev);
                want.extend(flat(&cpu.x0_pred));
                let mut input = xt.clone();
                input.extend(&m);
                if mode == 2 {
                    input.extend(&z);
                }
                input.extend(
                    coefs
                        .iter()
                        .flat_map(|c| [c.a_xt, c.a_m, c.c_x0, c.c_xt, c.sigma]),
                );
                let (cl, lo, hi) = match clip {
                    Some((lo, hi)) => (1u64, lo.to_bits() as u64, hi.to_bits() as u64),
                    None => (0, 0, 0),
                };
                for (gx, gy) in grids(b, n) {
                    let args: Vec<String> = ["step".to_string()]
                        .into_iter()
                        .chain(
                            [
                                b as u64,
                                n as u64,
                                mode,
                                seed,
                                key.step,
                                key.first_example,
                                cl,
                                lo,
                                hi,
                                gx as u64,
                                gy as u64,
                            ]
                            .map(|v| v.to_string()),
                        )
                        .collect();
                    let got = run(&args, &input, misalign);
                    assert_bits(&got, &want, &format!("step b{b} n{n} mis{misalign} mode {mode} clip {clip:?} grid ({gx},{gy})"));
                }
            }
        }
    }
}

#[test]
fn normal_kernel_matches_cpu() {
    let key = NoiseKey {
        seed: u64::MAX,
        step: 1 << 33,
        first_example: 3,
    };
    for (b, n, misalign) in [(2usize, 37usize, false), (3, 2048, false), (3, 2048, true)] {
        let cpu = philox_normal((b, n), Stream::Sampler as u32, key, &Device::Cpu).unwrap();
        for (gx, gy) in grids(b, n) {
            let args: Vec<String> = ["normal".to_string()]
                .into_iter()
                .chain(
                    [
                        b as u64,
                        n as u64,
                        key.seed,
                        Stream::Sampler as u64,
                        key.step as u32 as u64,
                        key.first_example,
                        gx as u64,
                        gy as u64,
                    ]
                    .map(|v| v.to_string()),
                )
                .collect();
            let got = run(&args, &[], misalign);
            assert_bits(
                &got,
                &flat(&cpu),
                &format!("normal b{b} n{n} mis{misalign} grid ({gx},{gy})"),
            );
        }
    }
}
