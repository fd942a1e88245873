//! Process-wide switches, in their own test binary so they cannot disturb other tests:
//! the thread split (results identical in the forward, within rounding in the reductions, and
//! bitwise repeatable for a fixed count) and the candle fallback.

mod common;

use candle_core::{DType, Var};
use common::{randn, rel_err};

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
    let one = conv_grads(1);
    for threads in [2, 3, 8] {
        let a = conv_grads(threads);
        let b = conv_grads(threads);
        for (i, (u, v)) in a.iter().zip(&b).enumerate() {
            assert_eq!(bits(u), bits(v), "threads {threads}: output {i} not repeatable");
        }
        for (i, (u, v)) in a.iter().zip(&one).enumerate() {
            let e = rel_err(u, v);
            assert!(e < 1e-5, "threads {threads} vs 1: output {i} differs by {e:.2e}");
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
        assert!(e < 2e-5, "fast vs candle path: output {i} differs by {e:.2e}");
    }
}
