//! The fused forward-process op of a training step.

use crate::util::{batch_dims, cpu_f32, for_each_chunk};
use crate::KernelError;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use ddpm_rng::{box_muller4, Stream, StreamKey};

const OP: &str = "fused_noising";

/// What the model is trained to predict (improved-diffusion's `ModelMeanType`, plus v).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prediction {
    /// The noise: target = eps.
    Epsilon,
    /// v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho, 2022).
    V,
    /// The clean image: target = x0.
    StartX,
}

impl Prediction {
    /// The code the CUDA kernel uses.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn code(self) -> u32 {
        match self {
            Prediction::Epsilon => 0,
            Prediction::V => 1,
            Prediction::StartX => 2,
        }
    }
}

/// Where the noise of a batch comes from: element `e` of local example `i` is
/// `StreamKey::new(seed, Stream::Noise, step, first_example + i).normal(e)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NoiseKey {
    pub seed: u64,
    /// The training step (resume-exact: the same step draws the same noise).
    pub step: u64,
    /// Position of local example 0 in the global batch (`rank * per_rank_batch`).
    pub first_example: u64,
}

impl NoiseKey {
    pub(crate) fn stream_key(&self, stream: Stream, i: usize) -> StreamKey {
        StreamKey::new(
            self.seed,
            stream,
            self.step,
            self.first_example.wrapping_add(i as u64),
        )
    }
}

/// The three outputs of the forward process, each `[B, C, H, W]` f32 on the input's device.
#[derive(Debug, Clone)]
pub struct Noised {
    pub x_t: Tensor,
    pub noise: Tensor,
    pub target: Tensor,
}

/// Per-example `(sqrt(abar_t), sqrt(1 - abar_t))` gathered from the schedule tables, checked.
pub fn noise_coefficients(
    t: &[u32],
    sqrt_ac: &[f32],
    sqrt_1m_ac: &[f32],
) -> Result<Vec<[f32; 2]>, KernelError> {
    if sqrt_ac.len() != sqrt_1m_ac.len() {
        return Err(KernelError::bad(
            OP,
            format!(
                "schedule tables differ in length: sqrt_ac has {}, sqrt_1m_ac has {}",
                sqrt_ac.len(),
                sqrt_1m_ac.len()
            ),
        ));
    }
    t.iter()
        .enumerate()
        .map(|(i, &ti)| {
            let k = ti as usize;
            if k >= sqrt_ac.len() {
                return Err(KernelError::bad(
                    OP,
                    format!(
                        "t[{i}] = {ti} is outside the schedule (T = {})",
                        sqrt_ac.len()
                    ),
                ));
            }
            Ok([sqrt_ac[k], sqrt_1m_ac[k]])
        })
        .collect()
}

/// The custom op behind [`fused_noising`]. Output: `[3, B, ...]` = (x_t, noise, target) stacked, which
/// [`fused_noising`] narrows into three views of one allocation.
#[derive(Debug, Clone)]
pub struct NoisingOp {
    /// `(sqrt(abar_t_i), sqrt(1 - abar_t_i))` per local example.
    pub coefs: Vec<[f32; 2]>,
    pub key: NoiseKey,
    pub pred: Prediction,
}

impl NoisingOp {
    /// One chunk of example `i` starting at element `e0` (a multiple of 4): the noise first (the RNG is
    /// most of the work), then x_t and the target in plain loops the compiler vectorizes. Per element
    /// the arithmetic is the CUDA kernel's: `a*x + b*z` and `a*z - b*x` as two rounded products and a
    /// rounded sum or difference.
    fn chunk(
        &self,
        i: usize,
        e0: usize,
        xs: &[f32],
        xt: &mut [f32],
        nz: &mut [f32],
        tg: &mut [f32],
    ) {
        let key = self.key.stream_key(Stream::Noise, i);
        for (k, nz4) in nz.chunks_mut(4).enumerate() {
            let z = box_muller4(key.block(((e0 / 4) + k) as u32));
            nz4.copy_from_slice(&z[..nz4.len()]);
        }
        let [a, b] = self.coefs[i];
        for ((o, &x), &z) in xt.iter_mut().zip(xs).zip(nz.iter()) {
            *o = a * x + b * z;
        }
        match self.pred {
            Prediction::Epsilon => tg.copy_from_slice(nz),
            Prediction::V => {
                for ((o, &x), &z) in tg.iter_mut().zip(xs).zip(nz.iter()) {
                    *o = a * z - b * x;
                }
            }
            Prediction::StartX => tg.copy_from_slice(xs),
        }
    }
}

