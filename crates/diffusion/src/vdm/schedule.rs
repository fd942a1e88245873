//! Noise schedules in continuous time: `gamma(t) = -log SNR(t)` on `[0, 1]`, fixed or learned.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{DiffusionError, Result};
use crate::tensor::host_tensor;

/// VDM's default endpoints: `gamma(0) = -13.3` (SNR about 6e5, finer than 8-bit quantisation) and
/// `gamma(1) = 5` (SNR about 7e-3, so the prior term is small).
pub const DEFAULT_GAMMA_MIN: f64 = -13.3;
pub const DEFAULT_GAMMA_MAX: f64 = 5.0;

/// A fixed schedule with `gamma(0) = gamma_min` and `gamma(1) = gamma_max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FixedGamma {
    /// `gamma(t) = gamma_min + (gamma_max - gamma_min) t`: linear in log-SNR (VDM's fixed baseline).
    LinearLogSnr { gamma_min: f64, gamma_max: f64 },
    /// The cosine schedule in continuous time, `alpha_t = cos(u)`, `sigma_t = sin(u)`, with
    /// `u = a + (b - a) t` truncated so the endpoints are those of the linear one:
    /// `gamma(t) = 2 ln tan(u)`, `a = atan(exp(gamma_min / 2))`, `b = atan(exp(gamma_max / 2))`.
    /// Without truncation (a = 0, b = pi/2) SNR would be infinite at 0 and zero at 1.
    Cosine { gamma_min: f64, gamma_max: f64 },
}

impl FixedGamma {
    fn ends(&self) -> (f64, f64) {
        match *self {
            FixedGamma::LinearLogSnr {
                gamma_min,
                gamma_max,
            }
            | FixedGamma::Cosine {
                gamma_min,
                gamma_max,
            } => (gamma_min, gamma_max),
        }
    }

    /// Errors unless the endpoints are finite and `gamma_min < gamma_max` (gamma must increase).
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = self.ends();
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(DiffusionError::InvalidSchedule(format!(
                "continuous schedule needs finite gamma_min < gamma_max, got {lo} and {hi}"
            )));
        }
        Ok(())
    }

    fn cosine_range(lo: f64, hi: f64) -> (f64, f64) {
        ((0.5 * lo).exp().atan(), (0.5 * hi).exp().atan())
    }

    /// `gamma(t)`.
    pub fn gamma(&self, t: f64) -> f64 {
        let (lo, hi) = self.ends();
        match self {
            FixedGamma::LinearLogSnr { .. } => lo + (hi - lo) * t,
            FixedGamma::Cosine { .. } => {
                let (a, b) = Self::cosine_range(lo, hi);
                2.0 * (a + (b - a) * t).tan().ln()
            }
        }
    }

    /// `d gamma / dt`, analytic.
    pub fn dgamma(&self, t: f64) -> f64 {
        let (lo, hi) = self.ends();
        match self {
            FixedGamma::LinearLogSnr { .. } => hi - lo,
            FixedGamma::Cosine { .. } => {
                // d/du 2 ln tan u = 2 / (sin u cos u) = 4 / sin 2u
                let (a, b) = Self::cosine_range(lo, hi);
                4.0 * (b - a) / (2.0 * (a + (b - a) * t)).sin()
            }
        }
    }

    /// [`GammaEval`] of the batch times `t` (constants: no gradient), in `dtype` on `device`.
    pub fn eval(&self, t: &[f64], dtype: DType, device: &Device) -> Result<GammaEval> {
        let b = t.len();
        let g: Vec<f64> = t.iter().map(|&x| self.gamma(x)).collect();
        let dg: Vec<f64> = t.iter().map(|&x| self.dgamma(x)).collect();
        Ok(GammaEval {
            gamma: host_tensor(&g, vec![b], dtype, device)?,
            dgamma: host_tensor(&dg, vec![b], dtype, device)?,
            gamma_0: host_tensor(&[self.gamma(0.0)], vec![1], dtype, device)?,
            gamma_1: host_tensor(&[self.gamma(1.0)], vec![1], dtype, device)?,
        })
    }
}

/// A schedule evaluated at a batch of times: `gamma(t_b)` and `gamma'(t_b)` (`[B]`), and the
/// endpoints `gamma(0)`, `gamma(1)` (`[1]`) that the reconstruction and prior terms use. For the
/// learned schedule every tensor is a function of its parameters (gradients flow).
#[derive(Debug, Clone)]
pub struct GammaEval {
    pub gamma: Tensor,
    pub dgamma: Tensor,
    pub gamma_0: Tensor,
    pub gamma_1: Tensor,
}

