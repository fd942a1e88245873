#!/usr/bin/env bash
# Fault injection for checkpoints and stalled ranks (issue 13), on a tiny model so it runs in
# minutes on a laptop:
#   (a) kill -9 the trainer at KILLS random moments (half of them timed to land inside a checkpoint
#       write: the kill fires when a `.tmp-step_*` staging directory appears), resume with
#       `--resume auto` each time; the newest valid checkpoint must never go backwards ("lost") and
#       the final weights, EMA, optimizer and trainer state must equal an uninterrupted run bit for
#       bit;
#   (b) fill the disk during a save (a small tmpfs when this user may mount one, and always
#       `ulimit -f` with SIGXFSZ ignored, so writes fail with EFBIG): the trainer must exit non-zero
#       with an error naming the file, and the previous checkpoint must stay valid;
#   (c) SIGSTOP one of 2 ranks: runs scripts/fault-stall.sh (the collective watchdog's test) when it
#       exists; otherwise says so, and the run is NOT reported as passing (exit status 3);
#   (d) truncate the newest checkpoint's model file, resume: the run must continue from the newest
#       valid checkpoint and keep it (the damaged one moves to checkpoints/abandoned/).
# Last line: `fault-inject: K kills survived, 0 lost, D disk-full ok, S stalls ended in T s`.
#
#   scripts/fault-inject.sh            KILLS=30 STEPS=40 FAULT_SEED=1 by default (environment)
#
# Exit status: 0 all four parts ran and passed; 1 a failure; 3 (a), (b), (d) passed but (c) did not run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KILLS=${KILLS:-30}
STEPS=${STEPS:-40}
FAULT_SEED=${FAULT_SEED:-1}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1} HDF5_USE_FILE_LOCKING=FALSE
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
WORK=$(mktemp -d)
MNT=""
cleanup() {
  if [ -n "$MNT" ]; then umount "$MNT" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build -q -p ddpm-data -p ddpm-train
BIN=$ROOT/target/debug/ddpm-train

# A tiny labelled dataset (64 8x8 images, 2 classes) through the IDX converter.
python3 - "$WORK" <<'PY'
import random, struct, sys
d = sys.argv[1]; n = 64; r = random.Random(0)
with open(f"{d}/img.idx", "wb") as f:
    f.write(struct.pack(">IIII", 0x803, n, 8, 8)); f.write(bytes(r.randrange(256) for _ in range(n * 64)))
with open(f"{d}/lab.idx", "wb") as f:
    f.write(struct.pack(">II", 0x801, n)); f.write(bytes(i % 2 for i in range(n)))
PY
"$ROOT/target/debug/ddpm-data" convert --from mnist-idx --images "$WORK/img.idx" --labels "$WORK/lab.idx" \
  --out "$WORK/data.h5" >/dev/null
cat >"$WORK/tiny.toml" <<EOF
seed = 3
[model]
image_size = 8
in_channels = 1
model_channels = 8
num_res_blocks = 1
attention_resolutions = [4]
channel_mult = [1, 2]
num_classes = 2
num_heads = 1
num_groups = 4
[diffusion]
timesteps = 50
timestep_sampling = "loss_aware"
[data]
path = "$WORK/data.h5"
batch = 4
flip = true
[optim]
lr = 1e-3
warmup_steps = 3
grad_clip = 1.0
[ema]
rates = [0.9, 0.99]
warmup = true
[schedule]
total_steps = $STEPS
log_every = 1
checkpoint_every = 1
keep_checkpoints = 2
[preview]
steps = 2
per_class = 1
EOF

python3 - "$BIN" "$WORK" "$KILLS" "$STEPS" "$FAULT_SEED" "$ROOT" <<'PY'
import hashlib, json, os, random, shutil, signal, subprocess, sys, time
BIN, WORK, KILLS, STEPS, SEED, ROOT = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
CFG = f"{WORK}/tiny.toml"
rng = random.Random(SEED)
fails = []

def train(out, *extra, resume=True, preexec=None):
    cmd = [BIN, "--config", CFG, "--no-progress", "--out", out] + (["--resume", "auto"] if resume else []) + list(extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)

def valid(ck):
    """size and sha256 of every listed file (the trainer checks more; this is the script's own view)"""
    try:
        m = json.load(open(f"{ck}/manifest.json"))
        for f in m["files"]:
            b = open(f"{ck}/{f['name']}", "rb").read()
            if len(b) != f["bytes"] or hashlib.sha256(b).hexdigest() != f["sha256"]:
                return None
        return m
    except Exception:
        return None

def steps(run):
    d = f"{run}/checkpoints"
    if not os.path.isdir(d):
        return []
    return sorted((int(n[5:]) for n in os.listdir(d) if n.startswith("step_")), reverse=True)

def newest_valid(run):
    for s in steps(run):
        if valid(f"{run}/checkpoints/step_{s:09d}"):
            return s
    return -1

def contents(ck):
    m = valid(ck)
    return None if m is None else {f["name"]: f["sha256"] for f in m["files"]}

def finish(p, what):
    out, err = p.communicate()
    if p.returncode != 0:
        fails.append(f"{what}: exit {p.returncode}: {err.strip().splitlines()[-1:] }")
    return out, err

# ---- (a) reference run, then KILLS kills with resumes ----
ref = f"{WORK}/ref"
t0 = time.time()
finish(train(ref, resume=False), "(a) reference run")
t_ref = time.time() - t0
want = contents(f"{ref}/checkpoints/step_{STEPS:09d}")
run = f"{WORK}/killed"
kills = lost = inside = 0
best = -1
while kills < KILLS:
    p = train(run)
    at_write = kills % 2 == 1
    # a random moment of a run that would take about t_ref from scratch
    deadline = time.time() + rng.random() * 0.6 * t_ref
    killed = False
    while p.poll() is None:
        if at_write:
            d = f"{run}/checkpoints"
            if time.time() > deadline - 0.4 * t_ref and os.path.isdir(d) and any(n.startswith(".tmp-") for n in os.listdir(d)):
                time.sleep(rng.random() * 0.02)
                p.kill(); killed = True; break
        elif time.time() > deadline:
            p.kill(); killed = True; break
        time.sleep(0.002)
    p.wait()
    if not killed:
        out, err = p.communicate()
        if p.returncode != 0:
            fails.append(f"(a) resume after kill {kills}: exit {p.returncode}: {err.strip()[-400:]}")
            break
        if newest_valid(run) == STEPS:
            # finished before the kill fired: start a fresh line for the remaining kills
            shutil.move(run, f"{WORK}/done.{kills}")
            best = -1
            continue
        continue
    kills += 1
    d = f"{run}/checkpoints"
    if os.path.isdir(d) and any(n.startswith(".tmp-") or ".old." in n for n in os.listdir(d)):
        inside += 1
    nv = newest_valid(run)
    if nv < best:
        lost += 1
        fails.append(f"(a) kill {kills}: newest valid checkpoint went from step {best} to {nv}")
    best = max(best, nv)
finish(train(run), "(a) final resume")
got = contents(f"{run}/checkpoints/step_{STEPS:09d}")
if got is None or got != want:
    fails.append("(a) final checkpoint differs from the uninterrupted run: "
                 + ", ".join(k for k in (want or {}) if (got or {}).get(k) != want[k]))
# earlier lines that finished before all kills were done must match too
for n in os.listdir(WORK):
    if n.startswith("done."):
        if contents(f"{WORK}/{n}/checkpoints/step_{STEPS:09d}") != want:
            fails.append(f"(a) {n}: final checkpoint differs from the uninterrupted run")
restarts = sum(n.startswith("done.") for n in os.listdir(WORK))
print(f"(a) {kills} kills ({inside} left a checkpoint write unfinished; {restarts} runs finished before "
      f"their kill and a new one started), {lost} lost, final weights "
      f"{'equal' if got == want else 'DIFFER'} to the uninterrupted run")

# ---- (b) disk full during a save ----
disk_ok = 0
def disk_full(run, preexec, how):
    global disk_ok
    before = newest_valid(run)
    p = train(run, "--steps", str(STEPS + 2), preexec=preexec)
    out, err = p.communicate()
    named = any(s in err for s in ("No space left", "File too large", "Disk quota")) and f"{run}/" in err
    after_ok = valid(f"{run}/checkpoints/step_{before:09d}") is not None and newest_valid(run) == before
    staging = [n for n in os.listdir(f"{run}/checkpoints") if n.startswith(".tmp-")]
    if p.returncode != 0 and named and after_ok and not staging:
        disk_ok += 1
        line = [l for l in err.splitlines() if l.startswith("error:")][-1:]
        print(f"(b) {how}: exit {p.returncode}, {line[0][:160] if line else ''}; step {before} intact")
    else:
        fails.append(f"(b) {how}: exit {p.returncode}, error names the file: {named}, previous "
                     f"checkpoint intact: {after_ok}, staging left: {staging}; stderr: {err.strip()[-300:]}")

src = f"{WORK}/ref"
big = max(os.path.getsize(f"{src}/checkpoints/step_{STEPS:09d}/{n}") for n in os.listdir(f"{src}/checkpoints/step_{STEPS:09d}"))
r1 = f"{WORK}/fsize"
shutil.copytree(src, r1)
def limit_fsize():
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (big // 2, big // 2))
disk_full(r1, limit_fsize, "ulimit -f (EFBIG)")
mnt = f"{WORK}/tmpfs"
os.makedirs(mnt)
used = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(src) for f in fs)
if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + big}", "tmpfs", mnt],
                  stderr=subprocess.DEVNULL).returncode == 0:
    open(f"{WORK}/mounted", "w").write(mnt)
    try:
        r2 = f"{mnt}/run"
        shutil.copytree(src, r2)
        disk_full(r2, None, "tmpfs full (ENOSPC)")
    finally:
        subprocess.run(["umount", mnt])
