#!/usr/bin/env bash
# The launch scripts on a real (local) SLURM cluster and a real two-host run, on CPU. Needs root (it
# starts SLURM daemons and network namespaces through scripts/slurm-local.sh, which installs slurm-wlm
# and munge if missing). .ci/run calls it after the tests.
#
#   scripts/cluster-test.sh [all|preempt|two-hosts|multinode]      (default all)
#
# preempt    launch/slurm-1node-8gpu.sbatch with 2 CPU ranks on the quickstart config: an uninterrupted
#            run, then the same run sent SIGUSR1 (`scancel --signal=USR1 --batch`) mid-way, which must
#            checkpoint, requeue itself, resume with --resume auto and end with weights bit-identical
#            to the uninterrupted run's; then one rank SIGKILLed, which must end the job (srun
#            --kill-on-bad-exit) with a failure within 60 s.
# two-hosts  two network namespaces h1 and h2 joined by a veth pair; mpirun in h1 starts one rank per
#            host over TCP only (btl tcp,self and oob restricted to the veth subnet; the remote start
#            goes through scripts/slurm-local.sh as plm_rsh_agent instead of ssh). 2 ranks x batch B
#            must match 1 rank x batch 2B to crates/train/tests/mpi.rs's tolerance; then the rank on
#            h2 is SIGKILLed and mpirun must fail within 60 s.
# multinode  launch/slurm-multinode.sbatch --nodes=2 on a two-node SLURM cluster (one slurmd per
#            namespace); its weights must equal the two-hosts mpirun run's bit for bit.
#
# Uses the dev-profile ddpm-train that `cargo test` builds (optimised, see Cargo.toml), and creates
# data/fashion-mnist-train.h5 if missing. Work files: runs/cluster-test/. Stops a cluster that
# scripts/slurm-local.sh started and leaves no daemon running.
# Environment: STEPS (preempt run length, default 24), TCP_STEPS (two-hosts/multinode, default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
what=${1:-all}
case "$what" in all | preempt | two-hosts | multinode) ;; *) echo "usage: $0 [all|preempt|two-hosts|multinode]" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "cluster-test: needs root (SLURM daemons, network namespaces)" >&2; exit 2; }

W=$repo/runs/cluster-test
STEPS=${STEPS:-24}
TCP_STEPS=${TCP_STEPS:-10}
NET=${NET_PREFIX:-10.77.0}
BIN=$repo/target/debug/ddpm-train
slurm_local=$repo/scripts/slurm-local.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NO_COLOR=1
# Small batches, a loss line every step, no periodic checkpoints (the only ones are the stop and the
# end), a tiny preview so the end of a run is quick.
TRAIN_ARGS=(--config configs/quickstart.toml --no-progress --set schedule.log_every=1
  --set schedule.checkpoint_every=100000 --set preview.per_class=1 --set preview.steps=2)

fail() { echo "cluster-test: FAILED: $*" >&2; exit 1; }
log() { echo "cluster-test: $*" >&2; }

cleanup() {
  local rc=$?
  if [ -e "$repo/.slurm/hosts" ]; then
    "$slurm_local" exec scancel --user=root 2>/dev/null || true
  fi
  "$slurm_local" down >/dev/null 2>&1 || true
  exit $rc
}
trap cleanup EXIT

prepare() {
  cargo build -q -p ddpm-data -p ddpm-train
  if [ ! -f data/fashion-mnist-train.h5 ]; then
    mkdir -p data
    target/debug/ddpm-data convert --from fashion-mnist "${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}" \
      --split train --out data/fashion-mnist-train.h5
  fi
  rm -rf "$W"
  mkdir -p "$W"
  # A cluster left by scripts/slurm-local.sh up is replaced by the test's own.
  "$slurm_local" down >/dev/null
}

# Compares two runs. `exact A B STEP [S]`: every tensor of the step-STEP checkpoint (model, optimizer,
# trainer state) and every logged loss equal bit for bit; if B was resumed at step S, its loss lines
# up to S were re-serialised by ddpm-train on resume through serde_json's default float parser,
# which can move a value by one unit in the last place (lr 0.00014000000000000001 came back as
# 0.00014), so those lines only have to agree to 1e-15 relative. `tol A B STEP`: crates/train/tests/mpi.rs's
# criterion for 2 ranks x B vs 1 rank x 2B (loss per step within 1e-5 relative; weights within 1e-5
# relative L2 overall and 1e-3 per tensor); prints the largest relative difference.
compare() {
  python3 - "$@" <<'PY'
import json, math, os, struct, sys
mode, a, b, step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rewritten = int(sys.argv[5]) if len(sys.argv) > 5 else 0

def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}

def losses(run):
    return [json.loads(l)["loss"] for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]

