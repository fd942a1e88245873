//! What the parallel launcher (mpirun, mpiexec, srun) tells a process through its environment.
//!
//! Everything here is a pure function of an environment lookup so it can be tested without a launcher.

use crate::error::{DistError, Result};

/// Environment variables that mean "a parallel launcher started this process", with the variable that
/// carries the world size when there is one. Checked in order.
///
/// - `OMPI_COMM_WORLD_SIZE`: OpenMPI's mpirun.
/// - `PMI_SIZE` / `PMI_RANK`: MPICH/Hydra and Intel MPI (and srun --mpi=pmi2).
/// - `PMIX_RANK`: any PMIx launcher (OpenMPI 5 prterun, srun --mpi=pmix).
/// - `SLURM_NTASKS` together with `SLURM_STEP_ID`: a task of an srun job step. `SLURM_NTASKS` alone is also
///   set inside the batch script itself, which is a single process.
const LAUNCHER_VARS: &[&str] = &["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK"];

/// Environment variables giving the rank's index among the ranks of its node, most specific first.
const LOCAL_RANK_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_LOCAL_RANK", // OpenMPI
    "MPI_LOCALRANKID",            // MPICH / Hydra, Intel MPI
    "MV2_COMM_WORLD_LOCAL_RANK",  // MVAPICH2
    "PALS_LOCAL_RANKID",          // HPE Cray PALS
    "SLURM_LOCALID",              // srun
];

/// Forces a back-end: `DDPM_DIST=single` or `DDPM_DIST=mpi`. Useful when a launcher variable leaks into
/// a process that is not part of a parallel job (e.g. a tool run inside an sbatch script).
pub const FORCE_VAR: &str = "DDPM_DIST";

/// How the process was started, as far as the environment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchInfo {
    /// The variable that identified a launcher, if any.
    pub launcher_var: Option<&'static str>,
    /// The world size the launcher announced, when it announces one.
    pub announced_world: Option<usize>,
    /// Local rank from the environment, with the variable it came from.
    pub local_rank: Option<(usize, &'static str)>,
    /// `DDPM_DIST` when set.
    pub forced: Option<String>,
}

impl LaunchInfo {
    /// Reads the real process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads through `get`, so tests can supply an environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let mut launcher_var = LAUNCHER_VARS.iter().copied().find(|v| get(v).is_some());
        if launcher_var.is_none() && get("SLURM_NTASKS").is_some() && get("SLURM_STEP_ID").is_some()
        {
            launcher_var = Some("SLURM_NTASKS");
        }
        let announced_world = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"]
            .iter()
            .filter(|v| launcher_var.is_some() && get(v).is_some())
            .find_map(|v| get(v).and_then(|s| s.trim().parse::<usize>().ok()));
        let local_rank = LOCAL_RANK_VARS.iter().copied().find_map(|v| {
            get(v)
                .and_then(|s| s.trim().parse::<usize>().ok())
                .map(|r| (r, v))
        });
        LaunchInfo {
            launcher_var,
            announced_world,
            local_rank,
            forced: get(FORCE_VAR).filter(|s| !s.is_empty()),
        }
    }

    /// Which back-end [`crate::init`] should start.
    pub fn wants_mpi(&self) -> Result<bool> {
        match self.forced.as_deref() {
            Some("single") => Ok(false),
            Some("mpi") => Ok(true),
            Some(other) => Err(DistError::Launch(format!(
                "{FORCE_VAR}={other:?}: expected \"single\" or \"mpi\""
            ))),
            None => Ok(self.launcher_var.is_some()),
        }
    }
}

