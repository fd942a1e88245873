//! `vdm.json`: continuous-time schedules (fixed and learned), the three ELBO terms, the T-step
//! diffusion term, the continuous-time sampler steps and low-discrepancy times.
//!
//! Host (f64 scalar) functions and tensor functions (run in f64) are both compared, so the tensor
//! path that training differentiates is checked against the same numbers.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use ddpm_diffusion::vdm::{self, loss, sample, FixedGamma, MonotoneGamma, MonotoneGammaInit};

use crate::check::{tensor, FileTally, Path, Tol, TOL_F64};
use crate::refjson::{Arr, J};

const TOL: Tol = Tol::Mixed(TOL_F64);

pub fn case(c: &J, tally: &mut FileTally) -> Result<()> {
    c.get("name")?.str()?;
    match c.get("kind")?.str()? {
        "schedule" => schedule_case(c, tally),
        "elbo" => elbo_case(c, tally),
        "sampler" => sampler_case(c, tally),
        "low_discrepancy" => low_discrepancy_case(c, tally),
        other => bail!("unknown kind {other:?}"),
    }
}

/// A schedule read from a case: host `(gamma, gamma')` and, for the learned one, the network.
enum Sched {
    Fixed(FixedGamma),
    Learned(MonotoneGammaInit),
}

impl Sched {
    fn read(s: &J) -> Result<Self> {
        let ends = || -> Result<(f64, f64)> {
            Ok((s.get("gamma_min")?.f64()?, s.get("gamma_max")?.f64()?))
        };
        Ok(match s.get("type")?.str()? {
            "linear_logsnr" => {
                let (gamma_min, gamma_max) = ends()?;
                Sched::Fixed(FixedGamma::LinearLogSnr {
                    gamma_min,
                    gamma_max,
                })
            }
            "cosine" => {
                let (gamma_min, gamma_max) = ends()?;
                Sched::Fixed(FixedGamma::Cosine {
                    gamma_min,
                    gamma_max,
                })
            }
            "learned" => Sched::Learned(MonotoneGammaInit {
                w1: s.get("w1")?.f64()?,
                w2: s.get("w2")?.arr()?.data,
                b2: s.get("b2")?.arr()?.data,
                w3: s.get("w3")?.arr()?.data,
                gamma_0: s.get("gamma_0")?.f64()?,
                gamma_1: s.get("gamma_1")?.f64()?,
            }),
            other => bail!("unknown schedule type {other:?}"),
        })
    }

    fn host(&self, t: f64) -> (f64, f64) {
        match self {
            Sched::Fixed(f) => (f.gamma(t), f.dgamma(t)),
            Sched::Learned(p) => p.gamma_dgamma(t),
        }
    }

    /// The tensor evaluation (the path training uses), in f64.
    fn eval(&self, t: &[f64]) -> Result<vdm::GammaEval> {
        Ok(match self {
            Sched::Fixed(f) => f.eval(t, DType::F64, &Device::Cpu)?,
            Sched::Learned(p) => MonotoneGamma::new(p, DType::F64, &Device::Cpu)?
                .eval(&Tensor::new(t, &Device::Cpu)?)?,
        })
    }
}

fn schedule_case(c: &J, tally: &mut FileTally) -> Result<()> {
    let name = c.get("name")?.str()?;
    let sched = Sched::read(&c.get("schedule")?)?;
    let t = c.get("inputs")?.get("t")?.arr()?.data;
    let e = c.get("expected")?;
    let (g, dg): (Vec<f64>, Vec<f64>) = t.iter().map(|&x| sched.host(x)).unzip();
    let cmp = |tally: &mut FileTally, field: &str, got: &[f64]| -> Result<()> {
        tally.cmp_vec(
            &format!("{name}.{field}"),
            Path::F64,
            got,
            &e.get(field)?.arr()?,
            TOL,
        );
        Ok(())
    };
    cmp(tally, "gamma", &g)?;
    cmp(tally, "dgamma", &dg)?;
    let ev = sched.eval(&t)?;
    tally.cmp_tensor(
        &format!("{name}.gamma (tensor)"),
        Path::F64,
        &ev.gamma,
        &e.get("gamma")?.arr()?,
        TOL,
    )?;
    tally.cmp_tensor(
        &format!("{name}.dgamma (tensor)"),
        Path::F64,
        &ev.dgamma,
        &e.get("dgamma")?.arr()?,
        TOL,
    )?;
    let map = |f: fn(f64) -> f64| g.iter().map(|&x| f(x)).collect::<Vec<_>>();
    cmp(tally, "alpha2", &map(vdm::alpha2))?;
    cmp(tally, "sigma2", &map(vdm::sigma2))?;
    cmp(tally, "snr", &map(vdm::snr))?;
    if let Sched::Learned(p) = &sched {
        let (raw, draw): (Vec<f64>, Vec<f64>) = t.iter().map(|&x| p.raw(x)).unzip();
        cmp(tally, "raw", &raw)?;
        cmp(tally, "raw_derivative", &draw)?;
    }
    Ok(())
}

