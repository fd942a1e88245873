#!/usr/bin/env bash
# CPU benchmark of the ddpm-unet U-Net against the same architecture in PyTorch, measured in one run.
#
#   bash bench/unet.sh                 # 9M model (base 64) and Ho et al.'s 35.7M model, batch 16, 32x32
#   MODELS=small REPS=3 bash bench/unet.sh
#
# Environment: BENCH_BIN (use this prebuilt bench_unet instead of building it), MODELS (comma list of small,cifar10; default both), BATCH (16), REPS (median of N after a
# warm-up; 2), ROUNDS (3), THREADS (both frameworks; default: all cores). Candle and PyTorch run in
# ROUNDS alternating rounds and each figure is the best round's median: other load on a shared
# machine only ever adds time, and alternating exposes both frameworks to it alike. The per-op
# breakdowns run in the first round only. PyTorch is installed into bench/.venv from
# PyPI when missing (`pip install torch numpy`; ~5 GB with its CUDA wheels). The last line is
#   cpu ratio candle/pytorch: train-step X, forward Y
# for the first model. Before timing, a cross-check runs both implementations on the same weights and
# requires the same output (the models are the same architecture with the same parameter names).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-small,cifar10}
BATCH=${BATCH:-16}
REPS=${REPS:-2}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-$(nproc)}
VENV=bench/.venv
PY=$VENV/bin/python

if ! "$PY" -c "import torch, numpy" 2>/dev/null; then
  echo "== installing PyTorch (CPU use) into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch numpy
fi

if [[ -n "${BENCH_BIN:-}" ]]; then
  BIN=$BENCH_BIN # a bench_unet binary built earlier
else
  echo "== building the candle bench (release)"
  cargo build --release --quiet -p ddpm-unet --example bench_unet
  BIN=target/release/examples/bench_unet
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

echo "== cross-check: same weights, same input, same output"
"$PY" bench/pytorch/unet_bench.py --export "$OUT/xc.safetensors" --export-model small
"$BIN" --crosscheck "$OUT/xc.safetensors" | grep -v '^RESULT'

for round in $(seq "$ROUNDS"); do
  ops=()
  [[ $round -gt 1 ]] && ops=(--no-ops)
  echo "== round $round/$ROUNDS: candle ($THREADS threads)"
  RAYON_NUM_THREADS=$THREADS "$BIN" --models "$MODELS" --batch "$BATCH" --reps "$REPS" "${ops[@]}" \
    | tee -a "$OUT/candle.txt" | grep -v '^RESULT'
  echo "== round $round/$ROUNDS: pytorch ($THREADS threads)"
  "$PY" bench/pytorch/unet_bench.py --models "$MODELS" --batch "$BATCH" --reps "$REPS" --threads "$THREADS" \
    "${ops[@]}" | tee -a "$OUT/torch.txt" | grep -v '^RESULT'
done

echo "== ratios (candle / pytorch, batch $BATCH, best of $ROUNDS rounds; load on the machine affects both)"
python3 - "$OUT/candle.txt" "$OUT/torch.txt" "$MODELS" <<'PYEOF'
import sys
def parse(path):
    # Best (smallest) value over the rounds, per entry.
    r = {}
    for line in open(path):
        p = line.split()
        if p and p[0] == "RESULT":
            v = [float(x) for x in p[3:]]
            old = r.get((p[1], p[2]))
            r[(p[1], p[2])] = v if old is None else [min(a, b) for a, b in zip(old, v)]
    return r
c, t = parse(sys.argv[1]), parse(sys.argv[2])
models = sys.argv[3].split(",")
for m in models:
    if c[(m, "params")] != t[(m, "params")]:
        sys.exit(f"{m}: parameter counts differ: candle {c[(m, 'params')][0]:.0f}, pytorch {t[(m, 'params')][0]:.0f}")
    print(f"{m}: {c[(m, 'params')][0]:.0f} parameters in both")
    for k in ("forward", "train"):
        print(f"  {k:8s} candle {c[(m, k)][0]:9.1f} ms  pytorch {t[(m, k)][0]:9.1f} ms  ratio {c[(m, k)][0] / t[(m, k)][0]:.2f}")
key = ("small", "conv_64_64_k3_s1_32")
if key in c and key in t:
    names = ("fwd", "dX", "dW")
    print("  conv 64->64 3x3 32x32: " + ", ".join(
        f"{n} {a:.1f}/{b:.1f} ms ({a / b:.1f}x)" for n, a, b in zip(names, c[key], t[key])))
m = models[0]
print(f"cpu ratio candle/pytorch: train-step {c[(m, 'train')][0] / t[(m, 'train')][0]:.2f}, "
      f"forward {c[(m, 'forward')][0] / t[(m, 'forward')][0]:.2f}")
PYEOF
