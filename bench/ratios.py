#!/usr/bin/env python3
"""Ratios for bench/unet.sh: candle's and PyTorch's `RESULT <round> <model> <metric> <values..>`
lines -> per-round figures, each side's median over the rounds, and their ratio (the best round of
each side as a second column).

Candle's training step is timed three ways: `train`, one forward+backward over the whole batch
with the threads inside each op (how PyTorch runs its step); `train_shards`, the batch split into
one shard per thread, each shard's forward+backward on its own thread (`train.thread_shards`);
`train_ddpm`, whichever of the two ddpm-train runs for this model and thread count
(`ddpm_ops::thread_shards`: shards up to 20M parameters). Each is compared with PyTorch's step.
The training step of the ratio line is `train_ddpm`, the step a user of ddpm-train gets; the line
before it gives the one-pass figure. Both lines are of the quickstart model, or of the first model
when quickstart was not run:

    cpu ratio candle/pytorch, training step in one threaded pass: Z
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
        for k, what in (("train_shards", "train, batch split over the threads"),
                        ("train_ddpm", "train as ddpm-train runs it")):
            if (m, k) not in c:
                continue
            cv, tv = c[(m, k)], t[(m, "train")]
            mc, mt = statistics.median(cv), statistics.median(tv)
            med[(m, k)] = mc / mt
            rounds = " / ".join(f"{a:.0f}:{b:.0f}" for a, b in zip(cv, tv))
            print(f"  {what}: candle {mc:9.1f} ms  pytorch {mt:9.1f} ms  ratio {mc / mt:.2f}"
                  f"  (rounds {rounds})")
    key = ("small", "conv_64_64_k3_s1_32")
    if key in c and key in t:
        print(f"  small conv 64->64 3x3 32x32 fwd, first round: {c[key][0]:.1f}/{t[key][0]:.1f} ms")
    m = "quickstart" if "quickstart" in models else models[0]
    if (m, "train_ddpm") not in med:
        sys.exit(f"bench/unet.sh: error: {m}: no train_ddpm result (bench_unet too old?): no ratio")
    print(f"cpu ratio candle/pytorch, training step in one threaded pass: {med[(m, 'train')]:.2f}")
    print(f"cpu ratio candle/pytorch: train-step {med[(m, 'train_ddpm')]:.2f}, forward {med[(m, 'forward')]:.2f}")

if __name__ == "__main__":
    main()
