#!/bin/bash
# The job step shared by slurm-1node-8gpu.sbatch and slurm-multinode.sbatch: starts ddpm-train on every
# task of the allocation, forwards the time-limit signal to the ranks, and requeues the job after a
# clean checkpoint-and-stop. The sbatch scripts `exec` it, so it *is* the batch shell and receives
# `--signal=B:USR1@...` and `scancel --signal=USR1 --batch`.
#
# Environment (sbatch passes the submitting shell's environment on):
#   DEVICE       cuda (default) or cpu. cpu needs no GPUs: submit with --gpus-per-task=0, see below.
#   DDPM_TRAIN   the binary (default target-cuda/release/ddpm-train for cuda, built with
#                `cargo build --release --features cuda -p ddpm-train --target-dir target-cuda`;
#                target/release/ddpm-train for cpu, built with `cargo build --release -p ddpm-train`)
#   RUN_DIR      run directory when the arguments have no --out (default runs/<job name>-<job id>)
#   LAUNCHER     srun (default) or mpirun, see below
#   SRUN_MPI     srun's --mpi plugin (default pmix)
#
# MPI wiring. `srun --mpi=pmix` hands ranks and addresses to MPI_Init through PMIx: this is what
# Debian 12's OpenMPI 4.1 supports (ompi_info lists only "pmix: ext3x"); with `--mpi=pmi2` or
# `--mpi=none` its ranks abort in MPI_Init ("OMPI was not built with SLURM's PMI support"). MPICH
# builds use `SRUN_MPI=pmi2`. Where srun has no pmix plugin (`srun --mpi=list`), use `LAUNCHER=mpirun`:
# OpenMPI's mpirun reads the allocation from SLURM's environment, starts its daemons with srun, and
# forwards SIGUSR1 to the ranks and aborts the job when one rank dies, as srun does below.
set -uo pipefail

DEVICE=${DEVICE:-cuda}
case "$DEVICE" in
  cuda) train_default=target-cuda/release/ddpm-train ;;
  cpu) train_default=target/release/ddpm-train ;;
  *) echo "error: DEVICE=$DEVICE: expected cuda or cpu" >&2; exit 2 ;;
esac
DDPM_TRAIN=${DDPM_TRAIN:-$train_default}
if ! [ -x "$DDPM_TRAIN" ]; then
  echo "error: $DDPM_TRAIN not found or not executable (DEVICE=$DEVICE; set DDPM_TRAIN or build it, see launch/README.md)" >&2
  exit 2
fi
# The run directory must be the same for every requeue of the job so `--resume auto` finds the
# checkpoints; the job keeps its id when requeued.
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
extra=()
case " $* " in *" --out "* | *" --out="*) ;; *) extra+=(--out "$RUN_DIR") ;; esac
case " $* " in *" --device "* | *" --device="*) ;; *) extra+=(--device "$DEVICE") ;; esac

# One compute thread pool per rank, sized to its cores.
export RAYON_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# The job log is a file: no terminal colour codes in ddpm-train's log lines.
export NO_COLOR=${NO_COLOR:-1}
# NCCL: warnings only (INFO prints the chosen transports: useful when bringing up a machine).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

case "${LAUNCHER:-srun}" in
  # --kill-on-bad-exit=1: one rank exiting non-zero (error, panic -> MPI_Abort, signal, dead node)
  #                       kills the whole step at once instead of leaving the others in a collective.
  # --cpu-bind=cores:     each rank pinned to its own cores.
  # srun forwards the SIGUSR1/SIGTERM it receives to every task.
  srun) launch=(srun "--mpi=${SRUN_MPI:-pmix}" --kill-on-bad-exit=1 --cpu-bind=cores) ;;
  # As many ranks as the allocation has tasks; binding is left to the per-rank thread pools.
  mpirun) launch=(mpirun --bind-to none -x RAYON_NUM_THREADS -x OMP_NUM_THREADS -x NCCL_DEBUG) ;;
  *) echo "error: LAUNCHER=$LAUNCHER: expected srun or mpirun" >&2; exit 2 ;;
esac

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-1} node(s) ($SLURM_JOB_NODELIST): $SLURM_NTASKS ranks, device $DEVICE, ${launch[0]}"

requeue=0
forward_usr1() {
  echo "$(date): time limit near: asking ddpm-train to checkpoint and stop; will requeue"
  requeue=1
  kill -USR1 "$step_pid" 2>/dev/null || true
}
trap forward_usr1 USR1

"${launch[@]}" "$DDPM_TRAIN" "$@" ${extra[@]+"${extra[@]}"} --resume auto &
step_pid=$!

# `wait` returns early when the trap fires; keep waiting until the step has really ended.
wait "$step_pid"
rc=$?
while kill -0 "$step_pid" 2>/dev/null; do
  wait "$step_pid"
  rc=$?
done

if [ "$requeue" = 1 ] && [ "$rc" = 0 ]; then
  echo "$(date): checkpoint written; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
echo "$(date): step ended with status $rc"
exit "$rc"
