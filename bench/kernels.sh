#!/usr/bin/env bash
# Fused vs unfused noising / sampler step on the CPU (ratio measured in the same run; ~10 s plus the build).
# GPU numbers (fused kernel GB/s vs a device-to-device copy) come from the GPU self-test: scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_MS=${BENCH_MS:-800} cargo bench -p ddpm-kernels --bench noising