else:
    print("(b) tmpfs: cannot mount here (not privileged); the ulimit -f case ran")

# ---- (d) corrupt newest checkpoint, resume ----
r4 = f"{WORK}/corrupt"
shutil.copytree(src, r4)
newest = f"{r4}/checkpoints/step_{STEPS:09d}"
os.truncate(f"{newest}/model.safetensors", 100)
prev = newest_valid(r4)
p = train(r4, "--steps", str(STEPS + 3), "--set", "schedule.keep_checkpoints=1")
out, err = p.communicate()
resumed = f"step_{prev:09d}" in err and "resuming" in err
ab = f"{r4}/checkpoints/abandoned"
moved = os.path.isdir(ab) and any(os.path.isdir(f"{ab}/{d}/step_{STEPS:09d}") for d in os.listdir(ab))
if p.returncode == 0 and resumed and newest_valid(r4) == STEPS + 3 and moved:
    print(f"(d) resumed from step {prev} (newest valid), finished at {STEPS + 3}; damaged step {STEPS} moved to checkpoints/abandoned/")
else:
    fails.append(f"(d) exit {p.returncode}, resumed from {prev}: {resumed}, newest valid {newest_valid(r4)}, "
                 f"damaged moved aside: {moved}; {err.strip()[-300:]}")