ck = lambda run: os.path.join(run, "checkpoints", f"step_{step:09d}")
la, lb = losses(a), losses(b)
if len(la) != step or len(lb) != step:
    sys.exit(f"expected {step} loss lines, got {len(la)} ({a}) and {len(lb)} ({b})")
if mode == "exact":
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y and (i >= rewritten or abs(x - y) > 1e-15 * abs(x)):
            sys.exit(f"loss differs at step {i + 1}: {x!r} vs {y!r}")
    files = sorted(f for f in os.listdir(ck(b)) if f.endswith(".safetensors"))
    if not files:
        sys.exit(f"no safetensors in {ck(b)}")
    count = 0
    for f in files:
        ta, tb = tensors(os.path.join(ck(a), f)), tensors(os.path.join(ck(b), f))
        if ta.keys() != tb.keys():
            sys.exit(f"{f}: tensor names differ")
        for k in ta:
            if ta[k] != tb[k]:
                sys.exit(f"{f}: tensor {k} differs")
        count += len(ta)
    print(f"{count} tensors in {', '.join(files)} and the losses of steps {rewritten + 1}..{step} bit-identical")
else:
    worst = 0.0
    for i, (x, y) in enumerate(zip(la, lb)):
        rel = abs(x - y) / abs(y)
        worst = max(worst, rel)
        if rel > 1e-5:
            sys.exit(f"step {i + 1}: loss {x} (2 ranks) vs {y} (1 rank), rel diff {rel:.3g} > 1e-5")
    ta, tb = tensors(os.path.join(ck(a), "model.safetensors")), tensors(os.path.join(ck(b), "model.safetensors"))
    diff_all = norm_all = 0.0
    for k in sorted(tb):
        assert ta[k][0] == tb[k][0] == "F32", (k, ta[k][0])
        xa = struct.unpack(f"<{len(ta[k][2]) // 4}f", ta[k][2])
        xb = struct.unpack(f"<{len(tb[k][2]) // 4}f", tb[k][2])
        diff = sum((x - y) ** 2 for x, y in zip(xa, xb))
        norm = sum(y * y for y in xb)
        diff_all += diff
        norm_all += norm
        if not (math.sqrt(diff) <= 1e-3 * max(math.sqrt(norm), 1e-12) or diff == 0.0):
            sys.exit(f"tensor {k}: |a-b| {math.sqrt(diff):.3g} vs |b| {math.sqrt(norm):.3g} (> 1e-3 relative)")
    wrel = math.sqrt(diff_all) / math.sqrt(norm_all)
    if wrel > 1e-5:
        sys.exit(f"weights: relative L2 distance {wrel:.3g} > 1e-5")
    print(f"{max(worst, wrel):.3g} (losses {worst:.3g} max over {step} steps, weights {wrel:.3g} relative L2)")
PY
}

# Waits up to $2 seconds for the condition command "${@:3}"; fails with message $1.
wait_for() {
  local what=$1 secs=$2 i
  shift 2
  for ((i = 0; i < secs; i++)); do
    if "$@"; then return 0; fi
    sleep 1
  done
  fail "$what: not within $secs s"
}

metric_lines() { [ -f "$1/metrics.jsonl" ] && wc -l <"$1/metrics.jsonl" || echo 0; }
has_lines() { [ "$(metric_lines "$1")" -ge "$2" ]; }
# True once run dir $2 has a loss line; fails the test at once if process $1 (log $3) has ended.
running_with_lines() {
  kill -0 "$1" 2>/dev/null || { cat "$3"; fail "the run ended before training"; }
  has_lines "$2" 1
}
job_field() { "$slurm_local" exec scontrol show job "$1" -o | tr ' ' '\n' | sed -n "s/^$2=//p"; }
job_ended() { case "$(job_field "$1" JobState)" in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) return 0 ;; esac; return 1; }
# The pid of rank $2's ddpm-train, found by $1 (SLURM_PROCID or OMPI_COMM_WORLD_RANK) in its environment.
rank_pid() {
  local p
  for p in $(pgrep -f "^$BIN" || true); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "$1=$2" && { echo "$p"; return 0; }
  done
  return 1
}

# sbatch on the one-node cluster: CPU mode, 2 ranks of 1 core each.
submit_cpu() {
  DEVICE=cpu DDPM_TRAIN="$BIN" "$slurm_local" exec sbatch --parsable --gpus-per-task=0 --ntasks-per-node=2 \
    --cpus-per-task=1 --mem=2G "$@"
}

