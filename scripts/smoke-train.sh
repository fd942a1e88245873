#!/usr/bin/env bash
# Training smoke run for CI: the quickstart model on real Fashion-MNIST for a few steps through the
# ddpm-train binary (the same code path as the main job), failing unless the logged loss falls.
#
#   scripts/smoke-train.sh [STEPS]      (default 60; logs every 10 steps)
#
# Uses the dev profile that `cargo test` already built (optimised, see Cargo.toml), so it adds no
# release build. Converts Fashion-MNIST from the dataset-fashion-mnist package if not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-60}
DATA=data/fashion-mnist-train.h5
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

cargo build -q -p ddpm-data -p ddpm-train
if [ ! -f "$DATA" ]; then
  mkdir -p data
  target/debug/ddpm-data convert --from fashion-mnist "${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}" \
    --split train --out "$DATA"
fi
start=$(date +%s)
RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(nproc)} target/debug/ddpm-train --config configs/quickstart.toml \
  --no-progress --steps "$STEPS" --out "$OUT/run" --set schedule.log_every=10 >"$OUT/log" 2>&1 || {
  cat "$OUT/log"
  echo "smoke-train: ddpm-train failed" >&2
  exit 1
}
python3 - "$OUT/run/metrics.jsonl" "$(( $(date +%s) - start ))" <<'PY'
import json, math, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
losses = [l["loss"] for l in lines]
print("smoke-train: loss every 10 steps:", " ".join(f"{x:.4f}" for x in losses), f"({sys.argv[2]} s)")
if len(losses) < 3 or not all(isinstance(x, float) and math.isfinite(x) for x in losses):
    sys.exit("smoke-train: FAILED: missing or non-finite losses")
if any(l["skipped_steps"] for l in lines):
    sys.exit("smoke-train: FAILED: skipped (non-finite) steps")
first, last = losses[0], sum(losses[-2:]) / 2
if not last < 0.8 * first:
    sys.exit(f"smoke-train: FAILED: loss did not fall (first window {first:.4f}, last two {last:.4f})")
print(f"smoke-train: ok, loss {first:.4f} -> {last:.4f}")
PY
test -s "$OUT/run/samples.png" || { echo "smoke-train: FAILED: no sample grid written" >&2; exit 1; }
