#!/usr/bin/env bash
# GPU benchmark of ddpm-rs against the PyTorch twin (bench/pytorch/unet_bench.py) on the same GPU, same
# model (Ho et al.'s 35.7M CIFAR-10 U-Net, configs/cifar10.toml), same batch (128) and shape (32x32x3).
#
#   bash scripts/gpu-check.sh pack    (here, no GPU: builds the binaries this script runs into .gpu/pack)
#   bash bench/gpu.sh                 (on the GPU machine, from the repo root with .gpu/pack present)
#
# What is timed (every figure a median after warm-up; each timed run ends with a device synchronisation):
#   candle train-step   ddpm-train --device cuda itself: `step_ms` of metrics.jsonl (data batch, fused
#                       noising, forward, backward, gradient mean, global-norm clip, AdamW, EMA), median
#                       of steps 6..STEPS; f32, then train.precision = "bf16" if this ddpm-train has it.
#   candle fwd / fwd+bwd bench_unet --device cuda (crates/unet/examples): the U-Net forward in eval mode
#                       (the sampler's network evaluation) and forward+backward, f32 and bf16 weights.
#   pytorch             unet_bench.py --device cuda --full-step: forward, forward+backward and a full
#                       step (noising, forward, backward, clip, AdamW, EMA), f32 (TF32 off: strict f32
#                       like candle's cuBLAS f32 GEMMs) and bf16 autocast; cudnn.benchmark on.
# The last line is
#   gpu ratio candle/pytorch: train-step X, forward Y
# (f32; X < 1 means candle is faster). Nothing is installed: PyTorch must be on the machine already
# (the device tool's image has torch 2.11 + CUDA 13.0; the CUDA wheels are ~3 GB, far above what the
# device tool carries, 64 MiB, and that machine reaches no package registry). Without torch the PyTorch
# side is reported as not run and no ratio is printed.
#
# Environment: STEPS (ddpm-train steps, 30), REPS (timed repetitions, 10), BATCH (128), PY (python3 with
# torch; default: python3, /opt/torch/.venv/bin/python3), GPU_LIB_DIRS as in scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PACK=$REPO/.gpu/pack
STEPS=${STEPS:-30}
REPS=${REPS:-10}
BATCH=${BATCH:-128}
[ -f "$PACK/pack.tar.xz" ] || { echo "bench/gpu.sh: $PACK/pack.tar.xz missing: run 'scripts/gpu-check.sh pack' first" >&2; exit 3; }

WORK=$(mktemp -d /tmp/ddpm-gpu-bench.XXXXXX)
xz -dc "$PACK/pack.tar.xz" | tar -xf - -C "$WORK"
B=$WORK/bin
REF=$PACK/ref
# The library path scripts/gpu-check.sh sets up (CUDA 13 wheels, driver, bundled HDF5).
# shellcheck source=/dev/null
source <(sed -n '/^lib_dirs() {/,/^}/p' scripts/gpu-check.sh)
dirs=$(lib_dirs | awk '!seen[$0]++' | paste -sd: -)
nccl=$(IFS=:; for d in $dirs; do ls "$d"/libnccl.so.2 2>/dev/null; done | head -n 1 || true)
[ -n "$nccl" ] && ln -sf "$nccl" "$WORK/lib/libnccl.so"
export LD_LIBRARY_PATH="$WORK/lib:$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader || true; else echo "bench: no nvidia-smi"; fi
cat "$PACK/INFO"

# ---- candle: ddpm-train's own step ----
train_step() { # PRECISION -> prints the median step_ms, or a reason on stderr and nothing
  local prec=$1 out=$WORK/train-$1 extra=()
  [ "$prec" = f32 ] || extra=(--set "train.precision=\"$prec\"")
  if ! timeout 300 "$B/ddpm-train" --config "$REF/cifar10.toml" --out "$out" --device cuda --no-progress \
      --steps "$STEPS" --batch "$BATCH" --set "data.path=\"$REF/cifar-synth.h5\"" --set schedule.log_every=1 \
      --set schedule.checkpoint_every=100000 --set schedule.sample_every=0 --set preview.per_class=1 \
      --set preview.steps=2 "${extra[@]}" > "$out.log" 2>&1; then
    echo "ddpm-train ($prec) failed: $(grep -v '^\s*$' "$out.log" | tail -n 1)" >&2
    return 0
  fi
  python3 - "$out/metrics.jsonl" <<'EOF'
import json, statistics, sys
ms = [json.loads(l)["step_ms"] for l in open(sys.argv[1]) if l.strip()][5:]
print(f"{statistics.median(ms):.2f}")
EOF
}
echo "== candle: ddpm-train --device cuda, configs/cifar10.toml, batch $BATCH, $STEPS steps"
C_STEP_F32=$(train_step f32)
C_STEP_BF16=$(train_step bf16)
echo "candle train-step f32: ${C_STEP_F32:-n/a} ms, bf16: ${C_STEP_BF16:-n/a} ms"

