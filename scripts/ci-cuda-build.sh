#!/usr/bin/env bash
# CI: type-checks and links the GPU code (feature `cuda`) on a machine without a GPU, so it cannot rot.
#
# Installs the CUDA 13.0 build toolchain from pinned PyPI wheels into .gpu/ (scripts/cuda-toolchain.sh;
# skipped when present), then builds, in target-cuda/ (kept apart from the CPU target dir):
#   - ddpm-kernels and ddpm-gpu-selftest with `cuda`, and
#   - every other workspace member that declares a `cuda` feature, with it,
#   - ddpm-train and ddpm-sampler with `cudnn` (type-checked only),
# then checks with cuobjdump that the ddpm-kernels fatbin holds sm_80/86/89/90 machine code and compute_90
# PTX (scripts/check-fatbin.sh).
# A clean build takes ~17 minutes on 2 cores (candle's CUDA kernels are most of it); an incremental one
# about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/cuda-toolchain.sh
# shellcheck disable=SC1091
source .gpu/env.sh

# Workspace members with a `cuda` feature, as `pkg/cuda` feature specs.
mapfile -t specs < <(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
m = json.load(sys.stdin)
members = set(m["workspace_members"])
for p in m["packages"]:
    if p["id"] in members and "cuda" in p["features"]:
        print(p["name"])
')
for need in ddpm-kernels ddpm-gpu-selftest; do
  printf '%s\n' "${specs[@]}" | grep -qx "$need" || { echo "ci-cuda-build: $need has no cuda feature" >&2; exit 1; }
done

args=()
features=()
for p in "${specs[@]}"; do
  args+=(-p "$p")
  features+=("$p/cuda")
done
echo "ci-cuda-build: building ${specs[*]} with feature cuda"
features_csv=$(IFS=,; echo "${features[*]}")
time cargo build --target-dir target-cuda "${args[@]}" --features "$features_csv"
bash scripts/check-fatbin.sh target-cuda
# The switchable cuDNN variant (feature `cudnn`: candle's cuDNN forward convolutions). cudarc loads
# libcudnn at run time, so no cuDNN is needed here; `check` type-checks candle's cuDNN paths without
# replacing the plain cuda binaries in target-cuda/debug that scripts/gpu-check.sh packs.
echo "ci-cuda-build: checking ddpm-train and ddpm-sampler with feature cudnn"
time cargo check --target-dir target-cuda -p ddpm-train -p ddpm-sampler --bins \
  --features ddpm-train/cudnn,ddpm-sampler/cudnn
echo "ci-cuda-build: ok (GPU code type-checked and linked, fatbin images checked; nothing was run: no GPU needed here)"
