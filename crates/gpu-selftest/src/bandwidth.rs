//! Memory bandwidth of the fused kernels against a device-to-device copy moving the same bytes.
//!
//! Bytes counted per element: the noising kernel reads x0 and writes x_t, noise and target (16 B); the
//! copy moves 8 B per element (read 8, write 8: 16 B of traffic), so both touch the same amount of
//! memory. Timed with CUDA events over repeated launches after warm-up.

use crate::kernels_check::tables;
use crate::report::Report;
use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::{Device, Storage, Tensor};
use ddpm_kernels::{
    cuda::launch_noising, fused_noising, fused_sampler_step, noise_coefficients, philox_normal,
    NoiseKey, Prediction, StepCoefs, StepNoise,
};
use ddpm_rng::Stream;
use std::sync::Arc;

/// Milliseconds per call of `f`, by CUDA events around `reps` calls after 3 warm-up calls.
fn time_ms(
    stream: &Arc<CudaStream>,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    stream.synchronize()?;
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..reps {
        f()?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    Ok(start.elapsed_ms(&end)? as f64 / reps as f64)
}

pub fn run(dev: &Device, quick: bool, rep: &mut Report) -> Result<()> {
    let cuda = dev.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let (sa, sm) = tables()?;
    let (b, n) = (if quick { 64usize } else { 256 }, 4 * 256 * 256usize);
    let elems = b * n;
    let reps = if quick { 10 } else { 30 };
    let gbs = |ms: f64| 16.0 * elems as f64 / (ms * 1e-3) / 1e9;
    let size = format!(
        "{b} x {n} f32 ({:.0} MB moved per call)",
        16.0 * elems as f64 / 1e6
    );
    let key = NoiseKey {
        seed: 7,
        step: 1,
        first_example: 0,
    };
    let t: Vec<u32> = (0..b as u32).map(|i| (i * 37) % 1000).collect();
    let coefs = noise_coefficients(&t, &sa, &sm)?;

    let x0 = philox_normal((b, n), Stream::Flip as u32, key, dev)?;
    let (st, l) = x0.storage_and_layout();
    let Storage::Cuda(cs) = &*st else {
        return Err(anyhow!("x0 not on the GPU"));
    };
    let x0v = cs.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
    let mut out = cuda.alloc_zeros::<f32>(3 * elems)?;
    let coef = cuda.clone_htod(&coefs.iter().flatten().copied().collect::<Vec<f32>>())?;
    let kernel_ms = time_ms(&stream, reps, || {
        Ok(launch_noising(
            cuda,
            &x0v,
            &mut out,
            &coef,
            b,
            n,
            key,
            Prediction::Epsilon,
        )?)
    })?;
    drop(out);

    let src = cuda.alloc_zeros::<f32>(2 * elems)?;
    let mut dst = cuda.alloc_zeros::<f32>(2 * elems)?;
    let copy_ms = time_ms(&stream, reps, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    drop((src, dst));

    let k = gbs(kernel_ms);
    let c = gbs(copy_ms);
    rep.perf(
        "fused noising kernel",
        format!("{k:.0} GB/s"),
        format!("{kernel_ms:.3} ms, {size}"),
    );
    rep.perf(
        "device-to-device copy, same bytes",
        format!("{c:.0} GB/s"),
        format!("{copy_ms:.3} ms"),
    );
    rep.perf(
        "fused noising kernel / copy",
        format!("{:.1}%", 100.0 * k / c),
        if k >= 0.9 * c {
            "target >= 90%: met"
        } else {
            "target >= 90%: NOT met"
        },
    );

    let op_ms = time_ms(&stream, reps, || {
        fused_noising(&x0, &t, &sa, &sm, key, Prediction::Epsilon)?;
        Ok(())
    })?;
    rep.perf(
        "fused noising op (custom op: + allocation, coefficient upload)",
        format!("{:.0} GB/s", gbs(op_ms)),
        format!("{op_ms:.3} ms"),
    );

    let a = Tensor::from_iter(coefs.iter().map(|c| c[0]), dev)?.reshape((b, 1))?;
    let s = Tensor::from_iter(coefs.iter().map(|c| c[1]), dev)?.reshape((b, 1))?;
    let unfused_ms = time_ms(&stream, reps, || {
        let noise = philox_normal((b, n), Stream::Noise as u32, key, dev)?;
        let _x_t = (x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?;
        Ok(())
    })?;
    rep.perf(
        "unfused noising on the GPU (philox_normal + broadcast mul/add)",
        format!("{unfused_ms:.3} ms"),
        format!("fused op is {:.2}x faster", unfused_ms / op_ms),
    );

    let m = philox_normal((b, n), Stream::Sampler as u32, key, dev)?;
    let sc = vec![StepCoefs::ddpm(Prediction::Epsilon, 0.5, 0.55, 0.1); b];
    let step_ms = time_ms(&stream, reps, || {
        fused_sampler_step(&x0, &m, &sc, Some((-1.0, 1.0)), StepNoise::Philox(key))?;
        Ok(())
    })?;
    rep.perf(
        "fused sampler step op (Philox noise, clip)",
        format!("{:.0} GB/s", gbs(step_ms)),
        format!("{step_ms:.3} ms; reads x_t, model output, writes x_prev, x0_pred"),
    );
    Ok(())
}