echo "== candle: bench_unet --device cuda (U-Net forward in eval mode; forward+backward)"
declare -A C
for dt in f32 bf16; do
  if timeout 300 "$B/bench_unet" --device cuda --dtype "$dt" --models cifar10 --batch "$BATCH" --reps "$REPS" \
      --no-ops > "$WORK/bench-$dt.txt" 2>&1; then
    grep -v '^RESULT' "$WORK/bench-$dt.txt"
    C[$dt.forward]=$(awk '$1 == "RESULT" && $3 == "forward" {print $4}' "$WORK/bench-$dt.txt")
    C[$dt.train]=$(awk '$1 == "RESULT" && $3 == "train" {print $4}' "$WORK/bench-$dt.txt")
  else
    echo "bench_unet ($dt) failed: $(tail -n 1 "$WORK/bench-$dt.txt")"
  fi
done

# ---- PyTorch twin ----
PY=${PY:-}
if [ -z "$PY" ]; then
  for p in python3 /opt/torch/.venv/bin/python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then PY=$p; break; fi
  done
fi
declare -A T
if [ -z "$PY" ]; then
  echo "== pytorch: NOT RUN: no python3 with a CUDA-enabled torch on this machine (none is installed by this script)"
else
  for amp in off bf16; do
    echo "== pytorch ($PY), amp $amp"
    if timeout 300 "$PY" bench/pytorch/unet_bench.py --device cuda --amp "$amp" --models cifar10 --batch "$BATCH" \
        --reps "$REPS" --full-step > "$WORK/torch-$amp.txt" 2>&1; then
      grep -v '^RESULT' "$WORK/torch-$amp.txt"
      for k in forward train step params; do
        T[$amp.$k]=$(awk -v k="$k" '$1 == "RESULT" && $3 == k {print $4}' "$WORK/torch-$amp.txt")
      done
    else
      echo "unet_bench.py (amp $amp) failed: $(tail -n 1 "$WORK/torch-$amp.txt")"
    fi
  done
fi

echo "== summary (ms, batch $BATCH, 35.7M-parameter CIFAR-10 U-Net)"
ratio() { if [ -n "${1:-}" ] && [ -n "${2:-}" ]; then python3 -c "print(f'{$1 / $2:.2f}')"; else echo n/a; fi; }
printf '%-28s %12s %12s %8s\n' what candle pytorch ratio
row() { printf '%-28s %12s %12s %8s\n' "$1" "${2:-n/a}" "${3:-n/a}" "$(ratio "${2:-}" "${3:-}")"; }
row "train step f32" "$C_STEP_F32" "${T[off.step]:-}"
row "train step bf16" "$C_STEP_BF16" "${T[bf16.step]:-}"
row "forward+backward f32" "${C[f32.train]:-}" "${T[off.train]:-}"
row "forward+backward bf16" "${C[bf16.train]:-}" "${T[bf16.train]:-}"
row "forward (sampler) f32" "${C[f32.forward]:-}" "${T[off.forward]:-}"
row "forward (sampler) bf16" "${C[bf16.forward]:-}" "${T[bf16.forward]:-}"
if [ -n "${T[off.step]:-}" ] && [ -n "$C_STEP_F32" ] && [ -n "${C[f32.forward]:-}" ]; then
  echo "gpu ratio candle/pytorch: train-step $(ratio "$C_STEP_F32" "${T[off.step]}"), forward $(ratio "${C[f32.forward]}" "${T[off.forward]}")"
else
  echo "gpu ratio candle/pytorch: not measured (a side did not run; see above)"
  exit 1
fi
