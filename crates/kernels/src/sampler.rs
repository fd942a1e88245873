//! The fused sampler update shared by DDPM ancestral steps and DDIM steps.
//!
//! Both are, per example, linear in three tensors once the model's x0 prediction is formed:
//!   x0_pred = clip(a_xt x_t + a_m m)                (m = model output: eps, v or x0)
//!   x_prev  = c_x0 x0_pred + c_xt x_t + sigma z
//! so one op with five per-example coefficients covers DDPM (posterior mean coefficients, sigma from the
//! fixed variance, 0 at t = 0) and DDIM with any eta (eps re-derived from the clipped x0 as improved-diffusion
//! does, folded into c_x0 and c_xt). Learned per-element variances fit too: pass `sigma = 1` and
//! `StepNoise::Given(exp(0.5 log_var) * z)`.

use crate::noising::{NoiseKey, Prediction};
use crate::util::{batch_dims, cpu_f32, for_each_chunk};
use crate::KernelError;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use ddpm_rng::{box_muller4, Stream};

const OP: &str = "fused_sampler_step";

/// Per-example coefficients of one sampler update (f32, as the tensors are).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoefs {
    /// x0_pred = a_xt * x_t + a_m * model_out (then clipped if asked).
    pub a_xt: f32,
    pub a_m: f32,
    /// x_prev = c_x0 * x0_pred + c_xt * x_t + sigma * z.
    pub c_x0: f32,
    pub c_xt: f32,
    pub sigma: f32,
}

impl StepCoefs {
    /// `(a_xt, a_m)` such that `x0 = a_xt x_t + a_m m` for a model predicting `pred` at `abar_t`.
    pub fn x0_from(pred: Prediction, alpha_bar: f64) -> (f64, f64) {
        match pred {
            // x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps
            Prediction::Epsilon => (1.0 / alpha_bar.sqrt(), -(1.0 / alpha_bar - 1.0).sqrt()),
            // x0 = sqrt(abar) x_t - sqrt(1 - abar) v
            Prediction::V => (alpha_bar.sqrt(), -(1.0 - alpha_bar).sqrt()),
            Prediction::StartX => (0.0, 1.0),
        }
    }

    /// A DDPM ancestral step from `abar_t` to `abar_prev` (= 1 at t = 0) with standard deviation `sigma`
    /// (sqrt of the fixed-small or fixed-large variance; the caller passes 0 at t = 0, where
    /// improved-diffusion adds no noise). Coefficients of the posterior mean q(x_{t-1} | x_t, x0), with
    /// beta_t = 1 - abar_t / abar_prev so that respaced schedules work unchanged.
    pub fn ddpm(pred: Prediction, alpha_bar: f64, alpha_bar_prev: f64, sigma: f64) -> Self {
        let (a_xt, a_m) = Self::x0_from(pred, alpha_bar);
        let alpha = alpha_bar / alpha_bar_prev;
        let beta = 1.0 - alpha;
        let c_x0 = beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar);
        let c_xt = (1.0 - alpha_bar_prev) * alpha.sqrt() / (1.0 - alpha_bar);
        Self::from_f64(a_xt, a_m, c_x0, c_xt, sigma)
    }

    /// A DDIM step from `abar_t` to `abar_prev` with stochasticity `eta` (0 = deterministic):
    /// sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev),
    /// x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z with
    /// eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) computed from the (clipped) x0.
    pub fn ddim(pred: Prediction, alpha_bar: f64, alpha_bar_prev: f64, eta: f64) -> Self {
        let (a_xt, a_m) = Self::x0_from(pred, alpha_bar);
        let sigma = eta
            * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)).sqrt()
            * (1.0 - alpha_bar / alpha_bar_prev).max(0.0).sqrt();
        let d = (1.0 - alpha_bar_prev - sigma * sigma).max(0.0).sqrt();
        let s1m = (1.0 - alpha_bar).sqrt();
        let c_x0 = alpha_bar_prev.sqrt() - d * alpha_bar.sqrt() / s1m;
        let c_xt = d / s1m;
        Self::from_f64(a_xt, a_m, c_x0, c_xt, sigma)
    }

    fn from_f64(a_xt: f64, a_m: f64, c_x0: f64, c_xt: f64, sigma: f64) -> Self {
        Self {
            a_xt: a_xt as f32,
            a_m: a_m as f32,
            c_x0: c_x0 as f32,
            c_xt: c_xt as f32,
            sigma: sigma as f32,
        }
    }

    pub(crate) fn to_array(self) -> [f32; 5] {
        [self.a_xt, self.a_m, self.c_x0, self.c_xt, self.sigma]
    }
}