# Needs the one-node cluster (scripts/slurm-local.sh up).
preempt_test() {
  local script=launch/slurm-1node-8gpu.sbatch args=("${TRAIN_ARGS[@]}" --batch 4 --steps "$STEPS")

  log "preempt: uninterrupted 2-rank run of $STEPS steps (sbatch $script)"
  submit_cpu --wait --job-name=ct-ref --output="$W/ref.out" "$script" "${args[@]}" --out "$W/ref" >/dev/null ||
    { cat "$W/ref.out"; fail "uninterrupted sbatch run failed"; }

  log "preempt: the same run, SIGUSR1 to the batch shell after $((STEPS / 3)) steps"
  local jid
  jid=$(submit_cpu --job-name=ct-pre --output="$W/pre.out" "$script" "${args[@]}" --out "$W/pre")
  wait_for "job $jid reaching step $((STEPS / 3))" 300 has_lines "$W/pre" $((STEPS / 3))
  "$slurm_local" exec scancel --signal=USR1 --batch "$jid"
  wait_for "job $jid ending after its requeue" 600 job_ended "$jid"
  local state restarts code
  state=$(job_field "$jid" JobState) restarts=$(job_field "$jid" Restarts) code=$(job_field "$jid" ExitCode)
  [ "$state" = COMPLETED ] && [ "$code" = 0:0 ] || { cat "$W/pre.out"; fail "job $jid ended $state, exit $code"; }
  [ "$restarts" = 1 ] || { cat "$W/pre.out"; fail "job $jid restarted $restarts times, expected 1"; }
  grep -q "requeueing job $jid" "$W/pre.out" || { cat "$W/pre.out"; fail "the batch script did not requeue itself"; }
  # Rank 0's log: the step it stopped after (checkpoint written) and the step the requeued job resumed at.
  local stop_step resume_step
  stop_step=$(grep "stopped by signal" "$W/pre.out" | grep -o 'step=[0-9]*' | head -1 | cut -d= -f2)
  resume_step=$(grep "resuming" "$W/pre.out" | grep -o 'step=[0-9]*' | head -1 | cut -d= -f2)
  [ -n "$stop_step" ] && [ "$stop_step" -lt "$STEPS" ] || { cat "$W/pre.out"; fail "no stop before step $STEPS in the log"; }
  [ "$resume_step" = "$stop_step" ] || { cat "$W/pre.out"; fail "stopped at step $stop_step but resumed at '$resume_step'"; }
  [ -f "$W/pre/checkpoints/step_$(printf %09d "$stop_step")/model.safetensors" ] ||
    fail "no checkpoint of step $stop_step in $W/pre/checkpoints"
  # Both tasks of the interrupted step ended cleanly (a rank that stopped at another step than the
  # others would be left in a collective and fail or hang): srun reports any non-zero task.
  ! grep -E "srun: error|task [0-9]+: (Exited|Killed)" "$W/pre.out" || fail "a task of job $jid failed"
  local same
  same=$(compare exact "$W/ref" "$W/pre" "$STEPS" "$stop_step" 2>&1) || fail "interrupted run differs from the uninterrupted one: $same"
  log "preempt: $same"
  echo "slurm: requeued ${restarts}x, resumed at step $resume_step, weights bit-identical"
}

# A task killed under SLURM (here: SIGKILL to rank 1, as the OOM killer would) must end the job.
slurm_kill_test() {
  local script=launch/slurm-1node-8gpu.sbatch jid state code
  log "preempt: SIGKILL to rank 1 of a running job (srun --kill-on-bad-exit=1 must end it)"
  jid=$(submit_cpu --job-name=ct-kill --output="$W/kill.out" "$script" "${TRAIN_ARGS[@]}" --batch 4 \
    --steps 100000 --out "$W/kill")
  wait_for "job $jid training" 300 has_lines "$W/kill" 1
  local pid t0 secs
  pid=$(rank_pid SLURM_PROCID 1) || fail "no process of rank 1 of job $jid"
  kill -KILL "$pid"
  t0=$(date +%s)
  wait_for "job $jid ending after rank 1 was killed" 60 job_ended "$jid"
  secs=$(($(date +%s) - t0))
  state=$(job_field "$jid" JobState) code=$(job_field "$jid" ExitCode)
  [ "$state" = FAILED ] && [ "$code" != 0:0 ] || { cat "$W/kill.out"; fail "job $jid ended $state, exit $code"; }
  echo "slurm: rank 1 killed -> job $state (exit $code) within ${secs} s (limit 60)"
}

# mpirun on h1 with one rank on each host, TCP over the veth pair only.
mpirun_two_hosts() {
  printf '%s slots=1\n%s slots=1\n' "$NET.1" "$NET.2" >"$W/hostfile"
  "$slurm_local" rsh h1 "cd $repo && RAYON_NUM_THREADS=1 mpirun -n 2 --hostfile $W/hostfile --display-map --bind-to none \
    --mca plm_rsh_agent $slurm_local --mca btl tcp,self --mca btl_tcp_if_include $NET.0/24 \
    --mca oob_tcp_if_include $NET.0/24 -x RAYON_NUM_THREADS $BIN $*"
}

