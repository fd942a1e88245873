#!/usr/bin/env bash
# CPU benchmark of the ddpm-unet U-Net against the same architecture in PyTorch, measured in one run.
#
#   bash bench/unet.sh                 # quickstart model, then the 9M and 35.7M CIFAR models
#   MODELS=small REPS=3 bash bench/unet.sh
#
# Models: `quickstart` is the exact U-Net of configs/quickstart.toml (1,142,337 parameters, 28x28,
# class-conditional with scale-shift norm; both sides read that file), batch 32 as the quickstart
# trains it, labels with every tenth one the null label (label dropout); `small` (9M, base 64) and
# `cifar10` (Ho et al.'s 35.7M) are 32x32 at batch 16.
#
# Environment: BENCH_BIN (use this prebuilt bench_unet instead of building it), MODELS (comma list;
# default quickstart,small,cifar10), BATCH (one batch for every model; default per model as above),
# REPS (median of N timed runs after a warm-up; 2), ROUNDS (3), THREADS (both frameworks; default:
# all cores), OPS=1 (per-op breakdowns in the first round), CROSSCHECK (comma list of models whose
# outputs are compared on the same weights; default every model but cifar10).
#
# Candle and PyTorch run in ROUNDS alternating rounds (the order flips every round). The figure for
# each side is the median over the rounds of each round's median; the ratio is candle's over
# PyTorch's (the best round of each side is a second column). PyTorch is installed into bench/.venv
# from PyPI when missing (`pip install torch numpy`; ~5 GB with its CUDA wheels). The binary is built
# where cargo puts it (CARGO_TARGET_DIR and .cargo/config are honoured: the path is cargo's own
# answer). Candle's training step is timed as one threaded pass over the batch (as PyTorch runs
# its step) and, with 2+ threads, as the batch split into one shard per thread
# (`train.thread_shards`); the step as ddpm-train runs it is whichever of the two ddpm-train picks
# for the model (`ddpm_ops::thread_shards`: shards up to 20M parameters), and is the train-step of
# the ratio line, like bench/gpu.sh's train-step (ddpm-train's own step). The last two lines are
#   cpu ratio candle/pytorch, training step in one threaded pass: Z
#   cpu ratio candle/pytorch: train-step X, forward Y
# for the quickstart model (the first model when quickstart is not in MODELS), or an error line.
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'echo "bench/unet.sh: error: failed at line $LINENO (exit $?): no ratio" >&2; exit 1' ERR
MODELS=${MODELS:-quickstart,small,cifar10}
REPS=${REPS:-2}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-$(nproc)}
OPS=${OPS:-0}
CROSSCHECK=${CROSSCHECK:-$(tr ',' '\n' <<<"$MODELS" | grep -vx cifar10 | paste -sd, -)}
VENV=bench/.venv
PY=$VENV/bin/python

batch_for() {
  if [[ -n "${BATCH:-}" ]]; then echo "$BATCH"; elif [[ $1 == quickstart ]]; then echo 32; else echo 16; fi
}

source bench/lib.sh
ensure_torch "$VENV"
BIN=${BENCH_BIN:-$(build_example ddpm-unet bench_unet)}
[[ -x "$BIN" ]] || { echo "bench/unet.sh: error: no bench_unet binary at '$BIN'" >&2; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

for m in ${CROSSCHECK//,/ }; do
  echo "== cross-check $m: same weights, same input, same output"
  "$PY" bench/pytorch/unet_bench.py --export "$OUT/xc-$m.safetensors" --export-model "$m"
  "$BIN" --crosscheck "$OUT/xc-$m.safetensors" | grep -v '^RESULT'
done

run_candle() { # model batch round
  local ops=(--no-ops)
  [[ $OPS == 1 && $3 == 1 ]] && ops=()
  echo "== round $3/$ROUNDS $1: candle ($THREADS threads, batch $2)"
  RAYON_NUM_THREADS=$THREADS "$BIN" --models "$1" --batch "$2" --reps "$REPS" "${ops[@]}" \
    | sed "s/^RESULT /RESULT $3 /" | tee -a "$OUT/candle.txt" | grep -v '^RESULT'
}
run_torch() {
  local ops=(--no-ops)
  [[ $OPS == 1 && $3 == 1 ]] && ops=()
  echo "== round $3/$ROUNDS $1: pytorch ($THREADS threads, batch $2)"
  "$PY" bench/pytorch/unet_bench.py --models "$1" --batch "$2" --reps "$REPS" --threads "$THREADS" \
    "${ops[@]}" | sed "s/^RESULT /RESULT $3 /" | tee -a "$OUT/torch.txt" | grep -v '^RESULT'
}

for round in $(seq "$ROUNDS"); do
  for m in ${MODELS//,/ }; do
    b=$(batch_for "$m")
    if (( round % 2 )); then
      run_candle "$m" "$b" "$round"; run_torch "$m" "$b" "$round"
    else
      run_torch "$m" "$b" "$round"; run_candle "$m" "$b" "$round"
    fi
  done
done

echo "== ratios (candle / pytorch, median of $ROUNDS rounds; load on the machine affects both)"
python3 bench/ratios.py "$OUT/candle.txt" "$OUT/torch.txt" "$MODELS"
