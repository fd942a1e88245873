#!/usr/bin/env bash
# The main job: set up a fresh machine, convert Fashion-MNIST, train configs/quickstart.toml and
# write an EMA sample grid (one row per class) and a loss plot. 2-12 minutes of training on 2 CPU
# cores depending on the CPU (README), plus the first release build (~6 minutes on 2 cores).
#
#   scripts/quickstart.sh                 # everything
#   QUICKSTART_OUT=runs/qs2 scripts/quickstart.sh --set optim.lr=1e-3   # extra args go to ddpm-train
#
# Re-running continues an interrupted run (--resume auto); a finished run is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${QUICKSTART_OUT:-runs/quickstart}"
DATA="data/fashion-mnist-train.h5"
FMNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"

scripts/setup.sh

echo "quickstart: building (release)"
cargo build --release -p ddpm-data -p ddpm-train

if [ ! -f "$DATA" ]; then
  echo "quickstart: converting Fashion-MNIST from $FMNIST_DIR"
  mkdir -p data
  ./target/release/ddpm-data convert --from fashion-mnist "$FMNIST_DIR" --split train --out "$DATA"
fi

./target/release/ddpm-train inspect-model --config configs/quickstart.toml | grep "^parameters"

# Threads: all cores by default, also on a machine busy with other work (bench/contention.sh: beside
# a CPU-bound process the default still trains faster than 1 thread).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
echo "quickstart: RAYON_NUM_THREADS=$RAYON_NUM_THREADS"
start=$(date +%s)
./target/release/ddpm-train --config configs/quickstart.toml --out "$OUT" --resume auto "$@"
end=$(date +%s)

echo
echo "quickstart: trained in $((end - start)) s"
echo "quickstart: sample grid (EMA weights, DDIM, one row per class): $OUT/samples.png"
echo "quickstart: loss curve:                                        $OUT/loss.png"
echo "quickstart: metrics:                                           $OUT/metrics.jsonl"
echo "quickstart: checkpoints:                                       $OUT/checkpoints/"
