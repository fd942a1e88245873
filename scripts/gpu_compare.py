#!/usr/bin/env python3
"""Comparisons for scripts/gpu-check.sh: GPU results against the CPU references packed with it.

  gpu_compare.py losses REF.jsonl GOT.jsonl FIRST_REL ALL_REL
      per-step training losses (metrics.jsonl, log_every = 1): the first step's relative difference must
      be <= FIRST_REL (same weights and batch: only summation order differs), every step's <= ALL_REL
      (the difference then also travels through the optimizer).
  gpu_compare.py metrics A.jsonl B.jsonl
      two runs' metrics.jsonl equal field for field except wall-clock fields (exact resume); floats to
      4e-16 relative (about 2 ulp: serde_json's float parsing when a resumed run rewrites earlier lines).
  gpu_compare.py checkpoints DIR_A DIR_B
      two checkpoints' manifest.json equal except creation time, writer and the config text (its hash is
      compared): same step, loader position,
      optimizer and RNG state, and every file (weights, EMAs, moments, trainer state) with the same sha256.
  gpu_compare.py images REF.h5 GOT.h5 MEAN_MAX FAR_LEVELS FAR_FRAC_MAX
      sampler outputs (`images` uint8): mean |difference| <= MEAN_MAX grey levels, and at most
      FAR_FRAC_MAX of the pixels differ by more than FAR_LEVELS levels; labels equal.

Prints one line of detail and exits 0 (pass), 1 (fail) or 2 (unreadable input). `losses` and `metrics`
need only the standard library; `images` needs numpy and h5py (present where PyTorch is installed).
"""
import json
import sys

WALL_CLOCK = ("images_per_sec", "sync_ms", "step_ms", "data_ms", "time", "elapsed_s")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_losses(path):
    out = {}
    for v in read_jsonl(path):
        if "step" in v and "loss" in v:
            out[int(v["step"])] = float(v["loss"])
    return out


def losses(ref_path, got_path, first_rel, all_rel):
    ref, got = step_losses(ref_path), step_losses(got_path)
    if not ref:
        print(f"no losses in {ref_path}")
        return 2
    if sorted(ref) != sorted(got):
        print(f"steps differ: reference {sorted(ref)}, got {sorted(got)}")
        return 1
    steps = sorted(ref)
    rel = [abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in steps]
    ok = rel[0] <= first_rel and max(rel) <= all_rel and all(g == g for g in got.values())
    worst = max(range(len(steps)), key=lambda i: rel[i])
    print(
        f"{len(steps)} steps; step {steps[0]}: cpu {ref[steps[0]]:.6g} gpu {got[steps[0]]:.6g} "
        f"rel {rel[0]:.2e} (<= {first_rel:g}); worst step {steps[worst]}: cpu {ref[steps[worst]]:.6g} "
        f"gpu {got[steps[worst]]:.6g} rel {rel[worst]:.2e} (<= {all_rel:g}); last step "
        f"{steps[-1]}: cpu {ref[steps[-1]]:.6g} gpu {got[steps[-1]]:.6g}"
    )
    return 0 if ok else 1


def metrics(a_path, b_path):
    def clean(path):
        return [{k: v for k, v in d.items() if k not in WALL_CLOCK} for d in read_jsonl(path)]

    a, b = clean(a_path), clean(b_path)
    if len(a) != len(b):
        print(f"{len(a)} metrics lines vs {len(b)}")
        return 1
    def same(u, v):
        # A resumed run re-reads the earlier lines of metrics.jsonl and writes them back, and serde_json
        # (built without `float_roundtrip`) parses floats to within about 1 ulp: those lines' floats may
        # move by that much. Anything else must be equal; the weights are compared bit for bit by
        # `checkpoints`.
        if isinstance(u, float) and isinstance(v, float):
            return abs(u - v) <= 4e-16 * max(abs(u), abs(v))
        return u == v

    for i, (x, y) in enumerate(zip(a, b)):
        if set(x) != set(y) or not all(same(x[k], y[k]) for k in x):
            keys = sorted(k for k in set(x) | set(y) if not same(x.get(k), y.get(k)))
            print(f"line {i} (step {x.get('step')}) differs in {keys}: {[(x.get(k), y.get(k)) for k in keys][:3]}")
            return 1
    print(f"{len(a)} metrics lines identical (wall-clock fields excluded; floats to 4e-16 relative)")
    return 0


def checkpoints(a_dir, b_dir):
    def manifest(d):
        with open(f"{d}/manifest.json") as f:
            m = json.load(f)
        # `config` holds the run directory and the schedule, which differ between the runs on purpose;
        # `config_hash` (everything that shapes the trajectory) is compared.
        for k in ("created_unix", "writer", "config"):
            m.pop(k, None)
        return m

    a, b = manifest(a_dir), manifest(b_dir)
    if a != b:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        detail = keys
        if "files" in keys:
            fa = {f["name"]: f.get("sha256") for f in a.get("files", [])}
            fb = {f["name"]: f.get("sha256") for f in b.get("files", [])}
            detail = [k for k in keys if k != "files"] + [
                f"file {n}" for n in sorted(set(fa) | set(fb)) if fa.get(n) != fb.get(n)
            ]
        print(f"checkpoints differ: {detail}")
        return 1
    names = ", ".join(f["name"] for f in a.get("files", []))
    print(f"step {a.get('step')}: manifests and file hashes identical ({names})")
    return 0


def images(ref_path, got_path, mean_max, far_levels, far_frac_max):
    import h5py
    import numpy as np

    with h5py.File(ref_path, "r") as f:
        ref = f["images"][...].astype(np.int32)
        ref_labels = f["labels"][...] if "labels" in f else None
    with h5py.File(got_path, "r") as f:
        got = f["images"][...].astype(np.int32)
        got_labels = f["labels"][...] if "labels" in f else None
    if ref.shape != got.shape:
        print(f"shapes differ: reference {ref.shape}, got {got.shape}")
        return 1
    if (ref_labels is None) != (got_labels is None) or (
        ref_labels is not None and not np.array_equal(ref_labels, got_labels)
    ):
        print("labels differ")
        return 1
    d = np.abs(ref - got)
    mean = float(d.mean())
    far = float((d > far_levels).mean())
    ok = mean <= mean_max and far <= far_frac_max
    print(
        f"{ref.shape[0]} images {ref.shape[1:]}: mean |diff| {mean:.3f} levels (<= {mean_max:g}), "
        f"{100 * far:.3f}% of pixels off by > {far_levels:g} (<= {100 * far_frac_max:g}%), "
        f"max {int(d.max())}, identical pixels {100 * float((d == 0).mean()):.2f}%"
    )
    return 0 if ok else 1


def main(argv):
    try:
        cmd = argv[1]
        if cmd == "losses":
            return losses(argv[2], argv[3], float(argv[4]), float(argv[5]))
        if cmd == "metrics":
            return metrics(argv[2], argv[3])
        if cmd == "checkpoints":
            return checkpoints(argv[2], argv[3])
        if cmd == "images":
            return images(argv[2], argv[3], float(argv[4]), float(argv[5]), float(argv[6]))
    except (IndexError, ValueError) as e:
        print(f"usage: see {argv[0]} ({e})")
        return 2
    except (OSError, KeyError, ImportError) as e:
        print(f"cannot read input: {e}")
        return 2
    print(f"unknown command {cmd!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
