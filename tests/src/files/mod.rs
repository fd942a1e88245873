//! One checker per reference file. Each reads its inputs through the tracked JSON view, runs the
//! `ddpm-diffusion` functions and compares every expected field.

pub mod ddim_step;
pub mod ddpm_step;
pub mod dpm_solver;
pub mod guidance;
pub mod min_snr;
pub mod q_sample;
pub mod schedules;
pub mod sde_samplers;
pub mod timestep_embedding;
pub mod vb_terms;
pub mod vdm;

use anyhow::{bail, Result};
use ddpm_diffusion::{BetaSchedule, NoiseSchedule};

use crate::check::FileTally;
use crate::refjson::J;

/// The reference files this suite knows, with their checkers.
pub type CaseFn = fn(&J, &mut FileTally) -> Result<()>;
pub type TopFn = fn(&J, &mut FileTally) -> Result<()>;

pub struct KnownFile {
    pub name: &'static str,
    /// Checks one entry of `cases`.
    pub case: CaseFn,
    /// Checks the file's extra top-level sections (not `cases`, not the common header).
    pub top: TopFn,
    /// Names of the extra top-level sections `top` consumes.
    pub top_sections: &'static [&'static str],
}

fn no_top(_: &J, _: &mut FileTally) -> Result<()> {
    Ok(())
}

pub const KNOWN: &[KnownFile] = &[
    KnownFile {
        name: "schedules.json",
        case: schedules::case,
        top: no_top,
        top_sections: &[],
    },
    KnownFile {
        name: "q_sample.json",
        case: q_sample::case,
        top: no_top,
        top_sections: &[],
    },
    KnownFile {
        name: "ddpm_step.json",
        case: ddpm_step::case,
        top: no_top,
        top_sections: &[],
    },
    KnownFile {
        name: "ddim_step.json",
        case: ddim_step::case,
        top: ddim_step::top,
        top_sections: &["respacing_examples"],
    },
    KnownFile {
        name: "vb_terms.json",
        case: vb_terms::case,
        top: vb_terms::top,
        top_sections: &["normal_kl", "discretized_gaussian_log_likelihood"],
    },
    KnownFile {
        name: "timestep_embedding.json",
        case: timestep_embedding::case,
        top: no_top,
        top_sections: &[],
    },
    KnownFile {
        name: "guidance.json",
        case: guidance::case,
        top: no_top,
        top_sections: &[],
    },
    KnownFile {
        name: "dpm_solver.json",
        case: dpm_solver::case,
        top: no_top,
        top_sections: &[],
    },
    KnownFile {
        name: "min_snr.json",
        case: min_snr::case,
        top: no_top,
        top_sections: &[],
    },
    KnownFile {
        name: "sde_samplers.json",
        case: sde_samplers::case,
        top: no_top,
        top_sections: &[],
    },
    KnownFile {
        name: "vdm.json",
        case: vdm::case,
        top: no_top,
        top_sections: &[],
    },
];

/// The base schedule named by a case's `schedule` and `T` fields (improved-diffusion definitions).
pub fn schedule_of(c: &J) -> Result<NoiseSchedule> {
    let t = c.get("T")?.usize()?;
    let kind = match c.get("schedule")?.str()? {
        "linear" => BetaSchedule::Linear,
        "cosine" => BetaSchedule::Cosine,
        other => bail!("unknown schedule {other:?}"),
    };
    Ok(NoiseSchedule::new(&kind, t)?)
}
