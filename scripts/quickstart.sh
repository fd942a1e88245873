#!/usr/bin/env bash
# The main job: set up a fresh machine, convert Fashion-MNIST, train configs/quickstart.toml and
# write an EMA sample grid (one row per class) and a loss plot. About 10 minutes of training on
# 2 CPU cores, plus the first release build (~10-25 minutes on 2 cores).
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

# Threads: all cores by default. On a machine busy with other work, RAYON_NUM_THREADS=1 is faster:
# candle 0.11's CPU thread pool pins its workers and spin-waits on them, which collapses when another
# process holds a core (measured here under load: 1 thread ~35 images/s, 2 threads ~16 images/s).
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
