//! The CUDA source must use the same constants and codes as the Rust side. Parsed from the text so this
//! runs without nvcc.

use crate::noising::Prediction;
use ddpm_rng::Stream;

const PHILOX: &str = include_str!("philox.cuh");
const KERNELS: &str = include_str!("ddpm_kernels.cu");

/// The value of `#define NAME VALUE` (VALUE as u32, hex or decimal, `u` suffix allowed).
fn define(src: &str, name: &str) -> u32 {
    let line = src
        .lines()
        .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
        .unwrap_or_else(|| panic!("#define {name} not found"));
    let v = line
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_end_matches('u');
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).unwrap(),
        None => v.parse().unwrap(),
    }
}

#[test]
fn float_constants_match_rust() {
    use std::f32::consts::{LN_2, SQRT_2, TAU};
    let table: [(&str, f32); 16] = [
        ("DDPM_K_INV_2P24", 1.0 / 16_777_216.0),
        ("DDPM_K_INV_2P25", 1.0 / 33_554_432.0),
        ("DDPM_K_SQRT_2", SQRT_2),
        ("DDPM_K_LN_2", LN_2),
        ("DDPM_K_TAU", TAU),
        ("DDPM_K_INV_9", 1.0 / 9.0),
        ("DDPM_K_INV_7", 1.0 / 7.0),
        ("DDPM_K_INV_5", 1.0 / 5.0),
        ("DDPM_K_INV_3", 1.0 / 3.0),
        ("DDPM_K_INV_362880", 1.0 / 362_880.0),
        ("DDPM_K_INV_5040", 1.0 / 5040.0),
        ("DDPM_K_INV_120", 1.0 / 120.0),
        ("DDPM_K_INV_6", 1.0 / 6.0),
        ("DDPM_K_INV_40320", 1.0 / 40_320.0),
        ("DDPM_K_INV_720", 1.0 / 720.0),
        ("DDPM_K_INV_24", 1.0 / 24.0),
    ];
    for (name, value) in table {
        assert_eq!(define(PHILOX, name), value.to_bits(), "{name}");
    }
}

#[test]
fn philox_and_stream_constants_match_rust() {
    assert_eq!(define(PHILOX, "DDPM_PHILOX_M0"), 0xD251_1F53);
    assert_eq!(define(PHILOX, "DDPM_PHILOX_M1"), 0xCD9E_8D57);
    assert_eq!(define(PHILOX, "DDPM_PHILOX_W0"), 0x9E37_79B9);
    assert_eq!(define(PHILOX, "DDPM_PHILOX_W1"), 0xBB67_AE85);
    assert_eq!(define(PHILOX, "DDPM_STREAM_NOISE"), Stream::Noise as u32);
    assert_eq!(
        define(PHILOX, "DDPM_STREAM_SAMPLER"),
        Stream::Sampler as u32
    );
    // The Philox constants above are the ones of the Random123 known-answer test ddpm-rng passes.
    assert_eq!(
        ddpm_rng::philox4x32_10([0; 4], [0; 2]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
}

#[test]
fn op_codes_match_rust() {
    assert_eq!(define(KERNELS, "DDPM_PRED_EPS"), Prediction::Epsilon.code());
    assert_eq!(define(KERNELS, "DDPM_PRED_V"), Prediction::V.code());
    assert_eq!(define(KERNELS, "DDPM_PRED_X0"), Prediction::StartX.code());
    let op = crate::SamplerStepOp {
        coefs: vec![],
        clip: None,
        philox: None,
    };
    assert_eq!(define(KERNELS, "DDPM_NOISE_NONE"), op.noise_mode(false));
    assert_eq!(define(KERNELS, "DDPM_NOISE_GIVEN"), op.noise_mode(true));
    let op = crate::SamplerStepOp {
        philox: Some(crate::NoiseKey {
            seed: 0,
            step: 0,
            first_example: 0,
        }),
        ..op
    };
    assert_eq!(define(KERNELS, "DDPM_NOISE_PHILOX"), op.noise_mode(false));
}
