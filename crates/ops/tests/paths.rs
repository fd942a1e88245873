//! Process-wide switches, in their own test binary so they cannot disturb other tests:
//! the thread split (results identical in the forward, within rounding in the reductions, and
//! bitwise repeatable for a fixed count) and the candle fallback.

mod common;

use std::sync::Mutex;

use candle_core::{DType, Var};
use common::{randn, rel_err};

/// The tests here flip process-wide switches: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn conv_grads(threads: usize) -> Vec<candle_core::Tensor> {
    ddpm_ops::set_num_threads(threads);
    let x = Var::from_tensor(&randn(1, &[5, 6, 9, 9], DType::F32)).unwrap();
    let w = Var::from_tensor(&randn(2, &[4, 6, 3, 3], DType::F32)).unwrap();
    let b = Var::from_tensor(&randn(3, &[4], DType::F32)).unwrap();
    let y = ddpm_ops::conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), 2, 1).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let mut v = vec![y.clone()];
    for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
        v.push(g.get(t).unwrap().clone());
    }
    v
}

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn thread_splits_and_fallback() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let one = conv_grads(1);
    for threads in [2, 3, 8] {
        let a = conv_grads(threads);
        let b = conv_grads(threads);
        for (i, (u, v)) in a.iter().zip(&b).enumerate() {
            assert_eq!(
                bits(u),
                bits(v),
                "threads {threads}: output {i} not repeatable"
            );
        }
        for (i, (u, v)) in a.iter().zip(&one).enumerate() {
            let e = rel_err(u, v);
            assert!(
                e < 1e-5,
                "threads {threads} vs 1: output {i} differs by {e:.2e}"
            );
        }
        // The forward and dx have no cross-example sums: identical for any split.
        assert_eq!(bits(&a[0]), bits(&one[0]));
        assert_eq!(bits(&a[1]), bits(&one[1]));
    }
    ddpm_ops::set_num_threads(2);
    let fast = conv_grads(2);
    ddpm_ops::set_fast_path(false);
    assert!(!ddpm_ops::fast_path_enabled());
    let slow = conv_grads(2);
    ddpm_ops::set_fast_path(true);
    for (i, (u, v)) in fast.iter().zip(&slow).enumerate() {
        let e = rel_err(u, v);
        assert!(
            e < 2e-5,
            "fast vs candle path: output {i} differs by {e:.2e}"
        );
    }
}

#[test]
fn tile_sizes_agree() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let x = Var::from_tensor(&randn(5, &[3, 16, 20, 19], DType::F32)).unwrap();
    let w = Var::from_tensor(
        &randn(6, &[8, 16, 3, 3], DType::F32)
            .affine(0.1, 0.0)
            .unwrap(),
    )
    .unwrap();
    let run = |tile: usize, stride: usize| {
        ddpm_ops::set_tile_bytes(tile);
        let y = ddpm_ops::conv2d(x.as_tensor(), w.as_tensor(), None, stride, 1).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        [
            y.clone(),
            g.get(x.as_tensor()).unwrap().clone(),
            g.get(w.as_tensor()).unwrap().clone(),
        ]
    };
    for stride in [1, 2] {
        let whole = run(0, stride);
        for tile in [1, 40_000, ddpm_ops::DEFAULT_TILE_BYTES] {
            for (i, (a, b)) in run(tile, stride).iter().zip(&whole).enumerate() {
                let e = rel_err(a, b);
                assert!(
                    e < 1e-5,
                    "stride {stride} tile {tile}: output {i} differs by {e:.2e}"
                );
            }
        }
    }
    ddpm_ops::set_tile_bytes(ddpm_ops::DEFAULT_TILE_BYTES);
}

/// Winograd F(2x2, 3x3) against the im2col GEMM, forward and all gradients, f32 and f64, on
/// odd and even sizes, one and several examples.
#[test]
fn winograd_matches_im2col() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
        for (b, cin, cout, h, w) in [
            (3, 16, 8, 9, 7),
            (1, 5, 6, 4, 4),
            (2, 64, 32, 16, 16),
            (4, 3, 5, 1, 3),
        ] {
            let x = Var::from_tensor(&randn(7, &[b, cin, h, w], dtype)).unwrap();
            let wt = Var::from_tensor(
                &randn(8, &[cout, cin, 3, 3], dtype)
                    .affine(0.2, 0.0)
                    .unwrap(),
            )
            .unwrap();
            let bias = Var::from_tensor(&randn(9, &[cout], dtype)).unwrap();
            let run = |on: bool| {
                ddpm_ops::set_winograd(on);
                let y =
                    ddpm_ops::conv2d(x.as_tensor(), wt.as_tensor(), Some(bias.as_tensor()), 1, 1)
                        .unwrap();
                let r = randn(10, y.dims(), dtype);
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let mut v = vec![y.clone()];
                for t in [x.as_tensor(), wt.as_tensor(), bias.as_tensor()] {
                    v.push(g.get(t).unwrap().clone());
                }
                v
            };
            let (wino, gemm) = (run(true), run(false));
            for (i, (a, c)) in wino.iter().zip(&gemm).enumerate() {
                let e = rel_err(a, c);
                assert!(
                    e < tol,
                    "{dtype:?} b{b} {cin}->{cout} {h}x{w}: output {i} differs by {e:.2e}"
                );
            }
        }
    }
    ddpm_ops::set_winograd(true);
}

#[test]
fn malloc_tuning_is_accepted() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    assert!(ddpm_ops::tune_malloc());
}