/// Host values of the learned schedule's parameters (initial values, checkpoints, f64 evaluation).
///
/// The network is VDM's three monotone layers on a scalar `t`,
/// `g(t) = |w1| t + (1/H) sum_k |w3_k| tanh((|w2_k| (2t - 1) + b2_k) / 2)`, where
/// `tanh(x/2) = 2 sigmoid(x) - 1` is VDM's centred sigmoid; absolute values keep every weight
/// positive, so `g` is increasing. It is then normalised to the learnable endpoints:
/// `gamma(t) = gamma_0 + (gamma_1 - gamma_0) (g(t) - g(0)) / (g(1) - g(0))`. The normalisation
/// cancels any bias of the first layer, so that layer has none (it would never get a gradient).
#[derive(Debug, Clone, PartialEq)]
pub struct MonotoneGammaInit {
    pub w1: f64,
    pub w2: Vec<f64>,
    pub b2: Vec<f64>,
    pub w3: Vec<f64>,
    pub gamma_0: f64,
    pub gamma_1: f64,
}

/// Checkpoint names of the learned schedule's parameters, in the order of [`MonotoneGamma::vars`].
pub const PARAM_NAMES: [&str; 6] = [
    "noise_schedule.gamma_0",
    "noise_schedule.gamma_1",
    "noise_schedule.l1.weight",
    "noise_schedule.l2.bias",
    "noise_schedule.l2.weight",
    "noise_schedule.l3.weight",
];

/// The endpoint parameters (trained on the ELBO); the others shape the curve (trained on variance).
pub fn is_endpoint_param(name: &str) -> bool {
    name == PARAM_NAMES[0] || name == PARAM_NAMES[1]
}

impl MonotoneGammaInit {
    /// VDM's starting point: a nearly linear-in-log-SNR schedule from `gamma_min` to `gamma_max`
    /// (`w1 = 1`), with `H` hidden units whose weights are `scale * normals[..]` (VDM draws them from
    /// N(0, 0.01^2)). `normals` must hold `3 H` standard normal values (the caller owns the RNG).
    pub fn vdm(hidden: usize, gamma_min: f64, gamma_max: f64, normals: &[f64], scale: f64) -> Self {
        let h = hidden;
        let take = |k: usize| {
            normals[k * h..(k + 1) * h]
                .iter()
                .map(|z| z * scale)
                .collect()
        };
        Self {
            w1: 1.0,
            w2: take(0),
            b2: take(1),
            w3: take(2),
            gamma_0: gamma_min,
            gamma_1: gamma_max,
        }
    }

    fn hidden(&self) -> usize {
        self.w2.len()
    }

    /// Checks the sizes agree and the values can define an increasing schedule.
    pub fn validate(&self) -> Result<()> {
        let h = self.hidden();
        if h == 0 || self.b2.len() != h || self.w3.len() != h {
            return Err(DiffusionError::InvalidSchedule(format!(
                "learned schedule: w2, b2, w3 must have the same nonzero length, got {}, {}, {}",
                h,
                self.b2.len(),
                self.w3.len()
            )));
        }
        let all = [self.w1, self.gamma_0, self.gamma_1];
        let finite = all.iter().chain(&self.w2).chain(&self.b2).chain(&self.w3);
        if !finite.into_iter().all(|v| v.is_finite()) {
            return Err(DiffusionError::InvalidSchedule(
                "learned schedule has a non-finite parameter".into(),
            ));
        }
        if self.gamma_0 >= self.gamma_1 {
            return Err(DiffusionError::InvalidSchedule(format!(
                "learned schedule needs gamma_0 < gamma_1, got {} and {}",
                self.gamma_0, self.gamma_1
            )));
        }
        Ok(())
    }

    /// The unnormalised network `g(t)` and its derivative `g'(t)`, in f64.
    pub fn raw(&self, t: f64) -> (f64, f64) {
        let hf = self.hidden() as f64;
        let (mut g, mut dg) = (self.w1.abs() * t, self.w1.abs());
        for k in 0..self.hidden() {
            let (w2, w3) = (self.w2[k].abs(), self.w3[k].abs());
            let th = (0.5 * (w2 * (2.0 * t - 1.0) + self.b2[k])).tanh();
            g += w3 * th / hf;
            dg += w3 * (1.0 - th * th) * w2 / hf;
        }
        (g, dg)
    }

    /// `gamma(t)` and `gamma'(t)` in f64 (plots, samplers, evaluation, reference checks).
    pub fn gamma_dgamma(&self, t: f64) -> (f64, f64) {
        let (g0, g1) = (self.raw(0.0).0, self.raw(1.0).0);
        let (g, dg) = self.raw(t);
        let span = self.gamma_1 - self.gamma_0;
        (
            self.gamma_0 + span * (g - g0) / (g1 - g0),
            span * dg / (g1 - g0),
        )
    }

    /// The parameters as named tensors (checkpoint layout, f32 or f64).
    pub fn to_named(&self, dtype: DType, device: &Device) -> Result<Vec<(String, Tensor)>> {
        let h = self.hidden();
        let vals: [(&[f64], usize); 6] = [
            (&[self.gamma_0], 1),
            (&[self.gamma_1], 1),
            (&[self.w1], 1),
            (&self.b2, h),
            (&self.w2, h),
            (&self.w3, h),
        ];
        PARAM_NAMES
            .iter()
            .zip(vals)
            .map(|(n, (v, len))| Ok((n.to_string(), host_tensor(v, vec![len], dtype, device)?)))
            .collect()
    }

