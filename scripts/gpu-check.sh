#!/usr/bin/env bash
# The one-GPU check of what users run: pack it here (no GPU), run it on a GPU machine (no build there).
#
#   scripts/gpu-check.sh pack   builds ddpm-train, ddpm-sample and ddpm-gpu-selftest with feature `cuda` and
#                               without MPI (CUDA 13 toolchain from scripts/cuda-toolchain.sh, target-cuda/),
#                               produces the CPU references with the *same* binaries (--device cpu), and
#                               writes .gpu/pack/ (gitignored; its size is printed; the device tool carries
#                               at most 64 MiB).
#   scripts/gpu-check.sh run    on the GPU machine, from the repo root with .gpu/pack present: runs the
#                               checks below, one summary line each, and ends with
#                               `gpu-check: P passed, F failed` (exit status 0 only if F = 0 and all ran).
#   scripts/gpu-check.sh all    both.
#
# The checks (about 2-4 minutes on an H100-class GPU; every step has its own timeout, 8 minutes in all):
#   selftest     ddpm-gpu-selftest --quick: fused noising/sampler kernels against the CPU bit for bit,
#                a small U-Net's GPU vs CPU losses, NCCL at world size 1 through ddpm-dist's GradientSync,
#                and the bandwidth table (fused kernels vs a device-to-device copy). One line per check.
#   train        ddpm-train --device cuda on configs/quickstart.toml (data: 2048 Fashion-MNIST test images,
#                packed) for 2N steps: every step's loss against the CPU run of the same binary from the
#                same initial weights and batches. Tolerances: step 1 relative 1e-4 (only the summation
#                order of convolutions and matmuls differs), every step 5e-3 (the difference also travels
#                through AdamW).
#   resume       N steps, then --resume auto to 2N, on the GPU: metrics and the final checkpoint (weights,
#                EMA, AdamW moments, RNG and loader state: every file's sha256) identical to the
#                uninterrupted GPU run.
#   bf16         the train run again with train.precision = "bf16": every step's loss within 2% of the
#                GPU's f32 run (crates/train/tests/precision.rs measured at most 0.5% on the CPU).
#   sample-ddim  ddpm-sample --device cuda, DDIM 20 steps, classifier-free guidance w=1.5, from the packed
#   sample-dpm   CPU checkpoint and DPM-Solver++(2M) 10 steps, w=1.5; the same x_T noise as the packed CPU
#                samples (Philox, bit-identical on both). uint8 images: mean |difference| <= 0.5 grey
#                levels and at most 0.5% of the pixels off by more than 8 levels.
#
# Environment of `run`: the NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries the binaries link
# (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libnccl.so.2)
# from Python wheels (nvidia-cuda-runtime, nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc,
# nvidia-nccl-cu13: found through `python3 -c 'import nvidia'`), .gpu/cuda of the toolchain, or
# GPU_LIB_DIRS. HDF5 and its dependencies travel in the pack (lib/). No Rust, MPI or HDF5 install needed;
# python3 with numpy and h5py compares the images (the PyTorch image of the device tool has them).
# With $OUT set (the device tool), the full log and the self-test's markdown are written there.
#
# GPU_CHECK_CUDNN=1 packs binaries built with candle's cuDNN convolutions (feature `cudnn`) instead; the
# GPU machine then needs libcudnn.so.9 too (the nvidia-cudnn-cu13 wheel, which PyTorch's CUDA wheels pull).
#
# GPU_CHECK_DRY_RUN=1 rehearses both halves on a machine without a GPU: `pack` takes the CPU build in
# target/debug (no CUDA build, no fatbin check) and `run` passes --device cpu where it would pass cuda
# (the self-test then fails: it needs a GPU). It checks this script, not the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PACK=$REPO/.gpu/pack
BINS=(ddpm-train ddpm-sample ddpm-gpu-selftest bench_unet)  # bench_unet: for bench/gpu.sh
N=${GPU_CHECK_STEPS:-10}           # half the training steps (resume splits at N)
DRY=${GPU_CHECK_DRY_RUN:-0}
DEV=cuda
if [ "$DRY" = 1 ]; then DEV=cpu; fi
SAMPLE_ARGS=(--per-class 2 --cfg 1.5 --batch 20 --seed 7 --no-grid)