/// Where `z` comes from.
#[derive(Debug, Clone, Copy)]
pub enum StepNoise<'a> {
    /// No noise term (DDIM with eta = 0, or the last DDPM step).
    None,
    /// `StreamKey::new(seed, Stream::Sampler, step, first_example + i).normal(e)`; the sampler chooses
    /// `step` (e.g. its iteration counter) so that every update draws fresh noise.
    Philox(NoiseKey),
    /// A tensor of the shape of `x_t`.
    Given(&'a Tensor),
}

/// `x_prev` and the `x0_pred` it was formed from (`[B, ...]` each, views of one allocation).
#[derive(Debug, Clone)]
pub struct StepOut {
    pub x_prev: Tensor,
    pub x0_pred: Tensor,
}

/// The custom op behind [`fused_sampler_step`]: CustomOp2 on (x_t, model_out) for no/Philox noise,
/// CustomOp3 on (x_t, model_out, z) for given noise. Output `[2, B, ...]` = (x_prev, x0_pred).
#[derive(Debug, Clone)]
pub struct SamplerStepOp {
    pub coefs: Vec<[f32; 5]>,
    pub clip: Option<(f32, f32)>,
    /// Used only when no noise tensor is given; `None` means no noise term.
    pub philox: Option<NoiseKey>,
}

// Noise mode codes shared with the CUDA kernel (DDPM_NOISE_* in ddpm_kernels.cu).
const NOISE_NONE: u32 = 0;
const NOISE_PHILOX: u32 = 1;
const NOISE_GIVEN: u32 = 2;

impl SamplerStepOp {
    /// One element, in the exact operation order of the CUDA kernel.
    #[inline(always)]
    fn elem(&self, c: &[f32; 5], x: f32, m: f32, z: Option<f32>) -> (f32, f32) {
        let mut x0 = c[0] * x + c[1] * m;
        if let Some((lo, hi)) = self.clip {
            // NaN stays NaN, as in the kernel (no fminf/fmaxf).
            x0 = if x0 < lo {
                lo
            } else if x0 > hi {
                hi
            } else {
                x0
            };
        }
        let mut y = c[2] * x0 + c[3] * x;
        if let Some(z) = z {
            y += c[4] * z;
        }
        (y, x0)
    }

    fn cpu(
        &self,
        xt: &[f32],
        m: &[f32],
        given: Option<&[f32]>,
        dims: &[usize],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some(&b) = dims.first() else {
            candle_core::bail!("{OP}: x_t needs a batch dimension")
        };
        let n = xt.len() / b.max(1);
        if m.len() != xt.len() || given.is_some_and(|z| z.len() != xt.len()) {
            candle_core::bail!("{OP}: inputs differ in size");
        }
        if self.coefs.len() != b {
            candle_core::bail!(
                "{OP}: {} coefficient sets for a batch of {b}",
                self.coefs.len()
            );
        }
        let mut out = vec![0f32; 2 * xt.len()];
        for_each_chunk::<2, _>(&mut out, b, n, |i, e0, [yp, x0p]| {
            let c = &self.coefs[i];
            let base = i * n + e0;
            let len = yp.len();
            let xs = &xt[base..base + len];
            let ms = &m[base..base + len];
            match (given, self.philox) {
                (Some(z), _) => {
                    let zs = &z[base..base + len];
                    for k in 0..len {
                        (yp[k], x0p[k]) = self.elem(c, xs[k], ms[k], Some(zs[k]));
                    }
                }
                (None, Some(key)) => {
                    // The noise goes into the x_prev plane first (the RNG is most of the work), then
                    // each element reads its z back and is overwritten with x_prev.
                    let sk = key.stream_key(Stream::Sampler, i);
                    for (blk, z4) in yp.chunks_mut(4).enumerate() {
                        let z = box_muller4(sk.block(((e0 / 4) + blk) as u32));
                        z4.copy_from_slice(&z[..z4.len()]);
                    }
                    for k in 0..len {
                        (yp[k], x0p[k]) = self.elem(c, xs[k], ms[k], Some(yp[k]));
                    }
                }
                (None, None) => {
                    for k in 0..len {
                        (yp[k], x0p[k]) = self.elem(c, xs[k], ms[k], None);
                    }
                }
            }
        });
        let mut shape = vec![2];
        shape.extend_from_slice(dims);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn noise_mode(&self, given: bool) -> u32 {
        if given {
            NOISE_GIVEN
        } else if self.philox.is_some() {
            NOISE_PHILOX
        } else {
            NOISE_NONE
        }
    }
}

impl CustomOp2 for SamplerStepOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xt = cpu_f32(OP, s1, l1)?;
        let m = cpu_f32(OP, s2, l2)?;
        self.cpu(xt, m, None, l1.shape().dims())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::sampler_step_fwd(self, (s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for SamplerStepOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xt = cpu_f32(OP, s1, l1)?;
        let m = cpu_f32(OP, s2, l2)?;
        let z = cpu_f32(OP, s3, l3)?;
        self.cpu(xt, m, Some(z), l1.shape().dims())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::sampler_step_fwd(self, (s1, l1), (s2, l2), Some((s3, l3)))
    }
}

fn check_same(what: &str, a: &Tensor, b: &Tensor) -> Result<(), KernelError> {
    if a.dims() != b.dims() {
        return Err(KernelError::bad(
            OP,
            format!("{what} has shape {:?}, x_t has {:?}", b.dims(), a.dims()),
        ));
    }
    if !a.device().same_device(b.device()) {
        return Err(KernelError::bad(
            OP,
            format!("{what} is on another device than x_t"),
        ));
    }
    Ok(())
}

/// One sampler update for a batch: `x_t` and `model_out` are `[B, ...]` f32 (for a learned-variance
/// model pass the first C channels of the output), `coefs` one set per example, `clip` e.g.
/// `Some((-1.0, 1.0))` to clip x0_pred.
pub fn fused_sampler_step(
    x_t: &Tensor,
    model_out: &Tensor,
    coefs: &[StepCoefs],
    clip: Option<(f32, f32)>,
    noise: StepNoise<'_>,
) -> Result<StepOut, KernelError> {
    let (b, _) = batch_dims(OP, "x_t", x_t)?;
    batch_dims(OP, "model_out", model_out)?;
    check_same("model_out", x_t, model_out)?;
    if coefs.len() != b {
        return Err(KernelError::bad(
            OP,
            format!("{} coefficient sets for a batch of {b}", coefs.len()),
        ));
    }
    if let Some((lo, hi)) = clip {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(KernelError::bad(OP, format!("bad clip range ({lo}, {hi})")));
        }
    }
    let mut op = SamplerStepOp {
        coefs: coefs.iter().map(|c| c.to_array()).collect(),
        clip,
        philox: None,
    };
    let xt = x_t.contiguous()?;
    let m = model_out.contiguous()?;
    let all = match noise {
        StepNoise::None => xt.apply_op2_no_bwd(&m, &op)?,
        StepNoise::Philox(key) => {
            op.philox = Some(key);
            xt.apply_op2_no_bwd(&m, &op)?
        }
        StepNoise::Given(z) => {
            batch_dims(OP, "noise", z)?;
            check_same("noise", x_t, z)?;
            xt.apply_op3_no_bwd(&m, &z.contiguous()?, &op)?
        }
    };
    Ok(StepOut {
        x_prev: all.get(0)?,
        x0_pred: all.get(1)?,
    })
}