    /// Reads the parameters back from named tensors (any float dtype); `lookup` returns a tensor
    /// by its checkpoint name.
    pub fn from_named(lookup: impl Fn(&str) -> Option<Tensor>) -> Result<Self> {
        let get = |i: usize| -> Result<Vec<f64>> {
            let t = lookup(PARAM_NAMES[i]).ok_or_else(|| {
                DiffusionError::InvalidUse(format!(
                    "learned schedule parameter {} is missing",
                    PARAM_NAMES[i]
                ))
            })?;
            Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
        };
        let scalar = |i: usize| -> Result<f64> {
            let v = get(i)?;
            match v.as_slice() {
                [x] => Ok(*x),
                _ => Err(DiffusionError::Shape(format!(
                    "{} must hold one value, has {}",
                    PARAM_NAMES[i],
                    v.len()
                ))),
            }
        };
        let p = Self {
            gamma_0: scalar(0)?,
            gamma_1: scalar(1)?,
            w1: scalar(2)?,
            b2: get(3)?,
            w2: get(4)?,
            w3: get(5)?,
        };
        p.validate()?;
        Ok(p)
    }
}

/// The learned schedule as trainable candle variables (VDM's `NoiseSchedule_NNet`, normalised to
/// learnable endpoints; see [`MonotoneGammaInit`] for the formula).
#[derive(Debug, Clone)]
pub struct MonotoneGamma {
    vars: Vec<Var>,
}

impl MonotoneGamma {
    pub fn new(init: &MonotoneGammaInit, dtype: DType, device: &Device) -> Result<Self> {
        init.validate()?;
        let vars = init
            .to_named(dtype, device)?
            .into_iter()
            .map(|(_, t)| Var::from_tensor(&t))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars })
    }

    /// `(name, variable)` pairs, names from [`PARAM_NAMES`].
    pub fn vars(&self) -> Vec<(String, Var)> {
        PARAM_NAMES
            .iter()
            .map(|n| n.to_string())
            .zip(self.vars.iter().cloned())
            .collect()
    }

    /// The current parameter values on the host.
    pub fn params(&self) -> Result<MonotoneGammaInit> {
        let named: Vec<(String, Tensor)> = self
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        MonotoneGammaInit::from_named(|n| {
            named.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone())
        })
    }

    fn v(&self, i: usize) -> &Tensor {
        self.vars[i].as_tensor()
    }

    /// `gamma`, `gamma'` at the `[B]` times `t` (same dtype and device as the parameters) and the
    /// endpoints, differentiable in every parameter.
    pub fn eval(&self, t: &Tensor) -> Result<GammaEval> {
        let b = t.dim(0)?;
        let ends = Tensor::new(&[0.0f64, 1.0], t.device())?.to_dtype(t.dtype())?;
        let tt = Tensor::cat(&[t, &ends], 0)?.unsqueeze(1)?; // [B+2, 1]
        let h = self.v(4).dim(0)? as f64;
        let w1 = self.v(2).abs()?; // [1]
        let w2 = self.v(4).abs()?.unsqueeze(0)?; // [1, H]
        let b2 = self.v(3).unsqueeze(0)?;
        let w3 = self.v(5).abs()?.unsqueeze(1)?; // [H, 1]
        let pre = tt
            .affine(2.0, -1.0)?
            .broadcast_mul(&w2)?
            .broadcast_add(&b2)?;
        let th = pre.affine(0.5, 0.0)?.tanh()?; // [B+2, H]
        let nonlin = th.matmul(&w3)?.squeeze(1)?.affine(1.0 / h, 0.0)?;
        let raw = tt.squeeze(1)?.broadcast_mul(&w1)?.add(&nonlin)?; // [B+2]
        let slope = th.sqr()?.affine(-1.0, 1.0)?.broadcast_mul(&w2)?;
        let dnonlin = slope.matmul(&w3)?.squeeze(1)?.affine(1.0 / h, 0.0)?;
        let draw = dnonlin.narrow(0, 0, b)?.broadcast_add(&w1)?;
        let (r0, r1) = (raw.narrow(0, b, 1)?, raw.narrow(0, b + 1, 1)?);
        let (g0, g1) = (self.v(0), self.v(1));
        let scale = g1.sub(g0)?.div(&r1.sub(&r0)?)?; // [1]
        let gamma = raw
            .narrow(0, 0, b)?
            .broadcast_sub(&r0)?
            .broadcast_mul(&scale)?
            .broadcast_add(g0)?;
        let dgamma = draw.broadcast_mul(&scale)?;
        Ok(GammaEval {
            gamma,
            dgamma,
            gamma_0: g0.clone(),
            gamma_1: g1.clone(),
        })
    }
}
