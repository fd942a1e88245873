#!/usr/bin/env bash
# Samplers compared on one trained model (issue 18's table): images per second, the evaluation
# classifier's accuracy on the class-conditional samples and the classifier-feature FD, for DDPM-1000,
# DDIM 50/20/8/4 (and 8/4 on the students' trailing grid), DPM-Solver++ 20/10/8, Heun 18, PC, SDE and
# EDM (and distilled students if given).
# Every number is measured in this run; the script ends with a markdown table for bench/RESULTS.md.
#
#   bash bench/sampler-table.sh RUN_DIR EVAL_CLASSIFIER_RUN [TEST.h5]
#
#   RUN_DIR              a class-conditional diffusion run (e.g. runs/fashion-mnist, configs/fashion-mnist.toml)
#   EVAL_CLASSIFIER_RUN  the clean classifier for accuracy and FD (configs/fashion-mnist-eval-classifier.toml)
#   TEST.h5              real images for the FD statistics (default data/fashion-mnist-test.h5; converted if missing)
# Environment: PER_CLASS (10) images per class and sampler; W (1) classifier-free guidance weight for every
# sampler (empty: no guidance); FD_REAL (10000) real images; SDE_STEPS (1000, Song et al.'s N for DDPM
# models), PC_STEPS (1000; 2 model evaluations per step with one corrector step), SNR (0.16);
# EDM_LEVELS (18), S_CHURN (80); ONLY (space-separated row names, e.g. "ddim8 pc") to run a subset;
# STUDENTS ("label=RUN_DIR=ARG,ARG,..." entries, e.g. "student4=runs/fm-distill-4=--sampler,ddim,--steps,4")
# for distilled students, sampled with STUDENT_W (empty: no --cfg, for students with the guidance
# folded in by distill.guidance); TABLE_OUT ($RUN/sampler-table) where samples and results.jsonl go
# (give parts of one table run separately their own); BIN (target/release, built here when unset) the
# binaries. FD is biased upwards for small sample counts: compare rows of one run only.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: bench/sampler-table.sh RUN_DIR EVAL_CLASSIFIER_RUN [TEST.h5]}
EVAL_CLF=${2:?usage: bench/sampler-table.sh RUN_DIR EVAL_CLASSIFIER_RUN [TEST.h5]}
TEST=${3:-data/fashion-mnist-test.h5}
PER_CLASS=${PER_CLASS:-10}
W=${W-1}
FD_REAL=${FD_REAL:-10000}
SDE_STEPS=${SDE_STEPS:-1000}
PC_STEPS=${PC_STEPS:-1000}
SNR=${SNR:-0.16}
EDM_LEVELS=${EDM_LEVELS:-18}
S_CHURN=${S_CHURN:-80}
ONLY=${ONLY:-}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$(nproc)}

# BIN: where the binaries are (default: a release build made here); set it to skip the build.
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p ddpm-sampler -p ddpm-data
  BIN=target/release
fi
if ! [ -f "$TEST" ]; then
  "$BIN"/ddpm-data convert --from fashion-mnist /usr/share/datasets/fashion-mnist --split test --out "$TEST"
fi
OUT=${TABLE_OUT:-$RUN/sampler-table}
mkdir -p "$OUT"
LOG=$OUT/results.jsonl
: > "$LOG"
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, RAYON_NUM_THREADS=$RAYON_NUM_THREADS, CPU flags: $(grep -o -w 'avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"

# row NAME CHECKPOINT W ARGS...: generate PER_CLASS images per class (guidance weight W; empty: none),
# then score them; JSON lines into $LOG
row() {
  local name=$1 ckpt=$2 w=$3
  shift 3
  if [ -n "$ONLY" ] && ! [[ " $ONLY " == *" $name "* ]]; then return; fi
  local guide=()
  [ -n "$w" ] && guide=(--cfg "$w")
  echo "== $name: ddpm-sample $* ${guide[*]}"
  "$BIN"/ddpm-sample --checkpoint "$ckpt" --out "$OUT/$name.h5" --per-class "$PER_CLASS" \
    "${guide[@]}" "$@" | python3 -c "import json,sys
for l in sys.stdin:
    d = json.loads(l); d['run'] = '$name'; print(json.dumps(d))" | tee -a "$LOG" | cut -c1-200
  "$BIN"/ddpm-eval fid --classifier "$EVAL_CLF" --data "$TEST" --samples "$OUT/$name.h5" \
    --num "$FD_REAL" --checkpoint "$OUT" --name real 2>/dev/null \
    | python3 -c "import json,sys
for l in sys.stdin:
    d = json.loads(l); d['run'] = '$name'; print(json.dumps(d))" | tee -a "$LOG" | cut -c1-160
}

row ddpm1000 "$RUN" "$W" --sampler ddpm
for n in 50 20 8 4; do row "ddim$n" "$RUN" "$W" --sampler ddim --steps "$n"; done
# the distilled students' own grid (trailing, ending at t = T - 1): the like-for-like teacher rows
for n in 8 4; do row "ddim${n}t" "$RUN" "$W" --sampler ddim --steps "trailing$n"; done
for n in 20 10 8; do row "dpm$n" "$RUN" "$W" --sampler dpm-solver --steps "$n"; done
row heun18 "$RUN" "$W" --sampler heun --steps 18
row sde "$RUN" "$W" --sampler sde --steps "$SDE_STEPS"
row pc "$RUN" "$W" --sampler pc --steps "$PC_STEPS" --snr "$SNR" --corrector-steps 1
row edm "$RUN" "$W" --sampler edm --steps "$EDM_LEVELS" --s-churn "$S_CHURN"
# Students distilled with distill.guidance = w have the guidance folded in: sampled without --cfg
# (STUDENT_W empty), or with STUDENT_W for students distilled without guidance.
for s in ${STUDENTS:-}; do
  IFS='=' read -r label dir args <<<"$s"
  IFS=',' read -r -a extra <<<"$args"
  row "$label" "$dir" "${STUDENT_W:-}" "${extra[@]}"
done

python3 - "$LOG" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
samples = {r["run"]: r for r in rows if r.get("metric") == "sample"}
acc = {r["run"]: r["value"] for r in rows if r.get("metric") == "classifier_accuracy_samples"}
fd = {r["run"]: r["value"] for r in rows if str(r.get("metric", "")).startswith("FD-")}
print("\n| row | sampler | steps | options | model evals/image | images | images/s | accuracy | classifier FD |")
print("|---|---|---|---|---|---|---|---|---|")
for name, s in samples.items():
    opts = s.get("sampler_options") or {}
    o = ", ".join(f"{k}={v}" for k, v in opts.items() if v is not None)
    if s.get("cfg") is not None:
        o = (o + ", " if o else "") + f"CFG w={s['cfg']}"
    a, f = acc.get(name), fd.get(name)
    print(f"| {name} | {s['sampler']} | {s['steps'] or 'default'} | {o} | {s['model_evals_per_image']} | {s['num_images']} "
          f"| {s['images_per_second']:.2f} | {'-' if a is None else f'{a:.3f}'} | {'-' if f is None else f'{f:.2f}'} |")
PY
