#!/usr/bin/env bash
# Issue 17's experiment: VDM (continuous time) on Fashion-MNIST with the learned schedule against the
# fixed cosine one (and linear log-SNR, the learned schedule's starting point, as a control): the same
# U-Net, seed, data order, noise and steps (configs/fashion-mnist-vdm.toml); only diffusion.schedule
# differs. For each: the test bound in bits/dim with its three terms and the variance of the one-draw
# loss estimate (`ddpm-eval bpd --time-draws`), then class-conditional samples scored by the clean
# evaluation classifier (accuracy: the fraction of class-k samples it calls k; classifier-feature FD
# against real test images). Ends with a markdown table for bench/RESULTS.md.
#
#   bash bench/vdm.sh EVAL_CLASSIFIER_RUN      # e.g. runs/fashion-mnist-eval-classifier
#
# Environment: STEPS (750, the quickstart's length), SCHEDULES ("learned cosine linear"), PARALLEL (1:
# train the runs side by side, one thread each; 0: one after another on all cores), BPD_NUM (200 test
# images), TIME_DRAWS (8), SAMPLER (ddim), SAMPLE_STEPS (50), WS ("0 1": classifier-free
# guidance weights to sample with; 0 is the conditional model), PER_CLASS (20), FD_REAL (10000),
# OUT (runs), BIN (target/release, built here when unset), EVAL (1; 0: train only). Runs that already
# reached STEPS are not retrained.
set -euo pipefail
cd "$(dirname "$0")/.."
EVAL_CLF=${1:?usage: bench/vdm.sh EVAL_CLASSIFIER_RUN}
STEPS=${STEPS:-750}
SCHEDULES=${SCHEDULES:-learned cosine linear}
PARALLEL=${PARALLEL:-1}
BPD_NUM=${BPD_NUM:-200}
TIME_DRAWS=${TIME_DRAWS:-8}
SAMPLER=${SAMPLER:-ddim}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
PER_CLASS=${PER_CLASS:-20}
WS=${WS:-0 1}
FD_REAL=${FD_REAL:-10000}
OUT=${OUT:-runs}
TRAIN=data/fashion-mnist-train.h5
TEST=data/fashion-mnist-test.h5

if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p ddpm-train -p ddpm-sampler -p ddpm-data
  BIN=target/release
fi
for split in train test; do
  f=data/fashion-mnist-$split.h5
  [ -f "$f" ] || "$BIN"/ddpm-data convert --from fashion-mnist /usr/share/datasets/fashion-mnist --split "$split" --out "$f"
done
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, CPU flags: $(grep -o -w 'avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"

train() {
  local s=$1
  if [ -d "$OUT/vdm-$s/checkpoints/$(printf 'step_%09d' "$STEPS")" ]; then echo "vdm-$s: already at step $STEPS"; return; fi
  "$BIN"/ddpm-train --config configs/fashion-mnist-vdm.toml --steps "$STEPS" --resume auto \
    --set "diffusion.schedule=\"$s\"" --out "$OUT/vdm-$s" --no-progress > "$OUT/vdm-$s.train.log" 2>&1
  echo "trained vdm-$s: $(tail -n 1 "$OUT/vdm-$s/metrics.jsonl" | cut -c1-160)"
}
mkdir -p "$OUT"
start=$(date +%s)
if [ "$PARALLEL" = 1 ]; then
  pids=()
  for s in $SCHEDULES; do RAYON_NUM_THREADS=1 train "$s" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
else
  for s in $SCHEDULES; do train "$s"; done
fi
echo "training: $(( $(date +%s) - start )) s"
[ "${EVAL:-1}" = 1 ] || exit 0

LOG=$OUT/vdm-results.jsonl
: > "$LOG"
tag() { python3 -c "import json,sys
for l in sys.stdin:
    d = json.loads(l); d['run'] = '$1'; print(json.dumps(d))"; }
for s in $SCHEDULES; do
  run=$OUT/vdm-$s
  "$BIN"/ddpm-eval bpd --checkpoint "$run" --data "$TEST" --num "$BPD_NUM" --batch 50 \
    --time-draws "$TIME_DRAWS" | tag "$s" | tee -a "$LOG" | cut -c1-200
  for w in $WS; do
    smp=$run/samples/eval-$SAMPLER$SAMPLE_STEPS-w$w.h5
    "$BIN"/ddpm-sample --checkpoint "$run" --sampler "$SAMPLER" --steps "$SAMPLE_STEPS" --cfg "$w" \
      --per-class "$PER_CLASS" --out "$smp" | tag "$s w=$w" | tee -a "$LOG" | cut -c1-200
    "$BIN"/ddpm-eval fid --classifier "$EVAL_CLF" --data "$TEST" --samples "$smp" \
      --num "$FD_REAL" --checkpoint "$run" --name real 2>/dev/null | tag "$s w=$w" | tee -a "$LOG" | cut -c1-200
  done
done

python3 - "$LOG" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
f = lambda d, k, p=4: "-" if d.get(k) is None else f"{d[k]:.{p}f}"
print("\n| schedule | step | total bpd | prior | diffusion | reconstruction | one-draw variance | variance over t | gamma_0, gamma_1 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for b in (r for r in rows if r.get("metric") == "bpd"):
    print(f"| {b['run']} | {b.get('step', '-')} | {f(b, 'total_bpd', 3)} +- {f(b, 'total_bpd_stderr', 3)} | {f(b, 'prior_bpd')} "
          f"| {f(b, 'diffusion_bpd', 3)} | {f(b, 'reconstruction_bpd')} | {f(b, 'single_draw_loss_variance', 1)} "
          f"| {f(b, 'diffusion_variance_over_t', 1)} | {f(b, 'gamma_0', 2)}, {f(b, 'gamma_1', 2)} |")
by = {}
for r in rows:
    if r.get("metric") != "bpd":
        by.setdefault(r["run"], {})[str(r.get("metric"))] = r
print("\n| schedule, guidance | sampler | images | images/s | accuracy | classifier FD |")
print("|---|---|---:|---:|---:|---:|")
for run, m in by.items():
    s = m.get("sample", {})
    fd = next((v for k, v in m.items() if k.startswith("FD-")), {})
    acc = m.get("classifier_accuracy_samples", {})
    print(f"| {run} | {s.get('sampler', '-')}-{s.get('steps', '-')} | {s.get('num_images', '-')} | {f(s, 'images_per_second', 2)} "
          f"| {f(acc, 'value', 3)} | {f(fd, 'value', 2)} |")
PY
