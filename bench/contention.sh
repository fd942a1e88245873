#!/usr/bin/env bash
# Training throughput of the quickstart model when another CPU-bound process holds a core, and one
# process with all cores against single-thread MPI ranks (issue 19).
#
#   bash bench/contention.sh                 # all cases below, one round
#   ROUNDS=2 STEPS=60 bash bench/contention.sh
#   CASES="plain:2 plain:1" bash bench/contention.sh
#
# Cases (LOAD:THREADS): LOAD is `none`, `nice19` (a busy loop under `nice -n 19`) or `plain` (a busy
# loop at normal priority), THREADS the compute threads of the one ddpm-train process (`d` = the
# default, all cores); plus `mpi:R` = R single-thread ranks (launch/mpirun-local.sh) with per-rank
# batch 32/R, i.e. the same global batch 32 as the one process. Each case trains
# configs/quickstart.toml for STEPS steps (default 40) into a scratch directory and reports the median
# images/s of ddpm-train's metrics windows after the first (log_every = 10). Lines:
#   contention LOAD THREADS images/s ...
# The competing loop is started before and killed after each case (by its pid).
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'echo "bench/contention.sh: error: failed at line $LINENO (exit $?)" >&2; exit 1' ERR
STEPS=${STEPS:-40}
ROUNDS=${ROUNDS:-1}
CASES=${CASES:-"none:d none:1 nice19:d nice19:1 plain:d plain:1 none:mpi2"}
DATA=data/fashion-mnist-train.h5

source bench/lib.sh
TRAIN=${DDPM_TRAIN:-$(build_example ddpm-train ddpm-train bin)}
if [[ ! -f "$DATA" ]]; then
  CONVERT=$(build_example ddpm-data ddpm-data bin)
  mkdir -p data
  "$CONVERT" convert --from fashion-mnist "${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}" \
    --split train --out "$DATA"
fi
OUT=$(mktemp -d)
HOG=
cleanup() { [[ -n "$HOG" ]] && kill "$HOG" 2>/dev/null; rm -rf "$OUT"; }
trap cleanup EXIT

start_load() {
  case $1 in
    none) HOG= ;;
    nice19) nice -n 19 bash -c 'while :; do :; done' & HOG=$! ;;
    plain) bash -c 'while :; do :; done' & HOG=$! ;;
    *) echo "unknown load $1" >&2; exit 2 ;;
  esac
}
stop_load() { if [[ -n "$HOG" ]]; then kill "$HOG"; wait "$HOG" 2>/dev/null || true; HOG=; fi; }

rate() { # metrics.jsonl -> median images/s of the windows after the first
  python3 -c 'import json, statistics, sys
v = [json.loads(l).get("images_per_sec") for l in open(sys.argv[1])]
v = [x for x in v if x][1:]
w = " ".join("%.1f" % x for x in v)
print("%.1f (windows: %s)" % (statistics.median(v), w) if v else "n/a")' "$1"
}

args=(--config configs/quickstart.toml --steps "$STEPS" --no-progress
      --set schedule.log_every=10 --set schedule.checkpoint_every=100000 --set preview.per_class=1 --set preview.steps=2)
for round in $(seq "$ROUNDS"); do
  for c in $CASES; do
    load=${c%%:*} th=${c#*:}
    dir=$OUT/run-$round-${load}-$th
    start_load "$load"
    if [[ $th == mpi* ]]; then
      r=${th#mpi}
      DDPM_TRAIN=$TRAIN THREADS=1 launch/mpirun-local.sh "$r" "${args[@]}" --batch $((32 / r)) --out "$dir" \
        >"$dir.log" 2>&1
    elif [[ $th == d ]]; then
      env -u RAYON_NUM_THREADS "$TRAIN" "${args[@]}" --out "$dir" >"$dir.log" 2>&1
    else
      RAYON_NUM_THREADS=$th "$TRAIN" "${args[@]}" --out "$dir" >"$dir.log" 2>&1
    fi
    stop_load
    echo "contention $load $th images/s $(rate "$dir/metrics.jsonl")  (round $round, $(date -u +%H:%M:%S), load avg $(cut -d' ' -f1 /proc/loadavg))"
  done
done
