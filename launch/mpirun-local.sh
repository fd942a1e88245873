#!/usr/bin/env bash
# Data-parallel training on this machine: RANKS copies of ddpm-train under mpirun, gradients all-reduced
# every step (MPI on CPU; NCCL when ddpm-train is a --features cuda build and the config asks for cuda).
#
#   launch/mpirun-local.sh RANKS [ddpm-train arguments...]
#   launch/mpirun-local.sh 2 --config configs/quickstart.toml --out runs/qs-2ranks
#
# The per-rank batch is the config's (or --batch N): the global batch is RANKS x that. To train the
# same model as one rank with batch 2B, run 2 ranks with --batch B.
#
# Environment:
#   DDPM_TRAIN   the binary (default: target/release/ddpm-train, built with
#                `cargo build --release -p ddpm-train`)
#   THREADS      compute threads per rank (default: cores / RANKS, at least 1)
#   MPIRUN       the launcher (default: mpirun from PATH; OpenMPI or MPICH/Hydra)
#   MPIRUN_ARGS  extra launcher arguments, e.g. "--report-bindings"
set -euo pipefail

if [ $# -lt 1 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 RANKS [ddpm-train arguments...]" >&2
  exit 2
fi
ranks=$1
shift

repo=$(cd "$(dirname "$0")/.." && pwd)
train=${DDPM_TRAIN:-$repo/target/release/ddpm-train}
if ! [ -x "$train" ]; then
  echo "$0: $train not found; build it with: cargo build --release -p ddpm-train (or set DDPM_TRAIN)" >&2
  exit 2
fi
mpirun=${MPIRUN:-mpirun}
command -v "$mpirun" >/dev/null || { echo "$0: $mpirun not found (apt-get install openmpi-bin)" >&2; exit 2; }

cores=$(nproc)
threads=${THREADS:-$(( cores / ranks ))}
[ "$threads" -ge 1 ] || threads=1
# candle's CPU kernels and the data loader use rayon; one pool of THREADS per rank keeps RANKS x THREADS
# within the cores instead of every rank starting one thread per core.
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads

args=(-n "$ranks")
if "$mpirun" --version 2>/dev/null | grep -q "Open MPI"; then
  # OpenMPI refuses to run as root unless told twice (containers, CI).
  if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  # CMA single-copy needs ptrace rights that containers often lack; the copy-in/copy-out fallback is
  # as fast for gradient-sized messages.
  export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
  if [ $(( ranks * threads )) -gt "$cores" ]; then
    # More threads than cores: allow it, and do not pin (pinned, oversubscribed ranks starve).
    args+=(--oversubscribe --bind-to none)
  else
    # Each rank gets THREADS consecutive cores and stays there (no migration, memory stays local).
    args+=(--map-by "slot:PE=$threads" --bind-to core)
  fi
  # Pass the thread counts (and DDPM_* settings) to every rank.
  args+=(-x RAYON_NUM_THREADS -x OMP_NUM_THREADS)
  for v in $(env | grep -o '^DDPM_[A-Z_]*' || true); do args+=(-x "$v"); done
else
  # MPICH / Hydra: environment is passed through by default.
  args+=(-bind-to "core:$threads")
fi

# shellcheck disable=SC2086
echo "+ $mpirun ${args[*]} ${MPIRUN_ARGS:-} $train $*" >&2
exec "$mpirun" "${args[@]}" ${MPIRUN_ARGS:-} "$train" "$@"
