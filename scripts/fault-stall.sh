#!/usr/bin/env bash
# Stalled-rank scenario of issue 13 (called by scripts/fault-inject.sh, or run alone):
#
#   1. all ranks alive: 2 ranks of launch/mpirun-local.sh train configs/quickstart.toml; SIGUSR1 to
#      every rank (what SLURM's --signal=USR1@T does) must give a checkpoint and exit 0;
#   2. one rank stalled: the same job, then `kill -STOP` of rank 1; the collective watchdog
#      (dist.timeout_s, TIMEOUT_S here) must end the job, non-zero, with every live rank naming the
#      collective and the rank that did not arrive.
#
#   scripts/fault-stall.sh            # last line: `stall: ended in T s, exit N`
#
# Environment: DDPM_TRAIN / DDPM_DATA (binaries; default target/release, else target/debug),
# TIMEOUT_S (default 5), WORK (scratch directory, default a fresh mktemp -d), BATCH (default 4).
# Exits non-zero if either check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

pick() { # pick NAME: the binary from $2 if set, else release, else debug
  if [ -n "${2:-}" ]; then echo "$2"; return; fi
  for p in target/release/$1 target/debug/$1; do [ -x "$p" ] && { echo "$PWD/$p"; return; }; done
  echo "fault-stall: no $1 binary; run cargo build -p ddpm-train -p ddpm-data (or set DDPM_TRAIN)" >&2
  exit 2
}
TRAIN=$(pick ddpm-train "${DDPM_TRAIN:-}")
DATA_BIN=$(pick ddpm-data "${DDPM_DATA:-}")
export DDPM_TRAIN=$TRAIN
TIMEOUT_S=${TIMEOUT_S:-5}
BATCH=${BATCH:-4}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
DATA=data/fashion-mnist-train.h5
if [ ! -f "$DATA" ]; then
  mkdir -p data
  "$DATA_BIN" convert --from fashion-mnist "${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}" \
    --split train --out "$DATA" >&2
fi
export THREADS=${THREADS:-1}

# start NAME: 2 ranks in the background; sets MPI_PID and LOG.
start() {
  LOG=$WORK/$1.log
  launch/mpirun-local.sh 2 --config configs/quickstart.toml --out "$WORK/$1" --no-progress \
    --steps 100000 --batch "$BATCH" --set schedule.checkpoint_every=1000000 --set schedule.log_every=1 \
    --set "dist.timeout_s=$TIMEOUT_S" >"$LOG" 2>&1 &
  MPI_PID=$!
}

# rank_pid R: the pid of rank R of the job started last.
rank_pid() {
  local p
  for p in $(pgrep -P "$MPI_PID"); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1"; then
      echo "$p"; return
    fi
  done
  return 1
}

# wait_steps DIR N: until N steps are logged (the job trains), or fail after 600 s.
wait_steps() {
  local t=0
  while [ "$( { wc -l <"$1/metrics.jsonl"; } 2>/dev/null || echo 0)" -lt "$2" ]; do
    kill -0 "$MPI_PID" 2>/dev/null || { cat "$LOG" >&2; echo "fault-stall: the job died early" >&2; exit 1; }
    sleep 0.5; t=$((t + 1))
    [ $t -lt 1200 ] || { echo "fault-stall: no training after 600 s" >&2; kill "$MPI_PID"; exit 1; }
  done
}

fail=0

# 1. All ranks alive: the stop request still gives a checkpoint.
start usr1
wait_steps "$WORK/usr1" 2
for r in 0 1; do kill -USR1 "$(rank_pid $r)"; done
rc=0; wait "$MPI_PID" || rc=$?
if [ "$rc" = 0 ] && ls -d "$WORK"/usr1/checkpoints/step_* >/dev/null 2>&1; then
  echo "stall: SIGUSR1 with all ranks alive: checkpoint $(ls -d "$WORK"/usr1/checkpoints/step_* | tail -1 | xargs basename), exit 0"
else
  echo "stall: SIGUSR1 with all ranks alive: exit $rc, no checkpoint (log $LOG)"; fail=1
fi

# 2. Rank 1 stopped: the watchdog ends the job.
start stop
wait_steps "$WORK/stop" 2
victim=$(rank_pid 1)
kill -STOP "$victim"
t0=$(date +%s.%N)
rc=0; wait "$MPI_PID" || rc=$?
t=$(echo "$(date +%s.%N) - $t0" | bc)
kill -CONT "$victim" 2>/dev/null || true
if [ "$rc" = 0 ] || ! grep -q "rank 0: error: watchdog: collective .* rank(s) 1 did not arrive" "$LOG"; then
  echo "stall: rank 0 did not report rank 1 missing (log $LOG)"; fail=1
else
  grep "watchdog:" "$LOG" | sed 's/^/stall: /'
fi
printf 'stall: ended in %.1f s, exit %d\n' "$t" "$rc"
exit $fail