# Libraries the device provides itself (driver, CUDA 13 wheels, glibc and the C/C++ runtime: glibc parts
# such as libresolv only work with their own libc): never bundled.
SYSTEM_LIBS='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libresolv|libnsl|libutil|libanl|libgcc_s|libstdc\+\+|libcuda|libcudart|libcublas|libcublasLt|libcurand|libnvrtc|libnccl)\.'

# train_args OUTDIR STEPS DEVICE [extra ddpm-train args...] sets TA: the quickstart config on the packed
# data, one metrics line per step, a checkpoint every N steps, a cheap end-of-run preview.
train_args() {
  local out=$1 steps=$2 device=$3
  shift 3
  TA=(--config "$REF/quickstart.toml" --out "$out" --steps "$steps" --device "$device" --no-progress
    --set "data.path=\"$REF/data.h5\"" --set schedule.log_every=1 --set "schedule.checkpoint_every=$N"
    --set schedule.keep_checkpoints=4 --set preview.per_class=1 --set preview.steps=2 "$@")
}

pack() {
  bash scripts/cuda-toolchain.sh
  # shellcheck disable=SC1091
  source .gpu/env.sh
  local T=target-cuda/debug
  # GPU_CHECK_CUDNN=1: candle's cuDNN convolutions (needs libcudnn.so.9 on the GPU machine)
  local cudnn=""
  [ "${GPU_CHECK_CUDNN:-0}" = 1 ] && cudnn=,ddpm-train/cudnn,ddpm-sampler/cudnn,ddpm-unet/cudnn
  if [ "$DRY" = 1 ]; then
    T=target/debug
  elif [ "${GPU_CHECK_NO_BUILD:-0}" != 1 ]; then
    cargo build --target-dir target-cuda -p ddpm-train -p ddpm-sampler -p ddpm-gpu-selftest -p ddpm-data \
      -p ddpm-unet --bins --example bench_unet --no-default-features \
      --features ddpm-train/cuda,ddpm-sampler/cuda,ddpm-gpu-selftest/cuda,ddpm-unet/cuda${cudnn}
  fi
  [ "$DRY" = 1 ] || bash scripts/check-fatbin.sh target-cuda
  rm -rf "$PACK"
  mkdir -p "$PACK/bin" "$PACK/lib" "$PACK/ref"
  REF=$PACK/ref
  # The binaries run here too (CPU references), with the toolchain's real CUDA libraries and the stub
  # libcuda (never called on --device cpu).
  export LD_LIBRARY_PATH=$REPO/.gpu/cuda/lib64:$REPO/.gpu/cuda/lib64/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  for b in "${BINS[@]}"; do
    local exe=$T/$b
    [ -f "$exe" ] || exe=$T/examples/$b
    strip -o "$PACK/bin/$b" "$exe"
  done
  echo "gpu-check: libraries bundled in the pack (the rest the GPU machine provides):"
  for b in "${BINS[@]}"; do ldd "$PACK/bin/$b"; done | awk '$3 ~ /^\// {print $1, $3}' | sort -u |
    while read -r name path; do
      if ! grep -Eq "$SYSTEM_LIBS" <<< "$name"; then cp -L "$path" "$PACK/lib/$name"; echo "  $name"; fi
    done
  echo "gpu-check: newest glibc symbol: $(for b in "${BINS[@]}"; do objdump -T "$PACK/bin/$b"; done |
    grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)"

  # Data: the first 2048 Fashion-MNIST test images, through ddpm-data's own converter.
  local fm=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist} tmp
  tmp=$(mktemp -d)
  python3 - "$fm" "$tmp" 2048 <<'EOF'
import gzip, struct, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for kind, hdr in (("images", 16), ("labels", 8)):
    with gzip.open(f"{src}/t10k-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz") as f:
        data = f.read()
    head = bytearray(data[:hdr])
    head[4:8] = struct.pack(">I", n)
    item = 28 * 28 if kind == "images" else 1
    with open(f"{dst}/{kind}.idx", "wb") as f:
        f.write(bytes(head) + data[hdr:hdr + n * item])
