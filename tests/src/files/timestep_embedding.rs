//! `timestep_embedding.json`: f64 path at 1e-12 against `embedding`; the f32 path against the f32 torch
//! reference at 1e-6 absolute.

use anyhow::Result;
use candle_core::DType;
use ddpm_diffusion::{timestep_embedding, timestep_embedding_f64};

use crate::check::{tensor, FileTally, Path, Tol};
use crate::refjson::J;

pub const TOL_EMBEDDING_F64: f64 = 1e-12;
pub const TOL_EMBEDDING_F32: f64 = 1e-6;

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    let name = c.get("name")?.str()?;
    let inp = c.get("inputs")?;
    let ts = inp.get("timesteps")?.arr()?;
    let dim = inp.get("dim")?.usize()?;
    let max_period = inp.get("max_period")?.f64()?;
    let e = c.get("expected")?;
    let want = e.get("embedding")?.arr()?;
    let want32 = e.get("embedding_float32_reference")?.arr()?;

    let got = timestep_embedding(&tensor(&ts, DType::F64)?, dim, max_period)?;
    tally.cmp_tensor(&format!("{name}.expected.embedding (tensor f64)"), Path::F64, &got, &want, Tol::Mixed(TOL_EMBEDDING_F64))?;
    let host = timestep_embedding_f64(&ts.data, dim, max_period);
    tally.cmp_vec(&format!("{name}.expected.embedding (host f64)"), Path::F64, &host, &want, Tol::Mixed(TOL_EMBEDDING_F64));
    let got = timestep_embedding(&tensor(&ts, DType::F32)?, dim, max_period)?;
    tally.cmp_tensor(&format!("{name}.expected.embedding_float32_reference (tensor f32)"), Path::F32, &got, &want32, Tol::Abs(TOL_EMBEDDING_F32))?;
    Ok(())
}
