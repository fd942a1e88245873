//! CUDA side of the ops: the embedded fatbin, its per-device module, and the launches.
//!
//! The fatbin is built by build.rs from src/ddpm_kernels.cu (machine code for several GPU architectures plus
//! PTX for newer ones) and loaded with `cuModuleLoadData` into the context of the candle device the tensors
//! live on, on first use; the driver picks the image that fits the GPU. Kernels run on the device's
//! stream, ordered with candle's own work.

use crate::noising::{NoiseKey, NoisingOp, Prediction};
use crate::sampler::SamplerStepOp;
use candle_core::cuda_backend::cudarc::driver::{
    CudaModule, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, Layout, Shape, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels as a fatbin: machine code for [`FATBIN_SM`], PTX for [`FATBIN_PTX`].
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ddpm_kernels.fatbin"));
/// Architectures with machine code in [`FATBIN`], comma-separated (`sm_80,sm_86,sm_89,sm_90` by default).
pub const FATBIN_SM: &str = env!("DDPM_FATBIN_SM");
/// Architecture of the PTX in [`FATBIN`] (`compute_90` by default; empty if none).
pub const FATBIN_PTX: &str = env!("DDPM_FATBIN_PTX");

/// The images in [`FATBIN`].
pub fn fatbin_images() -> Vec<crate::arch::Image> {
    crate::arch::parse(FATBIN_SM, FATBIN_PTX)
}

/// Threads per CUDA block; each thread owns one 4-element Philox block of one example.
const THREADS: u32 = 256;

fn modules() -> &'static Mutex<HashMap<DeviceId, Arc<CudaModule>>> {
    static M: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaModule>>>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The kernels' module in `dev`'s context, loaded on first use.
pub fn module(dev: &CudaDevice) -> candle_core::Result<Arc<CudaModule>> {
    let mut map = modules().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = map.get(&dev.id()) {
        return Ok(m.clone());
    }
    let ctx = dev.cuda_stream().context().clone();
    let m = ctx
        .load_module(Ptx::from_binary(FATBIN.to_vec()))
        .map_err(|e| {
            let name = ctx.name().unwrap_or_else(|_| "?".into());
            let msg = match ctx.compute_capability() {
                Ok((major, minor)) => {
                    let (major, minor) = (major as u32, minor as u32);
                    let images = fatbin_images();
                    match crate::arch::select(&images, major, minor) {
                        None => crate::arch::no_image_message(&name, major, minor, &images),
                        Some(img) => format!(
                            "the GPU {name} (compute capability {major}.{minor}) should run the fatbin's \
                             {img} image, but the driver refused it (a driver older than CUDA 13.0?)"
                        ),
                    }
                }
                Err(c) => format!("the GPU {name} did not report its compute capability ({c})"),
            };
            candle_core::Error::Cuda(format!("ddpm-kernels: loading the kernels failed ({e}): {msg}").into())
        })?;
    map.insert(dev.id(), m.clone());
    Ok(m)
}

/// Grid for `batch` examples of `n` elements: x over 4-element blocks, y over examples (both stride-looped).
fn grid(batch: usize, n: usize) -> LaunchConfig {
    let nb = n.div_ceil(4) as u32;
    let gx = nb.div_ceil(THREADS).clamp(1, 1 << 20);
    let gy = (batch as u32).clamp(1, 65_535);
    LaunchConfig {
        grid_dim: (gx, gy, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dims_bn(l: &Layout) -> candle_core::Result<(usize, usize)> {
    if !l.is_contiguous() {
        candle_core::bail!("ddpm-kernels: CUDA input must be contiguous");
    }
    match l.shape().dims() {
        [] => candle_core::bail!("ddpm-kernels: input needs a batch dimension"),
        [b, rest @ ..] => Ok((*b, rest.iter().product())),
    }
}

// Outputs are allocated with at least one element: a zero-byte cuMemAllocAsync is an error, and an empty
// batch still needs a storage (its shape says 0 elements).

fn seed_words(seed: u64) -> (u32, u32) {
    (seed as u32, (seed >> 32) as u32)
}

pub(crate) fn noising_fwd(
    op: &NoisingOp,
    s: &CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let (b, n) = dims_bn(l)?;
    if op.coefs.len() != b {
        candle_core::bail!(
            "fused_noising: {} coefficients for a batch of {b}",
            op.coefs.len()
        );
    }
    let mut shape = vec![3];
    shape.extend_from_slice(l.shape().dims());
    // SAFETY: every element is written by the kernel below (each of the b * n elements of each plane
    // belongs to exactly one thread's Philox block).
    let mut out = unsafe { dev.alloc::<f32>((3 * b * n).max(1))? };
    if b * n > 0 {
        let x0 = s.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
        let coef: Vec<f32> = op.coefs.iter().flatten().copied().collect();
        let coef = dev.clone_htod(&coef)?;
        launch_noising(dev, &x0, &mut out, &coef, b, n, op.key, op.pred)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(shape),
    ))
}

/// The noising kernel on caller-owned buffers, without the op's allocation and coefficient upload (for
/// benchmarks): `x0` holds `batch * n` floats, `out` at least `3 * batch * n` (x_t | noise | target) and
/// `coef` `2 * batch` (sqrt_ac, sqrt_1m_ac per example).
#[allow(clippy::too_many_arguments)]
pub fn launch_noising(
    dev: &CudaDevice,
    x0: &CudaView<'_, f32>,
    out: &mut CudaSlice<f32>,
    coef: &CudaSlice<f32>,
    batch: usize,
    n: usize,
    key: NoiseKey,
    pred: Prediction,
) -> candle_core::Result<()> {
    if x0.len() < batch * n || out.len() < 3 * batch * n || coef.len() < 2 * batch || n >= 1 << 31 {
        candle_core::bail!("launch_noising: buffers too small for {batch} x {n}");
    }
    if batch * n == 0 {
        return Ok(());
    }
    let func = module(dev)?.load_function("ddpm_fused_noising_f32").w()?;
    let stream = dev.cuda_stream();
    let (seed_lo, seed_hi) = seed_words(key.seed);
    let (bu, nu) = (batch as u32, n as u32);
    let step = key.step as u32;
    let ex0 = key.first_example as u32;
    let pred = pred.code();
    let mut lb = stream.launch_builder(&func);
    lb.arg(x0)
        .arg(out)
        .arg(coef)
        .arg(&bu)
        .arg(&nu)
        .arg(&seed_lo)
        .arg(&seed_hi)
        .arg(&step)
        .arg(&ex0)
        .arg(&pred);
    // SAFETY: the argument list matches the kernel's signature in ddpm_kernels.cu and the buffers were
    // checked to be large enough above.
    unsafe { lb.launch(grid(batch, n)) }.w()?;
    Ok(())
}

pub(crate) fn sampler_step_fwd(
    op: &SamplerStepOp,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    noise: Option<(&CudaStorage, &Layout)>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &s1.device;
    let (b, n) = dims_bn(l1)?;
    if dims_bn(l2)? != (b, n)
        || noise
            .map(|(_, l)| dims_bn(l))
            .transpose()?
            .is_some_and(|d| d != (b, n))
    {
        candle_core::bail!("fused_sampler_step: shapes differ");
    }
    if op.coefs.len() != b {
        candle_core::bail!(
            "fused_sampler_step: {} coefficient sets for a batch of {b}",
            op.coefs.len()
        );
    }
    let mut shape = vec![2];
    shape.extend_from_slice(l1.shape().dims());
    // SAFETY: the kernel writes every element of both planes.
    let mut out = unsafe { dev.alloc::<f32>((2 * b * n).max(1))? };
    if b * n > 0 {
        let xt = s1.as_cuda_slice::<f32>()?.slice(l1.start_offset()..);
        let m = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
        let coef: Vec<f32> = op.coefs.iter().flatten().copied().collect();
        let coef = dev.clone_htod(&coef)?;
        let func = module(dev)?.load_function("ddpm_sampler_step_f32").w()?;
        let stream = dev.cuda_stream();
        let key = op.philox.unwrap_or(NoiseKey {
            seed: 0,
            step: 0,
            first_example: 0,
        });
        let (seed_lo, seed_hi) = seed_words(key.seed);
        let (bu, nu) = (b as u32, n as u32);
        let step = key.step as u32;
        let ex0 = key.first_example as u32;
        let mode = op.noise_mode(noise.is_some());
        let (clip, lo, hi) = match op.clip {
            Some((lo, hi)) => (1u32, lo, hi),
            None => (0u32, 0f32, 0f32),
        };
        let z = match noise {
            Some((s3, l3)) => Some(s3.as_cuda_slice::<f32>()?.slice(l3.start_offset()..)),
            None => None,
        };
        // The kernel never reads `zin` unless mode is NOISE_GIVEN; pass x_t's pointer as a placeholder.
        let zin = z.as_ref().unwrap_or(&xt);
        let mut lb = stream.launch_builder(&func);
        lb.arg(&xt)
            .arg(&m)
            .arg(zin)
            .arg(&mut out)
            .arg(&coef)
            .arg(&bu)
            .arg(&nu)
            .arg(&mode)
            .arg(&seed_lo)
            .arg(&seed_hi)
            .arg(&step)
            .arg(&ex0)
            .arg(&clip)
            .arg(&lo)
            .arg(&hi);
        // SAFETY: the argument list matches ddpm_sampler_step_f32; all buffers hold b * n floats
        // (2 * b * n for `out`), checked through the layouts above.
        unsafe { lb.launch(grid(b, n)) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(shape),
    ))
}

pub(crate) fn philox_normal(
    dev: &CudaDevice,
    shape: Shape,
    stream_tag: u32,
    key: NoiseKey,
) -> candle_core::Result<Tensor> {
    let dims = shape.dims();
    let b = dims[0];
    let n: usize = dims[1..].iter().product();
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<f32>((b * n).max(1))? };
    if b * n > 0 {
        let func = module(dev)?.load_function("ddpm_philox_normal_f32").w()?;
        let stream = dev.cuda_stream();
        let (seed_lo, seed_hi) = seed_words(key.seed);
        let (bu, nu) = (b as u32, n as u32);
        let step = key.step as u32;
        let ex0 = key.first_example as u32;
        let mut lb = stream.launch_builder(&func);
        lb.arg(&mut out)
            .arg(&bu)
            .arg(&nu)
            .arg(&seed_lo)
            .arg(&seed_hi)
            .arg(&stream_tag)
            .arg(&step)
            .arg(&ex0);
        // SAFETY: the argument list matches ddpm_philox_normal_f32; `out` holds b * n floats.
        unsafe { lb.launch(grid(b, n)) }.w()?;
    }
    let storage = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Ok(Tensor::from_storage(
        storage,
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}