/// Example `b` of a `[B, ..]` array.
fn ex(a: &Arr, b: usize) -> Vec<f64> {
    a.row(b).data
}

fn elbo_case(c: &J, tally: &mut FileTally) -> Result<()> {
    let name = c.get("name")?.str()?;
    let sched = Sched::read(&c.get("schedule")?)?;
    let i = c.get("inputs")?;
    let e = c.get("expected")?;
    let (xa, eps, eps0, eps_hat) = (
        i.get("x")?.arr()?,
        i.get("eps")?.arr()?,
        i.get("eps_0")?.arr()?,
        i.get("eps_hat")?.arr()?,
    );
    let xu = i.get("x_uint8")?.arr()?;
    let from_u8: Vec<f64> = xu.data.iter().map(|&u| u / 255.0 * 2.0 - 1.0).collect();
    tally.cmp_vec(
        &format!("{name}.x from x_uint8"),
        Path::F64,
        &from_u8,
        &xa,
        TOL,
    );
    let t = i.get("t")?.arr()?.data;
    let b = t.len();
    let (g, dg): (Vec<f64>, Vec<f64>) = t.iter().map(|&x| sched.host(x)).unzip();
    let (g0, g1) = (sched.host(0.0).0, sched.host(1.0).0);
    let field = |k: &str| -> Result<Arr> { e.get(k)?.arr() };
    tally.cmp_vec(
        &format!("{name}.gamma_t"),
        Path::F64,
        &g,
        &field("gamma_t")?,
        TOL,
    );
    tally.cmp_vec(
        &format!("{name}.dgamma_t"),
        Path::F64,
        &dg,
        &field("dgamma_t")?,
        TOL,
    );
    tally.cmp_scalar(
        &format!("{name}.gamma_0"),
        Path::F64,
        g0,
        e.get("gamma_0")?.f64()?,
        TOL,
    );
    tally.cmp_scalar(
        &format!("{name}.gamma_1"),
        Path::F64,
        g1,
        e.get("gamma_1")?.f64()?,
        TOL,
    );

    // Host, per example.
    let z0 = field("z_0")?;
    let prior: Vec<f64> = (0..b)
        .map(|k| vdm::prior_bpd_f64(&ex(&xa, k), g1))
        .collect();
    let diff: Vec<f64> = (0..b)
        .map(|k| vdm::diffusion_bpd_continuous_f64(&ex(&eps, k), &ex(&eps_hat, k), dg[k]))
        .collect();
    let recon: Vec<f64> = (0..b)
        .map(|k| vdm::reconstruction_bpd_f64(&ex(&xa, k), &ex(&z0, k), g0))
        .collect();
    let elbo = vdm::ContinuousElbo::new(prior, diff, recon)?;
    for (k, got) in [
        ("prior_bpd", &elbo.prior_bpd),
        ("diffusion_bpd", &elbo.diffusion_bpd),
        ("reconstruction_bpd", &elbo.reconstruction_bpd),
        ("total_bpd", &elbo.total_bpd),
    ] {
        tally.cmp_vec(&format!("{name}.{k}"), Path::F64, got, &field(k)?, TOL);
    }

    // Tensors (f64), through the schedule's tensor evaluation.
    let ev = sched.eval(&t)?;
    let (x, n, n0, nh) = (
        tensor(&xa, DType::F64)?,
        tensor(&eps, DType::F64)?,
        tensor(&eps0, DType::F64)?,
        tensor(&eps_hat, DType::F64)?,
    );
    let zt = loss::q_sample(&x, &n, &ev.gamma)?;
    tally.cmp_tensor(&format!("{name}.z_t"), Path::F64, &zt, &field("z_t")?, TOL)?;
    let g0b = ev.gamma_0.broadcast_as(b)?.contiguous()?;
    let zz = loss::q_sample(&x, &n0, &g0b)?;
    tally.cmp_tensor(&format!("{name}.z_0"), Path::F64, &zz, &z0, TOL)?;
    let terms = [
        ("prior_bpd", vdm::prior_bpd(&x, &ev.gamma_1)?),
        (
            "diffusion_bpd",
            vdm::diffusion_bpd_continuous(&n, &nh, &ev.dgamma)?,
        ),
        (
            "reconstruction_bpd",
            vdm::reconstruction_bpd(&x, &tensor(&z0, DType::F64)?, &ev.gamma_0)?,
        ),
    ];
    for (k, got) in &terms {
        tally.cmp_tensor(
            &format!("{name}.{k} (tensor)"),
            Path::F64,
            got,
            &field(k)?,
            TOL,
        )?;
    }
    for d in e.get("discrete")?.items()? {
        discrete_entry(name, &sched, &d, (&n, &nh), (&eps, &eps_hat), &t, tally)?;
    }
    Ok(())
}

