#!/usr/bin/env bash
# Evaluation of a trained Fashion-MNIST model (configs/fashion-mnist.toml) with the project's own
# classifiers, everything measured in this one run, ending in a markdown table for bench/RESULTS.md.
#
#   bash bench/fashion-mnist-eval.sh
#
# Needs (see bench/RESULTS.md for the commands that made them):
#   RUN       the diffusion run directory                     (runs/fashion-mnist)
#   EVAL_CLF  clean classifier for accuracy and the FD        (runs/fashion-mnist-eval-classifier,
#             configs/fashion-mnist-eval-classifier.toml)
#   GUIDE_CLF noise-aware classifier for classifier guidance   (runs/fashion-mnist-classifier,
#             configs/fashion-mnist-classifier.toml)
#   TEST      the test split                                   (data/fashion-mnist-test.h5; converted if missing)
# Sizes (environment): SWEEP_PER_CLASS (20) images per class for the guidance sweep with DDIM-50 at
# CFG weights WS ("0 1 3"); CMP_PER_CLASS (10) per class for DDPM-1000 vs DDIM-50 vs DPM-Solver-20 at
# CFG weight W (1) — DDPM-1000 costs 2000 model evaluations per image; BPD_NUM (100) test images for
# bits/dim (1000 evaluations each); FD_REAL (10000) real test images for the FD statistics. Accuracy = fraction of class-k samples the clean classifier calls k;
# "FD" = Frechet distance between the classifier's pooled features of the samples and of the test set
# (a classifier-feature FD, not Inception FID: compare it only within this table, and note it is biased
# upwards for small sample counts).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/fashion-mnist}
EVAL_CLF=${EVAL_CLF:-runs/fashion-mnist-eval-classifier}
GUIDE_CLF=${GUIDE_CLF:-runs/fashion-mnist-classifier}
TEST=${TEST:-data/fashion-mnist-test.h5}
SWEEP_PER_CLASS=${SWEEP_PER_CLASS:-20}
WS=${WS:-0 1 3}
CMP_PER_CLASS=${CMP_PER_CLASS:-10}
W=${W:-1}
BPD_NUM=${BPD_NUM:-100}
FD_REAL=${FD_REAL:-10000}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(nproc)}

cargo build --release -q -p ddpm-sampler -p ddpm-data
if ! [ -f "$TEST" ]; then
  target/release/ddpm-data convert --from fashion-mnist /usr/share/datasets/fashion-mnist --split test --out "$TEST"
fi
OUT=$RUN/eval
mkdir -p "$OUT"
LOG=$OUT/results.jsonl
: > "$LOG"
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, RAYON_NUM_THREADS=$RAYON_NUM_THREADS, load $(cut -d' ' -f1-3 /proc/loadavg)"

# sample NAME ARGS...: generate, then score with the clean classifier; one JSON line each into $LOG
sample() {
  local name=$1
  shift
  echo "== $name: ddpm-sample $*"
  target/release/ddpm-sample --checkpoint "$RUN" --out "$OUT/$name.h5" "$@" | tee -a "$LOG"
  target/release/ddpm-eval fid --classifier "$EVAL_CLF" --data "$TEST" --samples "$OUT/$name.h5" \
    --num "$FD_REAL" --checkpoint "$OUT" --name fashion-mnist-test 2>/dev/null \
    | python3 -c "import json,sys
for l in sys.stdin:
    d = json.loads(l); d['run'] = '$name'; print(json.dumps(d))" | tee -a "$LOG" | cut -c1-160
}

echo "== the evaluation classifier on the real test set (its own accuracy)"
target/release/ddpm-eval fid --classifier "$EVAL_CLF" --data "$TEST" --samples "$TEST" --checkpoint "$OUT" \
  --name fashion-mnist-test 2>/dev/null | grep classifier_accuracy_real \
  | python3 -c "import json,sys
for l in sys.stdin:
    d = json.loads(l); d['run'] = 'real-test'; print(json.dumps(d))" | tee -a "$LOG" | cut -c1-160

for w in $WS; do
  sample "ddim50-cfg$w" --sampler ddim --steps 50 --per-class "$SWEEP_PER_CLASS" --cfg "$w"
done
# DDPM_STEPS (a respacing, e.g. 100) only to try the script quickly; the comparison is at all T.
sample "ddpm${DDPM_STEPS:-1000}-cfg$W" --sampler ddpm ${DDPM_STEPS:+--steps "$DDPM_STEPS"} --per-class "$CMP_PER_CLASS" --cfg "$W"
sample "ddim50-cfg$W-n$CMP_PER_CLASS" --sampler ddim --steps 50 --per-class "$CMP_PER_CLASS" --cfg "$W"
sample "dpm20-cfg$W" --sampler dpm-solver --steps 20 --per-class "$CMP_PER_CLASS" --cfg "$W"
sample "ddim50-cg" --sampler ddim --steps 50 --per-class "$CMP_PER_CLASS" --classifier "$GUIDE_CLF" --classifier-scale "${CG_SCALE:-3}"

echo "== bits/dim on the first $BPD_NUM test images"
target/release/ddpm-eval bpd --checkpoint "$RUN" --data "$TEST" --num "$BPD_NUM" --out-dir "$OUT" 2>/dev/null \
  | tee -a "$LOG"

python3 - "$LOG" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
samples = {r["out"].rsplit("/", 1)[-1][:-3]: r for r in rows if r.get("metric") == "sample"}
acc = {r["run"]: r for r in rows if r.get("metric") == "classifier_accuracy_samples"}
fd = {r["run"]: r for r in rows if str(r.get("metric", "")).startswith("FD-")}
real = [r for r in rows if r.get("metric") == "classifier_accuracy_real" and r.get("run") == "real-test"]
if real:
    print(f"\nevaluation classifier accuracy on the {real[0]['num_real']} real test images: {real[0]['value']:.4f}")
print("\n| run | sampler | steps | guidance | images | model evals/image | seconds | images/s | accuracy | classifier FD |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, s in samples.items():
    g = f"CFG w={s['cfg']}" if s.get("cfg") is not None else ""
    if s.get("classifier_scale") is not None:
        g = f"classifier s={s['classifier_scale']}"
    if s.get("clip"):
        g += ", x0 clipped"
    a = acc.get(name, {}).get("value")
    f = fd.get(name, {}).get("value")
    print(f"| {name} | {s['sampler']} | {s['steps'] or 'all'} | {g or 'none'} | {s['num_images']} | {s['model_evals_per_image']} "
          f"| {s['seconds']:.0f} | {s['images_per_second']:.2f} | {a:.3f} | {f:.2f} |")
for r in rows:
    if r.get("metric") == "bpd":
        print(f"\nbits/dim on {r['num_examples']} test images (EMA, T={r['timesteps']}): total {r['total_bpd']:.3f} "
              f"+- {r['total_bpd_stderr']:.3f} = L_T {r['prior_bpd_L_T']:.5f} + sum L_(t-1) "
              f"{r['kl_bpd_sum_L_t_minus_1']:.3f} + L_0 {r['decoder_bpd_L_0']:.3f} ({r['seconds']:.0f} s)")
PY
