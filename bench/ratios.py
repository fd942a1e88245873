#!/usr/bin/env python3
"""Ratios for bench/unet.sh: candle's and PyTorch's `RESULT <round> <model> <metric> <values..>`
lines -> per-round figures, each side's median over the rounds, and their ratio (the best round of
each side as a second column). With `train_shards` results (ddpm-train's default CPU step: the
batch split over the threads, `train.thread_shards`) a line compares that with PyTorch's ordinary
step. The last line is the ratio line of the quickstart model, or of the first model when
quickstart was not run:

    cpu ratio candle/pytorch: train-step X, forward Y
"""
import statistics
import sys


def parse(path):
    """{(model, metric): [first value of each round, in round order]}"""
    r = {}
    for line in open(path):
        p = line.split()
        if len(p) >= 5 and p[0] == "RESULT":
            r.setdefault((p[2], p[3]), []).append(float(p[4]))
    return r


def main():
    c, t = parse(sys.argv[1]), parse(sys.argv[2])
    models = sys.argv[3].split(",")
    med = {}
    for m in models:
        cp, tp = c.get((m, "params")), t.get((m, "params"))
        if not cp or not tp:
            sys.exit(f"bench/unet.sh: error: no results for {m} (candle {bool(cp)}, pytorch {bool(tp)}): no ratio")
        if cp[0] != tp[0]:
            sys.exit(f"bench/unet.sh: error: {m}: parameter counts differ: candle {cp[0]:.0f}, pytorch {tp[0]:.0f}")
        print(f"{m}: {cp[0]:.0f} parameters in both")
        for k in ("forward", "train"):
            cv, tv = c[(m, k)], t[(m, k)]
            mc, mt = statistics.median(cv), statistics.median(tv)
            med[(m, k)] = mc / mt
            rounds = " / ".join(f"{a:.0f}:{b:.0f}" for a, b in zip(cv, tv))
            print(f"  {k:8s} candle {mc:9.1f} ms  pytorch {mt:9.1f} ms  ratio {mc / mt:.2f}"
                  f"  (best rounds {min(cv) / min(tv):.2f}; rounds candle:pytorch ms {rounds})")
        if (m, "train_shards") in c:
            # ddpm-train's default CPU step (train.thread_shards) against PyTorch's ordinary step.
            cv, tv = c[(m, "train_shards")], t[(m, "train")]
            mc, mt = statistics.median(cv), statistics.median(tv)
            med[(m, "train_shards")] = mc / mt
            rounds = " / ".join(f"{a:.0f}:{b:.0f}" for a, b in zip(cv, tv))
            print(f"  train, batch split over the threads as ddpm-train does: candle {mc:9.1f} ms"
                  f"  pytorch {mt:9.1f} ms  ratio {mc / mt:.2f}  (rounds {rounds})")
    key = ("small", "conv_64_64_k3_s1_32")
    if key in c and key in t:
        print(f"  small conv 64->64 3x3 32x32 fwd, first round: {c[key][0]:.1f}/{t[key][0]:.1f} ms")
    m = "quickstart" if "quickstart" in models else models[0]
    if (m, "train_shards") in med:
        print(f"cpu ratio candle/pytorch, training step as ddpm-train runs it: {med[(m, 'train_shards')]:.2f}")
    print(f"cpu ratio candle/pytorch: train-step {med[(m, 'train')]:.2f}, forward {med[(m, 'forward')]:.2f}")


if __name__ == "__main__":
    main()