json.dump({"kills": kills, "lost": lost, "disk_ok": disk_ok, "fails": fails}, open(f"{WORK}/result.json", "w"))
PY

# ---- (c) a stalled rank ----
STALLS=0 STALL_SECS="-" STALL_NOTE=""
if [ -x scripts/fault-stall.sh ]; then
  # the binaries this script just built, not a possibly stale release build
  if DDPM_TRAIN=$BIN DDPM_DATA=$ROOT/target/debug/ddpm-data scripts/fault-stall.sh | tee "$WORK/stall.log"; then
    STALLS=1
    STALL_SECS=$(sed -n 's/^stall: ended in \([0-9.]*\) s.*/\1/p' "$WORK/stall.log" | tail -1)
  else
    STALL_NOTE=" (c) FAILED: scripts/fault-stall.sh failed (log above)"
  fi
else
  STALL_NOTE=" (c) NOT RUN: scripts/fault-stall.sh is missing"
  echo "(c) not run: scripts/fault-stall.sh (the collective watchdog's stall test) is not in this tree"
fi

python3 - "$WORK/result.json" "$STALLS" "$STALL_SECS" "$STALL_NOTE" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); stalls, secs, note = sys.argv[2], sys.argv[3], sys.argv[4]
for f in r["fails"]:
    print("FAIL", f)
print(f"fault-inject: {r['kills']} kills survived, {r['lost']} lost, {r['disk_ok']} disk-full ok, "
      f"{stalls} stalls ended in {secs} s{note}")
sys.exit(1 if r["fails"] or "FAILED" in note else (3 if note else 0))
PY