fn discrete_entry(
    name: &str,
    sched: &Sched,
    d: &J,
    (n, nh): (&Tensor, &Tensor),
    (eps, eps_hat): (&Arr, &Arr),
    t: &[f64],
    tally: &mut FileTally,
) -> Result<()> {
    let big_t = d.get("T")?.usize()?;
    let what = format!("{name}.discrete[T={big_t}]");
    let td: Vec<f64> = t.iter().map(|&x| vdm::discretize_time(x, big_t)).collect();
    let s: Vec<f64> = td.iter().map(|&x| x - 1.0 / big_t as f64).collect();
    let gt: Vec<f64> = td.iter().map(|&x| sched.host(x).0).collect();
    let gs: Vec<f64> = s.iter().map(|&x| sched.host(x).0).collect();
    tally.cmp_vec(
        &format!("{what}.t"),
        Path::F64,
        &td,
        &d.get("t")?.arr()?,
        TOL,
    );
    tally.cmp_vec(
        &format!("{what}.s"),
        Path::F64,
        &s,
        &d.get("s")?.arr()?,
        TOL,
    );
    tally.cmp_vec(
        &format!("{what}.gamma_t"),
        Path::F64,
        &gt,
        &d.get("gamma_t")?.arr()?,
        TOL,
    );
    tally.cmp_vec(
        &format!("{what}.gamma_s"),
        Path::F64,
        &gs,
        &d.get("gamma_s")?.arr()?,
        TOL,
    );
    let want = d.get("diffusion_bpd")?.arr()?;
    let host: Vec<f64> = (0..t.len())
        .map(|k| vdm::diffusion_bpd_discrete_f64(&ex(eps, k), &ex(eps_hat, k), gt[k], gs[k], big_t))
        .collect();
    tally.cmp_vec(
        &format!("{what}.diffusion_bpd"),
        Path::F64,
        &host,
        &want,
        TOL,
    );
    let dev = &Device::Cpu;
    let tens = vdm::diffusion_bpd_discrete(
        n,
        nh,
        &Tensor::new(gt.as_slice(), dev)?,
        &Tensor::new(gs.as_slice(), dev)?,
        big_t,
    )?;
    tally.cmp_tensor(
        &format!("{what}.diffusion_bpd (tensor)"),
        Path::F64,
        &tens,
        &want,
        TOL,
    )
}

fn sampler_case(c: &J, tally: &mut FileTally) -> Result<()> {
    let i = c.get("inputs")?;
    let z_t = tensor(&i.get("z_t")?.arr()?, DType::F64)?;
    let eps_hat = tensor(&i.get("eps_hat")?.arr()?, DType::F64)?;
    let noise = tensor(&i.get("noise")?.arr()?, DType::F64)?;
    for s in c.get("steps")?.items()? {
        let (gt, gs) = (s.get("gamma_t")?.f64()?, s.get("gamma_s")?.f64()?);
        let what = format!("sampler[{gt} -> {gs}]");
        let coef = sample::ancestral_coefficients(gt, gs)?;
        tally.cmp_vec(
            &format!("{what}.coefficients"),
            Path::F64,
            &coef,
            &s.get("coefficients")?.arr()?,
            TOL,
        );
        let checks = [
            (
                "ancestral_z_s",
                sample::ancestral_step(&z_t, &eps_hat, &noise, gt, gs)?,
            ),
            (
                "ddim_z_s",
                sample::ddim_step(&z_t, &eps_hat, gt, gs, false)?,
            ),
            (
                "ddim_clip_z_s",
                sample::ddim_step(&z_t, &eps_hat, gt, gs, true)?,
            ),
            ("final_mean", sample::final_mean(&z_t, gs)?),
        ];
        for (k, got) in &checks {
            tally.cmp_tensor(
                &format!("{what}.{k}"),
                Path::F64,
                got,
                &s.get(k)?.arr()?,
                TOL,
            )?;
        }
    }
    Ok(())
}

fn low_discrepancy_case(c: &J, tally: &mut FileTally) -> Result<()> {
    let u = c.get("u")?.f64()?;
    let n = c.get("n")?.usize()? as u64;
    let first = c.get("first")?.usize()? as u64;
    let count = c.get("count")?.usize()?;
    let got = vdm::low_discrepancy_times(u, first, n, count);
    let want = c.get("expected")?.get("t")?.arr()?;
    tally.cmp_vec("low_discrepancy.t", Path::F64, &got, &want, TOL);
    Ok(())
}
