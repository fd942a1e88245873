#!/usr/bin/env bash
# Sampling speed on the CPU: ddpm-sample against its PyTorch twin, same model, sampler and threads.
#
#   bash bench/sample.sh
#   ROUNDS=5 THREADS=1 bash bench/sample.sh
#
# What runs: DDIM-50 (eta 0, x0 clipped) with classifier-free guidance (w = CFG, default 1) on the
# quickstart U-Net (configs/quickstart.toml), NUM images (64) in one batch of 64, i.e. 50 forward
# passes of batch 128 (conditional and null labels). Candle: the real `ddpm-sample` binary; PyTorch:
# bench/pytorch/sample_bench.py, the same architecture and sampler. Speed does not depend on the
# weights, so the checkpoint is the quickstart model after one training step (`ddpm-train --steps 1`,
# written once to SAMPLE_CKPT, default runs/bench-sample-ckpt; it needs data/fashion-mnist-train.h5,
# converted here from the Debian dataset-fashion-mnist files as scripts/quickstart.sh does).
#
# ROUNDS (3) alternating rounds, the order flipped every round; each side's figure is the median of
# its rounds (ddpm-sample's own "seconds": sampling plus writing 64 images, after loading). Binaries
# are built where cargo puts them (CARGO_TARGET_DIR honoured). The last line is
#   cpu ratio candle/pytorch sampling: X
# (time ratio: below 1 means candle is faster), or an error line.
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'echo "bench/sample.sh: error: failed at line $LINENO (exit $?): no ratio" >&2; exit 1' ERR
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-$(nproc)}
NUM=${NUM:-64}
CFG=${CFG:-1}
STEPS=${STEPS:-50}
CKPT=${SAMPLE_CKPT:-runs/bench-sample-ckpt}
DATA=data/fashion-mnist-train.h5
VENV=bench/.venv
PY=$VENV/bin/python

source bench/lib.sh
ensure_torch "$VENV"
SAMPLE=$(build_example ddpm-sampler ddpm-sample bin)
if [[ ! -d "$CKPT/checkpoints" ]]; then
  TRAIN=$(build_example ddpm-train ddpm-train bin)
  if [[ ! -f "$DATA" ]]; then
    CONVERT=$(build_example ddpm-data ddpm-data bin)
    mkdir -p data
    "$CONVERT" convert --from fashion-mnist "${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}" \
      --split train --out "$DATA"
  fi
  echo "== checkpoint: the quickstart model after one step (ddpm-train --steps 1) in $CKPT"
  RAYON_NUM_THREADS=$THREADS "$TRAIN" --config configs/quickstart.toml --out "$CKPT" --steps 1 \
    --set preview.per_class=1 --set preview.steps=2 >/dev/null
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

run_candle() {
  echo "== round $1/$ROUNDS: candle ddpm-sample ($THREADS threads)"
  RAYON_NUM_THREADS=$THREADS "$SAMPLE" --checkpoint "$CKPT" --sampler ddim --steps "$STEPS" --cfg "$CFG" \
    --num "$NUM" --batch "$NUM" --no-grid --out "$OUT/s.h5" --seed 0 --weights model >"$OUT/c.json"
  python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print("candle: {} images in {:.2f} s, {:.3f} images/s".format(d["num_images"], d["seconds"], d["images_per_second"]))
print("RESULT {} {:.4f}".format(sys.argv[2], d["seconds"]), file=open(sys.argv[3], "a"))' "$OUT/c.json" "$1" "$OUT/candle.txt"
}
run_torch() {
  echo "== round $1/$ROUNDS: pytorch twin ($THREADS threads)"
  "$PY" bench/pytorch/sample_bench.py --num "$NUM" --steps "$STEPS" --cfg "$CFG" --threads "$THREADS" \
    | sed "s/^RESULT sample seconds /RESULT $1 /" | tee -a "$OUT/torch.txt" | grep -v '^RESULT'
}
for round in $(seq "$ROUNDS"); do
  if (( round % 2 )); then run_candle "$round"; run_torch "$round"; else run_torch "$round"; run_candle "$round"; fi
done

python3 - "$OUT/candle.txt" "$OUT/torch.txt" "$NUM" <<'PYEOF'
import statistics, sys
def rounds(path):
    return [float(l.split()[2]) for l in open(path) if l.startswith("RESULT")]
c, t, n = rounds(sys.argv[1]), rounds(sys.argv[2]), int(sys.argv[3])
if not c or len(c) != len(t):
    sys.exit("bench/sample.sh: error: missing rounds: no ratio")
mc, mt = statistics.median(c), statistics.median(t)
print("== DDIM-50 with CFG, quickstart U-Net, median of the rounds (seconds per round: "
      + " / ".join(f"{a:.2f}:{b:.2f}" for a, b in zip(c, t)) + " candle:pytorch)")
print(f"  candle {n / mc:.3f} images/s ({mc:.2f} s), pytorch {n / mt:.3f} images/s ({mt:.2f} s); "
      f"best rounds ratio {min(c) / min(t):.2f}")
print(f"cpu ratio candle/pytorch sampling: {mc / mt:.2f}")
PYEOF