EOF
  "$T/ddpm-data" convert --from mnist-idx --images "$tmp/images.idx" --labels "$tmp/labels.idx" \
    --class-names T-shirt,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle-boot --out "$REF/data.h5"
  # bench/gpu.sh: 512 random 32x32 RGB images in 10 classes (CIFAR-10's shape; speed only).
  python3 - "$tmp/cifar" 512 <<'EOF'
import os, random, struct, sys, zlib
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
for i in range(n):
    d = f"{root}/class{i % 10}"
    os.makedirs(d, exist_ok=True)
    rows = b"".join(b"\0" + bytes(rng.getrandbits(8) for _ in range(96)) for _ in range(32))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    with open(f"{d}/{i:04d}.png", "wb") as f:
        f.write(png)
EOF
  "$T/ddpm-data" convert --from folder "$tmp/cifar" --resolution 32 --out "$REF/cifar-synth.h5"
  rm -rf "$tmp"
  cp configs/quickstart.toml "$REF/quickstart.toml"
  cp configs/cifar10.toml "$REF/cifar10.toml"
  cp scripts/gpu_compare.py "$PACK/gpu_compare.py"

  # CPU references, from the same binaries.
  local work
  work=$(mktemp -d)
  train_args "$work/cpu" $((2 * N)) cpu
  "$PACK/bin/ddpm-train" "${TA[@]}"
  cp "$work/cpu/metrics.jsonl" "$REF/cpu-metrics.jsonl"
  local ck
  ck=$work/cpu/checkpoints/step_$(printf '%09d' $((2 * N)))
  mkdir -p "$REF/checkpoint"
  # The sampler reads the manifest and the weights it loads; the AdamW moments stay behind (size).
  for f in "$ck"/manifest.json "$ck"/model.safetensors "$ck"/ema_*.safetensors; do cp "$f" "$REF/checkpoint/"; done
  "$PACK/bin/ddpm-sample" --checkpoint "$REF/checkpoint" --device cpu --sampler ddim --steps 20 "${SAMPLE_ARGS[@]}" \
    --out "$REF/cpu-ddim.h5"
  "$PACK/bin/ddpm-sample" --checkpoint "$REF/checkpoint" --device cpu --sampler dpm-solver --steps 10 "${SAMPLE_ARGS[@]}" \
    --out "$REF/cpu-dpm.h5"
  rm -rf "$work"
  # The image comparison must pass on identical inputs and fail on different ones (DDIM vs DPM-Solver++
  # images of the same noise), or it checks nothing. Needs numpy + h5py here (.gpu/venv has them).
  local vpy=.gpu/venv/bin/python
  [ -x "$vpy" ] && "$vpy" -c 'import numpy, h5py' 2>/dev/null || vpy=python3
  "$vpy" scripts/gpu_compare.py images "$REF/cpu-ddim.h5" "$REF/cpu-ddim.h5" 0.5 8 0.005
  if "$vpy" scripts/gpu_compare.py images "$REF/cpu-ddim.h5" "$REF/cpu-dpm.h5" 0.5 8 0.005; then
    echo "gpu-check: the image comparison does not tell DDIM from DPM-Solver++ samples apart" >&2
    exit 1
  fi

  (cd "$PACK" && tar -cf - bin lib | xz -T0 -6 > pack.tar.xz && rm -rf bin lib)
  {
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- crates scripts || echo ' (+ uncommitted changes)')"
    echo "packed $(date -u +%FT%TZ) on $(uname -n)"
    echo "candle kernels: PTX for compute_${CUDA_COMPUTE_CAP} (JIT); ddpm-kernels fatbin: see check-fatbin above"
    echo "steps N=$N"
    if [ "$DRY" = 1 ]; then echo "DRY RUN: CPU binaries from target/debug, not a GPU pack"; fi
  } > "$PACK/INFO"
  (cd "$PACK" && find . -type f ! -name SHA256SUMS -print0 | sort -z | xargs -0 sha256sum > SHA256SUMS)
  echo "gpu-check: pack $(du -sh "$PACK" | cut -f1) in $PACK:"
  (cd "$PACK" && du -ah . | sort -k2)
  echo "gpu-check: device tool: run with carry [\".gpu/pack\"] and command 'bash scripts/gpu-check.sh run'"
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
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do [ -d "$d" ] && echo "$d"; done
  true
}

