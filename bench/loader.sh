#!/usr/bin/env bash
# Loader throughput on Fashion-MNIST (train split), images/s per rank.
#
#   bench/loader.sh [--world W] [--batch B] [--seconds S] [--train-images-per-s X] [--no-flip]
#
# X is what one rank's training consumes per second in the default configuration
# (per-rank batch / seconds per step, measured by the training bench); with it the bench prints
# loader/training and PASS when the ratio is at least 50.
# Environment: FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist), BENCH_DATA_DIR (default target/bench-data).
set -euo pipefail
cd "$(dirname "$0")/.."
FM="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
DATA="${BENCH_DATA_DIR:-target/bench-data}"
mkdir -p "$DATA"
# Absolute: cargo runs benches from the package directory.
H5="$(cd "$DATA" && pwd)/fashion-mnist-train.h5"
cargo build --release -q -p ddpm-data --bin ddpm-data
if [ ! -f "$H5" ]; then
  ./target/release/ddpm-data convert --from fashion-mnist "$FM" --split train --out "$H5"
fi
cargo bench -q -p ddpm-data --bench loader -- --file "$H5" "$@"