/// Picks the CUDA ordinal for a rank.
///
/// `visible` is the number of devices this process can see, which CUDA already restricts to
/// `CUDA_VISIBLE_DEVICES` and renumbers from 0. Two layouts are common:
/// - the launcher gives every task its own GPU (`srun --gpus-per-task=1`, or a per-rank
///   `CUDA_VISIBLE_DEVICES`): each process sees one device, ordinal 0;
/// - every rank of a node sees all the node's GPUs (plain `mpirun`): rank `local_rank` takes device
///   `local_rank`.
///
/// More ranks on a node than visible devices is an error, since NCCL refuses two ranks on one GPU.
pub fn select_cuda_ordinal(local_rank: usize, visible: usize) -> Result<usize> {
    let cvd = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into());
    match visible {
        0 => Err(DistError::Device(format!(
            "no CUDA device visible to local rank {local_rank} (CUDA_VISIBLE_DEVICES={cvd})"
        ))),
        1 => Ok(0),
        n if local_rank < n => Ok(local_rank),
        n => Err(DistError::Device(format!(
            "local rank {local_rank} has no GPU of its own: {n} devices visible \
             (CUDA_VISIBLE_DEVICES={cvd}); start at most {n} ranks per node, or give each task one GPU \
             (srun --gpus-per-task=1)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn info(vars: &[(&str, &str)]) -> LaunchInfo {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchInfo::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn plain_process_is_single() {
        let i = info(&[]);
        assert_eq!(i.launcher_var, None);
        assert!(!i.wants_mpi().unwrap());
    }

    #[test]
    fn openmpi_is_detected_with_world_and_local_rank() {
        let i = info(&[
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
            ("PMIX_RANK", "3"),
        ]);
        assert_eq!(i.launcher_var, Some("OMPI_COMM_WORLD_SIZE"));
        assert_eq!(i.announced_world, Some(4));
        assert_eq!(i.local_rank, Some((3, "OMPI_COMM_WORLD_LOCAL_RANK")));
        assert!(i.wants_mpi().unwrap());
    }

    #[test]
    fn mpich_and_slurm_local_ranks() {
        let i = info(&[
            ("PMI_SIZE", "2"),
            ("PMI_RANK", "1"),
            ("MPI_LOCALRANKID", "1"),
        ]);
        assert_eq!(i.announced_world, Some(2));
        assert_eq!(i.local_rank, Some((1, "MPI_LOCALRANKID")));
        let s = info(&[
            ("SLURM_NTASKS", "16"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_LOCALID", "5"),
            ("PMIX_RANK", "13"),
        ]);
        assert!(s.wants_mpi().unwrap());
        assert_eq!(s.announced_world, Some(16));
        assert_eq!(s.local_rank, Some((5, "SLURM_LOCALID")));
    }

    #[test]
    fn batch_script_alone_is_not_a_launcher() {
        // Inside an sbatch script (no srun step) SLURM_NTASKS is set but there is one process.
        let i = info(&[("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "1")]);
        assert!(!i.wants_mpi().unwrap());
        assert_eq!(i.announced_world, None);
    }

    #[test]
    fn forcing_overrides_and_rejects_typos() {
        assert!(
            !info(&[("OMPI_COMM_WORLD_SIZE", "2"), ("DDPM_DIST", "single")])
                .wants_mpi()
                .unwrap()
        );
        assert!(info(&[("DDPM_DIST", "mpi")]).wants_mpi().unwrap());
        let e = info(&[("DDPM_DIST", "nccl")]).wants_mpi().unwrap_err();
        assert!(e.to_string().contains("DDPM_DIST"), "{e}");
    }

    #[test]
    fn cuda_ordinal_selection() {
        assert_eq!(select_cuda_ordinal(5, 1).unwrap(), 0);
        assert_eq!(select_cuda_ordinal(3, 8).unwrap(), 3);
        assert_eq!(select_cuda_ordinal(0, 8).unwrap(), 0);
        let e = select_cuda_ordinal(2, 2).unwrap_err().to_string();
        assert!(e.contains("local rank 2") && e.contains("2 devices"), "{e}");
        assert!(select_cuda_ordinal(0, 0).is_err());
    }
}