/// The same update as separate candle ops (noise for `Philox` drawn on the host): the reference for
/// tests and benchmarks.
pub fn unfused_sampler_step(
    x_t: &Tensor,
    model_out: &Tensor,
    coefs: &[StepCoefs],
    clip: Option<(f32, f32)>,
    noise: StepNoise<'_>,
) -> Result<StepOut, KernelError> {
    let (b, n) = batch_dims(OP, "x_t", x_t)?;
    check_same("model_out", x_t, model_out)?;
    if coefs.len() != b {
        return Err(KernelError::bad(
            OP,
            format!("{} coefficient sets for a batch of {b}", coefs.len()),
        ));
    }
    let dev = x_t.device();
    let mut bshape = vec![1usize; x_t.rank()];
    bshape[0] = b;
    let col = |f: fn(&StepCoefs) -> f32| -> Result<Tensor, KernelError> {
        Ok(Tensor::from_iter(coefs.iter().map(f), dev)?.reshape(bshape.as_slice())?)
    };
    let mut x0 =
        (x_t.broadcast_mul(&col(|c| c.a_xt)?)? + model_out.broadcast_mul(&col(|c| c.a_m)?)?)?;
    if let Some((lo, hi)) = clip {
        x0 = x0.clamp(lo, hi)?;
    }
    let mut y = (x0.broadcast_mul(&col(|c| c.c_x0)?)? + x_t.broadcast_mul(&col(|c| c.c_xt)?)?)?;
    let z = match noise {
        StepNoise::None => None,
        StepNoise::Given(z) => Some(z.clone()),
        StepNoise::Philox(key) => {
            let mut v = vec![0f32; b * n];
            if n > 0 {
                for (i, ex) in v.chunks_mut(n).enumerate() {
                    key.stream_key(Stream::Sampler, i).fill_normal(ex);
                }
            }
            Some(Tensor::from_vec(v, x_t.shape(), dev)?)
        }
    };
    if let Some(z) = z {
        y = (y + z.broadcast_mul(&col(|c| c.sigma)?)?)?;
    }
    Ok(StepOut {
        x_prev: y,
        x0_pred: x0,
    })
}