two_hosts_test() {
  "$slurm_local" net up
  log "two hosts: 2 ranks x batch 4 (h1 + h2 over tcp) vs 1 rank x batch 8, $TCP_STEPS steps"
  local targs="${TRAIN_ARGS[*]} --batch 4"
  mpirun_two_hosts "$targs --steps $TCP_STEPS --out $W/tcp2" >"$W/tcp2.out" 2>&1 || { cat "$W/tcp2.out"; fail "2-rank run over tcp failed"; }
  # mpirun's --display-map: one rank on each of the two hosts.
  grep -qE "Data for node: (h1|$NET.1)\s.*Num procs: 1" "$W/tcp2.out" &&
    grep -qE "Data for node: (h2|$NET.2)\s.*Num procs: 1" "$W/tcp2.out" ||
    { cat "$W/tcp2.out"; fail "the ranks were not one on h1 and one on h2"; }
  RAYON_NUM_THREADS=1 "$BIN" "${TRAIN_ARGS[@]}" --steps "$TCP_STEPS" --batch 8 --out "$W/one" >"$W/one.out" 2>&1 ||
    { cat "$W/one.out"; fail "1-rank run failed"; }
  local diff
  diff=$(compare tol "$W/tcp2" "$W/one" "$TCP_STEPS" 2>&1) || fail "2 ranks over tcp vs 1 rank: $diff"
  echo "two hosts over tcp: max rel diff $diff vs 1 rank"

  log "two hosts: SIGKILL to the rank on h2 (mpirun must end the job)"
  mpirun_two_hosts "$targs --steps 100000 --out $W/tcp-kill" >"$W/tcp-kill.out" 2>&1 &
  local mpid=$! pid t0 rc secs
  wait_for "2-rank run training" 300 running_with_lines "$mpid" "$W/tcp-kill" "$W/tcp-kill.out"
  pid=$(rank_pid OMPI_COMM_WORLD_RANK 1) || fail "no process of rank 1"
  [ "$(stat -L -c %i "/proc/$pid/ns/net")" = "$(stat -L -c %i /run/netns/ddpm-h2)" ] ||
    fail "rank 1 (pid $pid) is not in h2's network namespace"
  kill -KILL "$pid"
  t0=$(date +%s)
  wait_for "mpirun ending after the rank on h2 was killed" 60 bash -c "! kill -0 $mpid 2>/dev/null"
  secs=$(($(date +%s) - t0))
  rc=0
  wait "$mpid" || rc=$?
  [ "$rc" != 0 ] || { cat "$W/tcp-kill.out"; fail "mpirun exited 0 after a rank was killed"; }
  echo "two hosts: rank on h2 killed -> mpirun exit $rc within ${secs} s (limit 60)"
}

multinode_test() {
  "$slurm_local" up --hosts 2
  log "multinode: sbatch --nodes=2 launch/slurm-multinode.sbatch, one rank per node over tcp"
  OMPI_MCA_btl=tcp,self OMPI_MCA_btl_tcp_if_include=$NET.0/24 OMPI_MCA_oob_tcp_if_include=$NET.0/24 \
    DEVICE=cpu DDPM_TRAIN=$BIN "$slurm_local" exec sbatch --wait --nodes=2 --gpus-per-task=0 \
    --ntasks-per-node=1 --cpus-per-task=1 --mem=2G --job-name=ct-multi --output="$W/multi.out" \
    launch/slurm-multinode.sbatch "${TRAIN_ARGS[@]}" --steps "$TCP_STEPS" --batch 4 --out "$W/multi" >/dev/null ||
    { cat "$W/multi.out"; fail "multinode sbatch run failed"; }
  grep -q "nodes: h\[1-2\]" "$W/multi.out" || { cat "$W/multi.out"; fail "the job did not run on h1 and h2"; }
  local same
  same=$(compare exact "$W/tcp2" "$W/multi" "$TCP_STEPS" 2>&1) || fail "multinode sbatch vs two-host mpirun: $same"
  echo "slurm multinode: 2 nodes (h1, h2) over tcp, weights bit-identical to the two-host mpirun run ($same)"
  "$slurm_local" down
}

prepare
case "$what" in
  preempt) "$slurm_local" up && preempt_test && slurm_kill_test ;;
  two-hosts) two_hosts_test ;;
  multinode) two_hosts_test && multinode_test ;;
  all) "$slurm_local" up && preempt_test && slurm_kill_test && "$slurm_local" down && two_hosts_test && multinode_test ;;
esac
