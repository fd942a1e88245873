#!/usr/bin/env bash
# Fused vs unfused noising / sampler step on the CPU, one thread and all threads (ratios measured in the
# same run; ~20 s plus the release build). Wall time and process CPU time are both reported: on a shared
# machine the CPU-time ratio is the steadier figure.
# GPU numbers (fused kernel GB/s vs a device-to-device copy) come from the GPU self-test:
# scripts/gpu-check.sh (see bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p ddpm-kernels --bench noising --no-run
for threads in 1 0; do
  if [ "$threads" = 0 ]; then unset RAYON_NUM_THREADS; else export RAYON_NUM_THREADS=$threads; fi
  BENCH_MS=${BENCH_MS:-800} cargo bench -q -p ddpm-kernels --bench noising
done