PASSED=0 FAILED=0
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # the whole run stays under 8 minutes
# check NAME TIMEOUT_S COMMAND...: runs it (within what is left of BUDGET_S), prints
# `[PASS|FAIL] NAME: <last line of its output>`.
check() {
  local name=$1 limit=$2
  shift 2
  local log=$WORK/$name.log st=0 left=$((T0 + BUDGET_S - $(date +%s)))
  if [ "$left" -lt 5 ]; then
    FAILED=$((FAILED + 1)); echo "[FAIL] $name: not run, the ${BUDGET_S}s budget is spent"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "--- $name: $*" >> "$WORK/all.log"
  timeout "$limit" "$@" > "$log" 2>&1 || st=$?
  cat "$log" >> "$WORK/all.log"
  local last
  last=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-400)
  if [ "$st" = 0 ]; then
    PASSED=$((PASSED + 1)); echo "[PASS] $name: $last"
  else
    FAILED=$((FAILED + 1))
    [ "$st" = 124 ] && last="timed out after ${limit}s; $last"
    echo "[FAIL] $name (exit $st): $last"
  fi
}

run() {
  [ -f "$PACK/pack.tar.xz" ] || { echo "gpu-check: $PACK/pack.tar.xz missing: run 'scripts/gpu-check.sh pack' on the build machine first" >&2; exit 3; }
  T0=$(date +%s)
  (cd "$PACK" && sha256sum -c --quiet SHA256SUMS) || { echo "gpu-check: pack damaged" >&2; exit 3; }
  if grep -q '^DRY RUN' "$PACK/INFO" && [ "$DRY" != 1 ]; then
    echo "gpu-check: $PACK is a dry-run pack (CPU binaries): run 'scripts/gpu-check.sh pack' first" >&2
    exit 3
  fi
  WORK=$(mktemp -d /tmp/ddpm-gpu-check.XXXXXX)
  REF=$PACK/ref
  xz -dc "$PACK/pack.tar.xz" | tar -xf - -C "$WORK"
  local B=$WORK/bin dirs
  dirs=$(lib_dirs | awk '!seen[$0]++' | paste -sd: -)
  # cudarc's run-time loader looks for libnccl.so, not libnccl.so.2: give it one.
  local nccl
  nccl=$(IFS=:; for d in $dirs; do ls "$d"/libnccl.so.2 2>/dev/null; done | head -n 1 || true)
  [ -n "$nccl" ] && ln -sf "$nccl" "$WORK/lib/libnccl.so"
  export LD_LIBRARY_PATH="$WORK/lib:$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  cat "$PACK/INFO"
  echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader || true; else echo "gpu-check: no nvidia-smi"; fi
  local missing
  missing=$(for b in "${BINS[@]}"; do ldd "$B/$b" | grep 'not found'; done | sort -u || true)
  if [ -n "$missing" ]; then echo "gpu-check: missing libraries: $missing" >&2; exit 3; fi
  # A python3 with numpy and h5py for the image comparison: the device image's, else this repo's
  # toolchain venv (a dry run here), else plain python3 (the image checks then fail, saying why).
  local py=python3
  for p in /opt/torch/.venv/bin/python3 "$REPO/.gpu/venv/bin/python"; do
    if [ -x "$p" ] && "$p" -c 'import numpy, h5py' 2>/dev/null; then py=$p; break; fi
  done
  local cmp=("$py" "$PACK/gpu_compare.py")

  # 1. self-test: one summary line per check it makes.
  local st=0
  timeout 200 "$B/ddpm-gpu-selftest" --quick --markdown "$WORK/selftest.md" > "$WORK/selftest.log" 2>&1 || st=$?
  cat "$WORK/selftest.log" >> "$WORK/all.log"
  local n=0
  while read -r line; do
    n=$((n + 1))
    case "$line" in
      "[PASS]"*) PASSED=$((PASSED + 1)); echo "[PASS] selftest: ${line#\[PASS\] }" | cut -c1-400 ;;
      "[FAIL]"*) FAILED=$((FAILED + 1)); echo "[FAIL] selftest: ${line#\[FAIL\] }" | cut -c1-400 ;;
    esac
  done < <(grep -E '^\[(PASS|FAIL)\]' "$WORK/selftest.log")
  if [ "$st" != 0 ] && [ "$st" != 1 ] || [ "$n" = 0 ]; then
    FAILED=$((FAILED + 1)); echo "[FAIL] selftest (exit $st): $(tail -n 1 "$WORK/selftest.log" | cut -c1-400)"
  fi
  [ -f "$WORK/selftest.md" ] && sed -n '/^| what/,$p' "$WORK/selftest.md"

  # 2. training on the GPU against the CPU reference; 3. exact resume on the GPU.
  train_args "$WORK/full" $((2 * N)) "$DEV"
  check train-gpu 180 "$B/ddpm-train" "${TA[@]}"
  check train-vs-cpu 30 "${cmp[@]}" losses "$REF/cpu-metrics.jsonl" "$WORK/full/metrics.jsonl" 1e-4 5e-3
  train_args "$WORK/split" "$N" "$DEV"
  check resume-first-half 120 "$B/ddpm-train" "${TA[@]}"
  train_args "$WORK/split" $((2 * N)) "$DEV" --resume auto
  check resume-second-half 120 "$B/ddpm-train" "${TA[@]}"
  local last
  last=step_$(printf '%09d' $((2 * N)))
  check resume-metrics-exact 30 "${cmp[@]}" metrics "$WORK/full/metrics.jsonl" "$WORK/split/metrics.jsonl"
  check resume-checkpoint-exact 30 "${cmp[@]}" checkpoints "$WORK/full/checkpoints/$last" "$WORK/split/checkpoints/$last"
  # mixed precision against the GPU's own f32 run (the CPU test's bound: every step within 2%)
  train_args "$WORK/bf16" $((2 * N)) "$DEV" --set 'train.precision="bf16"'
  check train-bf16-gpu 180 "$B/ddpm-train" "${TA[@]}"
  check train-bf16-vs-f32 30 "${cmp[@]}" losses "$WORK/full/metrics.jsonl" "$WORK/bf16/metrics.jsonl" 2e-2 2e-2

  # 4. sampling on the GPU against the CPU samples from the same checkpoint and noise.
  check sample-ddim-gpu 120 "$B/ddpm-sample" --checkpoint "$REF/checkpoint" --device "$DEV" --sampler ddim --steps 20 \
    "${SAMPLE_ARGS[@]}" --out "$WORK/gpu-ddim.h5"
  check sample-ddim-vs-cpu 30 "${cmp[@]}" images "$REF/cpu-ddim.h5" "$WORK/gpu-ddim.h5" 0.5 8 0.005
  check sample-dpm-gpu 120 "$B/ddpm-sample" --checkpoint "$REF/checkpoint" --device "$DEV" --sampler dpm-solver --steps 10 \
    "${SAMPLE_ARGS[@]}" --out "$WORK/gpu-dpm.h5"
  check sample-dpm-vs-cpu 30 "${cmp[@]}" images "$REF/cpu-dpm.h5" "$WORK/gpu-dpm.h5" 0.5 8 0.005

  if [ -n "${OUT:-}" ]; then
    cp "$WORK/all.log" "$OUT/gpu-check.log"
    [ -f "$WORK/selftest.md" ] && cp "$WORK/selftest.md" "$OUT/selftest.md"
  fi
  echo "gpu-check: $(($(date +%s) - T0)) s"
  echo "gpu-check: $PASSED passed, $FAILED failed"
  [ "$FAILED" = 0 ]
}

cmd=${1:-pack}
case "$cmd" in
  pack) pack ;;
  run) run ;;
  all) pack; run ;;
  *) echo "usage: $0 pack | run | all" >&2; exit 2 ;;
esac
