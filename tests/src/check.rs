//! Value comparison and the running tally of a conformance run.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::refjson::{Arr, J};

/// The README's f64 tolerance (mixed absolute/relative).
pub const TOL_F64: f64 = 1e-10;
/// The README's general f32 tolerance.
pub const TOL_F32: f64 = 1e-4;
/// The README's f32 tolerance for unclipped x0 predictions at large t and multi-step trajectories.
pub const TOL_F32_LOOSE: f64 = 1e-3;

/// How a value is compared: `|got - exp| <= tol * max(1, |exp|)` (mixed) or `<= tol` (absolute).
#[derive(Debug, Clone, Copy)]
pub enum Tol {
    Mixed(f64),
    Abs(f64),
}

impl Tol {
    fn err(self, got: f64, exp: f64) -> f64 {
        let d = (got - exp).abs();
        match self {
            Tol::Mixed(_) => d / exp.abs().max(1.0),
            Tol::Abs(_) => d,
        }
    }

    fn bound(self) -> f64 {
        match self {
            Tol::Mixed(t) | Tol::Abs(t) => t,
        }
    }
}

/// Counts for one file.
#[derive(Debug, Default, Clone)]
pub struct FileTally {
    pub cases: usize,
    pub values: usize,
    pub values_f32: usize,
    pub failed: usize,
    /// Largest observed error relative to its tolerance's scale, for the f64 and f32 paths.
    pub max_err_f64: f64,
    pub max_err_f32: f64,
    pub failures: Vec<String>,
    /// Informational remarks for the summary.
    pub notes: Vec<String>,
    /// Largest error of every comparison, for `DDPM_CONFORMANCE_VERBOSE=1`.
    pub per_check: Vec<(String, f64, usize)>,
}

/// Which precision a comparison belongs to (only used for the per-file summary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    F64,
    F32,
}

impl FileTally {
    pub fn fail(&mut self, msg: String) {
        self.failed += 1;
        self.failures.push(msg);
    }

    /// Compares `got` against `exp` element by element; every element counts as one checked value.
    pub fn cmp(
        &mut self,
        what: &str,
        path: Path,
        got: &[f64],
        exp: &[f64],
        tol: impl Fn(usize) -> Tol,
    ) {
        if got.len() != exp.len() {
            self.fail(format!(
                "{what}: got {} values, expected {}",
                got.len(),
                exp.len()
            ));
            return;
        }
        let mut bad = 0usize;
        let mut first = None;
        let mut worst = 0.0f64;
        for (i, (&g, &e)) in got.iter().zip(exp).enumerate() {
            let t = tol(i);
            let err = t.err(g, e);
            worst = worst.max(err);
            match path {
                Path::F64 => self.max_err_f64 = self.max_err_f64.max(err),
                Path::F32 => self.max_err_f32 = self.max_err_f32.max(err),
            }
            // A NaN result fails.
            if err.is_nan() || err > t.bound() {
                bad += 1;
                if first.is_none() {
                    first = Some((i, g, e, err, t));
                }
            }
        }
        match path {
            Path::F64 => self.values += got.len(),
            Path::F32 => self.values_f32 += got.len(),
        }
        self.per_check
            .push((format!("{what} [{path:?}]"), worst, got.len()));
        if let Some((i, g, e, err, t)) = first {
            self.failed += bad;
            self.failures.push(format!(
                "{what} [{path:?}]: {bad} of {} values out of tolerance; first at flat index {i}: \
                 got {g:e}, expected {e:e}, error {err:e} > {t:?}",
                got.len()
            ));
        }
    }

    /// Compares a tensor (any float dtype, any shape broadcast-free) with an expected array.
    pub fn cmp_tensor(
        &mut self,
        what: &str,
        path: Path,
        got: &Tensor,
        exp: &Arr,
        tol: Tol,
    ) -> Result<()> {
        let g = to_host(got)?;
        let got_n: usize = got.dims().iter().product();
        let exp_n: usize = exp.shape.iter().product();
        // [B,1,1,1] per-sample tensors are compared with [B] arrays: allow dropping unit axes only.
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if got_n != exp_n || squeeze(got.dims()) != squeeze(&exp.shape) {
            bail!(
                "{what}: tensor shape {:?} does not match expected {:?}",
                got.dims(),
                exp.shape
            );
        }
        self.cmp(what, path, &g, &exp.data, |_| tol);
        Ok(())
    }

    /// Compares host values with an expected array of the same length.
    pub fn cmp_vec(&mut self, what: &str, path: Path, got: &[f64], exp: &Arr, tol: Tol) {
        self.cmp(what, path, got, &exp.data, |_| tol);
    }

    /// [`Self::cmp_vec`] against the array `key` of `j`, reported as `what.key`.
    pub fn vec_at(
        &mut self,
        what: &str,
        j: &J,
        key: &str,
        path: Path,
        got: &[f64],
        tol: Tol,
    ) -> Result<()> {
        let exp = j.get(key)?.arr()?;
        self.cmp_vec(&format!("{what}.{key}"), path, got, &exp, tol);
        Ok(())
    }

    /// [`Self::cmp_tensor`] against the array `key` of `j`, reported as `what.key`.
    pub fn tensor_at(
        &mut self,
        what: &str,
        j: &J,
        key: &str,
        path: Path,
        got: &Tensor,
        tol: Tol,
    ) -> Result<()> {
        self.cmp_tensor(
            &format!("{what}.{key}"),
            path,
            got,
            &j.get(key)?.arr()?,
            tol,
        )
    }

    pub fn cmp_scalar(&mut self, what: &str, path: Path, got: f64, exp: f64, tol: Tol) {
        self.cmp(what, path, &[got], &[exp], |_| tol);
    }

    /// A non-numeric value (string, flag, integer setting) that must equal what this implementation does.
    pub fn expect_eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, exp: T) {
        self.values += 1;
        if got != exp {
            self.fail(format!(
                "{what}: this implementation uses {got:?}, the file says {exp:?}"
            ));
        }
    }
}

/// A tensor's values as f64 on the host, row-major.
pub fn to_host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// An expected/input array as a tensor of the given dtype on the CPU.
pub fn tensor(a: &Arr, dtype: DType) -> Result<Tensor> {
    Ok(Tensor::from_vec(a.data.clone(), a.shape.clone(), &Device::Cpu)?.to_dtype(dtype)?)
}

/// The README's tolerances for a precision: (general, loose).
pub fn tols(dtype: DType) -> (Tol, Tol, Path) {
    match dtype {
        DType::F64 => (Tol::Mixed(TOL_F64), Tol::Mixed(TOL_F64), Path::F64),
        _ => (Tol::Mixed(TOL_F32), Tol::Mixed(TOL_F32_LOOSE), Path::F32),
    }
}
