//! Bad shapes given to the public ops are errors that say what is wrong, never a panic, a read
//! outside a tensor or uninitialised output.

use candle_core::{DType, Device, Tensor};

fn t(dims: &[usize], dt: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

fn grads_err(x: &[usize], w: &[usize], g: &[usize], stride: usize, pad: usize) -> String {
    let (x, w, g) = (t(x, DType::F32), t(w, DType::F32), t(g, DType::F32));
    match ddpm_ops::conv2d_grads(&x, &w, &g, stride, pad, [true, true, true]) {
        Ok(r) => panic!(
            "accepted: dx {:?}, dw {:?}",
            r[0].as_ref().map(|t| t.dims().to_vec()),
            r[1].as_ref().map(|t| t.dims().to_vec())
        ),
        Err(e) => e.to_string(),
    }
}

#[test]
fn conv2d_grads_rejects_weight_with_other_input_channels() {
    // Winograd path (3x3, stride 1, padding 1): the kernel transform used to leave slots of U
    // uninitialised (2 planes' slots for 1 kernel) and return them as gradient values.
    let e = grads_err(&[1, 2, 4, 4], &[1, 1, 3, 3], &[1, 1, 4, 4], 1, 1);
    assert!(e.contains("input has 2 channels, weight expects 1"), "{e}");
    // GEMM path (1x1): the weight was read as 2 x 2 values through a raw view of 2.
    let e = grads_err(&[1, 2, 4, 4], &[2, 1, 1, 1], &[1, 2, 4, 4], 1, 0);
    assert!(e.contains("input has 2 channels, weight expects 1"), "{e}");
    // And more weight channels than the input has (x read past its end).
    let e = grads_err(&[1, 1, 5, 5], &[2, 3, 3, 3], &[1, 2, 2, 2], 2, 0);
    assert!(e.contains("input has 1 channels, weight expects 3"), "{e}");
}

#[test]
fn conv2d_grads_rejects_stride_zero_and_oversized_kernels() {
    // Used to divide by zero.
    let e = grads_err(&[1, 1, 4, 4], &[1, 1, 3, 3], &[1, 1, 2, 2], 0, 0);
    assert!(e.contains("stride must be positive"), "{e}");
    // Used to underflow `h + 2p - kh`.
    let e = grads_err(&[1, 1, 2, 2], &[1, 1, 5, 5], &[1, 1, 1, 1], 1, 0);
    assert!(e.contains("larger than padded input"), "{e}");
    let e = grads_err(&[1, 1, 2, 2], &[1, 1, 0, 3], &[1, 1, 3, 1], 1, 0);
    assert!(e.contains("empty kernel"), "{e}");
    let e = grads_err(
        &[1, 1, 2, 2],
        &[1, 1, 1, 1],
        &[1, 1, 2, 2],
        1,
        usize::MAX / 2,
    );
    assert!(e.contains("padding"), "{e}");
    let e = grads_err(&[1, 1, 4, 4], &[1, 1, 3], &[1, 1, 2, 2], 1, 0);
    assert!(e.contains("4 dimensions"), "{e}");
}

#[test]
fn conv2d_grads_rejects_mixed_dtypes() {
    let (x, w) = (t(&[1, 1, 4, 4], DType::F32), t(&[1, 1, 3, 3], DType::F32));
    let g = t(&[1, 1, 2, 2], DType::F64);
    let e = ddpm_ops::conv2d_grads(&x, &w, &g, 1, 0, [true; 3]).unwrap_err();
    assert!(e.to_string().contains("all be f32 or all f64"), "{e}");
}

#[test]
fn conv2d_forward_rejects_the_same() {
    let (x, w) = (t(&[1, 2, 4, 4], DType::F32), t(&[1, 1, 3, 3], DType::F32));
    assert!(ddpm_ops::conv2d(&x, &w, None, 1, 1).is_err());
    let w = t(&[1, 2, 3, 3], DType::F32);
    let e = ddpm_ops::conv2d(&x, &w, None, 0, 1).unwrap_err();
    assert!(e.to_string().contains("stride"), "{e}");
}

#[test]
fn valid_grads_keep_their_shapes() {
    let (x, w) = (t(&[2, 3, 6, 6], DType::F32), t(&[4, 3, 3, 3], DType::F32));
    for (stride, pad, out) in [(1, 1, 6), (2, 1, 3), (1, 0, 4)] {
        let g = t(&[2, 4, out, out], DType::F32);
        let [dx, dw, db] = ddpm_ops::conv2d_grads(&x, &w, &g, stride, pad, [true; 3]).unwrap();
        assert_eq!(dx.unwrap().dims(), x.dims());
        assert_eq!(dw.unwrap().dims(), w.dims());
        assert_eq!(db.unwrap().dims(), [4]);
    }
}

#[test]
fn empty_dimensions_are_errors_or_empty_results() {
    let z = t(&[2, 0], DType::F32);
    let r = ddpm_ops::softmax_last_dim(&z);
    assert!(r.as_ref().map_or(true, |y| y.dims() == [2, 0]), "{r:?}");
    let (a, b) = (t(&[0, 2, 3], DType::F32), t(&[0, 1, 3], DType::F32));
    let r = ddpm_ops::cat_channels(&a, &b);
    assert!(r.as_ref().map_or(true, |y| y.dims() == [0, 3, 3]), "{r:?}");
    let q = t(&[2, 4, 0], DType::F32);
    let r = ddpm_ops::attention(&q, &q, &q, 0.5);
    assert!(r.as_ref().map_or(true, |y| y.dims() == [2, 4, 0]), "{r:?}");
    let x = t(&[2, 4, 0, 3], DType::F32);
    let (gm, bt) = (t(&[4], DType::F32), t(&[4], DType::F32));
    let r = ddpm_ops::group_norm(&x, &gm, &bt, 2, 1e-5, true);
    assert!(
        r.as_ref().map_or(true, |y| y.dims() == [2, 4, 0, 3]),
        "{r:?}"
    );
    let x = t(&[0, 2, 4, 4], DType::F32);
    let w = t(&[3, 2, 3, 3], DType::F32);
    let r = ddpm_ops::conv2d(&x, &w, None, 1, 1);
    assert!(
        r.as_ref().map_or(true, |y| y.dims() == [0, 3, 4, 4]),
        "{r:?}"
    );
}

#[test]
fn group_norm_affine_shapes() {
    // gamma and beta: both [C] or both [B, C]; anything else is an error before any work.
    let x = t(&[2, 4, 3, 3], DType::F32);
    let ok = |g: &[usize], b: &[usize]| {
        ddpm_ops::group_norm(&x, &t(g, DType::F32), &t(b, DType::F32), 2, 1e-5, true).is_ok()
    };
    assert!(ok(&[4], &[4]));
    assert!(ok(&[2, 4], &[2, 4]));
    assert!(
        !ok(&[3, 4], &[3, 4]),
        "per-example affine for another batch size"
    );
    assert!(!ok(&[2, 4], &[4]), "gamma per example, beta per channel");
    assert!(!ok(&[4, 2], &[4, 2]));
}
