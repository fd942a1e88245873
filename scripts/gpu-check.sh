#!/usr/bin/env bash
# The single-GPU smoke test (ddpm-gpu-selftest): pack it here, run it on a GPU machine.
#
#   scripts/gpu-check.sh pack         build the self-test with --features cuda (CUDA 13 toolchain from
#                                     scripts/cuda-toolchain.sh, no GPU needed), strip it and xz it into
#                                     .gpu/pack/ (gitignored, ~6 MB), and print how to run it.
#   scripts/gpu-check.sh run [ARGS]   on the GPU machine, from the repo root with .gpu/pack copied over:
#                                     unpack, put the CUDA 13 libraries on LD_LIBRARY_PATH and run
#                                     `ddpm-gpu-selftest ARGS` (e.g. --quick). Exit status is the self-test's.
#   scripts/gpu-check.sh all [ARGS]   both (a machine that builds and has a GPU, e.g. CI with a GPU).
# GPU_CHECK_NO_BUILD=1 packs the binary already in target-cuda/debug without building.
#
# The GPU machine needs the NVIDIA driver (libcuda.so.1) and the CUDA 13 runtime libraries the binary links
# (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libnccl.so.2),
# either from Python wheels (nvidia-cuda-runtime, nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc,
# nvidia-nccl-cu13; found through `python3 -c 'import nvidia'`), from .gpu/ of this script's toolchain, or
# from directories listed in GPU_LIB_DIRS. No Rust toolchain, MPI or HDF5 is needed there.
# With $OUT set (the device tool), the log and the result table are also written to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PACK=$REPO/.gpu/pack
BIN=ddpm-gpu-selftest

pack() {
  if [ "${GPU_CHECK_NO_BUILD:-0}" != 1 ]; then
    bash scripts/cuda-toolchain.sh
    # shellcheck disable=SC1091
    source .gpu/env.sh
    cargo build --target-dir target-cuda -p ddpm-gpu-selftest --features cuda
  fi
  mkdir -p "$PACK"
  local exe=target-cuda/debug/$BIN
  strip -o "$PACK/$BIN" "$exe"
  echo "gpu-check: needs at run time:"
  readelf -d "$PACK/$BIN" | awk '/NEEDED/ {print "  " $NF}'
  echo "  newest glibc symbol: $(objdump -T "$PACK/$BIN" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)"
  xz -T0 -6 -f "$PACK/$BIN"
  (cd "$PACK" && sha256sum "$BIN.xz" > "$BIN.xz.sha256")
  echo "gpu-check: packed $PACK/$BIN.xz ($(du -h "$PACK/$BIN.xz" | cut -f1))"
  echo "gpu-check: on the GPU machine, from the repo root with .gpu/pack present: bash scripts/gpu-check.sh run"
}

# Directories holding the CUDA 13 runtime libraries, one per line.
lib_dirs() {
  if [ -n "${GPU_LIB_DIRS:-}" ]; then tr ':' '\n' <<< "$GPU_LIB_DIRS"; fi
  for py in python3 /opt/torch/.venv/bin/python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    "$py" - <<'EOF' 2>/dev/null || true
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
for root in list(nvidia.__path__):
    for d in sorted(glob.glob(os.path.join(root, "*", "lib"))):
        if glob.glob(os.path.join(d, "*.so*")):
            print(d)
EOF
  done
  # This repo's build toolchain (real libraries; never its stubs/ directory, whose libcuda is a fake).
  [ -d "$REPO/.gpu/cuda/lib64" ] && echo "$REPO/.gpu/cuda/lib64"
  # The driver, where containers mount it.
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do [ -d "$d" ] && echo "$d"; done
  true
}

run() {
  [ -f "$PACK/$BIN.xz" ] || { echo "gpu-check: $PACK/$BIN.xz missing: run 'scripts/gpu-check.sh pack' on the build machine first" >&2; exit 3; }
  (cd "$PACK" && sha256sum -c --quiet "$BIN.xz.sha256")
  local work
  work=$(mktemp -d /tmp/ddpm-gpu-check.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  xz -dc "$PACK/$BIN.xz" > "$work/$BIN"
  chmod +x "$work/$BIN"
  local dirs
  dirs=$(lib_dirs | awk '!seen[$0]++' | paste -sd: -)
  # cudarc's run-time loader looks for libnccl.so, not libnccl.so.2: give it one.
  mkdir -p "$work/lib"
  local nccl
  nccl=$(IFS=:; for d in $dirs; do ls "$d"/libnccl.so.2 2>/dev/null; done | head -n 1 || true)
  [ -n "$nccl" ] && ln -sf "$nccl" "$work/lib/libnccl.so"
  export LD_LIBRARY_PATH="$work/lib:$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L || true
  if ldd "$work/$BIN" | grep -q 'not found'; then
    echo "gpu-check: missing libraries:" >&2
    ldd "$work/$BIN" | grep 'not found' >&2
    exit 3
  fi
  local status=0
  if [ -n "${OUT:-}" ]; then
    set +e
    "$work/$BIN" --markdown "$OUT/selftest.md" "$@" 2>&1 | tee "$OUT/selftest.log"
    status=${PIPESTATUS[0]}
    set -e
  else
    "$work/$BIN" "$@" || status=$?
  fi
  echo "gpu-check: ddpm-gpu-selftest exited with $status"
  return "$status"
}

cmd=${1:-pack}
shift || true
case "$cmd" in
  pack) pack ;;
  run) run "$@" ;;
  all) pack; run "$@" ;;
  *) echo "usage: $0 pack | run [ARGS] | all [ARGS]" >&2; exit 2 ;;
esac