impl CustomOp1 for NoisingOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(OP, s, l)?;
        let dims = l.shape().dims();
        let Some(&b) = dims.first() else {
            candle_core::bail!("{OP}: x0 needs a batch dimension")
        };
        let n = x.len() / b.max(1);
        if self.coefs.len() != b {
            candle_core::bail!("{OP}: {} coefficients for a batch of {b}", self.coefs.len());
        }
        let mut out = vec![0f32; 3 * x.len()];
        for_each_chunk::<3, _>(&mut out, b, n, |i, e0, [xt, nz, tg]| {
            let start = i * n + e0;
            self.chunk(i, e0, &x[start..start + xt.len()], xt, nz, tg);
        });
        let mut shape = vec![3];
        shape.extend_from_slice(dims);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::noising_fwd(self, s, l)
    }
}

/// One training step's forward process in one pass: for local example `i` with timestep `t[i]`,
/// `x_t = sqrt_ac[t] x0 + sqrt_1m_ac[t] eps`, the noise `eps` (drawn as documented at the crate root) and the
/// target of `pred`. `x0` is `[B, ...]` f32 on any device; the tables are the schedule's
/// `sqrt_alphas_cumprod` and `sqrt_one_minus_alphas_cumprod` as f32.
pub fn fused_noising(
    x0: &Tensor,
    t: &[u32],
    sqrt_ac: &[f32],
    sqrt_1m_ac: &[f32],
    key: NoiseKey,
    pred: Prediction,
) -> Result<Noised, KernelError> {
    let (b, _) = batch_dims(OP, "x0", x0)?;
    if t.len() != b {
        return Err(KernelError::bad(
            OP,
            format!("{} timesteps for a batch of {b}", t.len()),
        ));
    }
    let op = NoisingOp {
        coefs: noise_coefficients(t, sqrt_ac, sqrt_1m_ac)?,
        key,
        pred,
    };
    let all = x0.contiguous()?.apply_op1_no_bwd(&op)?;
    Ok(Noised {
        x_t: all.get(0)?,
        noise: all.get(1)?,
        target: all.get(2)?,
    })
}

/// The same computation as separate candle ops, the way it is written without this crate: noise drawn on
/// the host with `StreamKey::fill_normal` and uploaded, then broadcast multiplies and adds. The reference
/// for tests and benchmarks.
pub fn unfused_noising(
    x0: &Tensor,
    t: &[u32],
    sqrt_ac: &[f32],
    sqrt_1m_ac: &[f32],
    key: NoiseKey,
    pred: Prediction,
) -> Result<Noised, KernelError> {
    let (b, n) = batch_dims(OP, "x0", x0)?;
    if t.len() != b {
        return Err(KernelError::bad(
            OP,
            format!("{} timesteps for a batch of {b}", t.len()),
        ));
    }
    let coefs = noise_coefficients(t, sqrt_ac, sqrt_1m_ac)?;
    let mut noise = vec![0f32; b * n];
    if n > 0 {
        for (i, ex) in noise.chunks_mut(n).enumerate() {
            key.stream_key(Stream::Noise, i).fill_normal(ex);
        }
    }
    let dev = x0.device();
    let mut bshape = vec![1usize; x0.rank()];
    bshape[0] = b;
    let a = Tensor::from_iter(coefs.iter().map(|c| c[0]), dev)?.reshape(bshape.as_slice())?;
    let s = Tensor::from_iter(coefs.iter().map(|c| c[1]), dev)?.reshape(bshape.as_slice())?;
    let noise = Tensor::from_vec(noise, x0.shape(), dev)?;
    let x_t = (x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?;
    let target = match pred {
        Prediction::Epsilon => noise.clone(),
        Prediction::V => (noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?,
        Prediction::StartX => x0.clone(),
    };
    Ok(Noised { x_t, noise, target })
}
