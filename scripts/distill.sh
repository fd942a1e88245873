#!/usr/bin/env bash
# Progressive distillation (Salimans & Ho 2022): halve the DDIM steps of a trained model round by
# round, each round an ordinary run directory initialised from the previous one.
#
#   scripts/distill.sh TEACHER_RUN N_FROM N_TO [ddpm-train args for every round...]
#   scripts/distill.sh runs/fmnist 256 4 --steps 2000 --set distill.guidance=1.0
#
# Round k trains TEACHER_RUN-d<N/2> from the previous round's run (the first from TEACHER_RUN, with
# distill.teacher_steps = N_FROM): 256 -> 128 -> 64 -> ... -> N_TO. Extra arguments go to every
# round (--steps, --batch, --set optim.lr=..., or mpirun-free options); distill.guidance only
# matters in the first round (later rounds inherit it). Re-running continues an interrupted round
# (--resume auto) and skips finished ones. Each student samples with its own steps by default:
#   ddpm-sample --checkpoint TEACHER_RUN-d4
# Set DDPM_TRAIN to run the rounds another way, e.g. DDPM_TRAIN="mpirun -n 4 target/release/ddpm-train".
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
teacher="${1%/}"
n="$2"
to="$3"
shift 3
train="${DDPM_TRAIN:-target/release/ddpm-train}"
base="$teacher"

if [ "$n" -lt 2 ] || [ "$to" -lt 1 ] || [ "$to" -ge "$n" ]; then
  echo "distill.sh: need N_FROM >= 2 and 1 <= N_TO < N_FROM (got $n, $to)" >&2
  exit 2
fi
first=1
while [ "$n" -gt "$to" ]; do
  if [ $((n % 2)) -ne 0 ]; then
    echo "distill.sh: $n steps cannot be halved" >&2
    exit 2
  fi
  half=$((n / 2))
  out="$base-d$half"
  steps_arg=()
  if [ "$first" = 1 ]; then
    steps_arg=(--set "distill.teacher_steps=$n")
  fi
  echo "distill.sh: $teacher ($n steps) -> $out ($half steps)"
  # shellcheck disable=SC2086
  $train --teacher "$teacher" --out "$out" --resume auto --no-progress "${steps_arg[@]}" "$@"
  teacher="$out"
  n="$half"
  first=0
done
echo "distill.sh: final student $teacher ($n steps): ddpm-sample --checkpoint $teacher"
