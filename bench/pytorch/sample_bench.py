#!/usr/bin/env python3
"""PyTorch twin of `ddpm-sample --sampler ddim --steps 50 --cfg W` for bench/sample.sh.

The same U-Net as the Rust model (bench/pytorch/unet_bench.py, built from the [model] table of the
training config), random weights (speed does not depend on them), and the same sampler as
ddpm-sample's defaults: improved-diffusion's respacing "ddimN" of the config's T-step schedule,
DDIM with eta 0, x0 clipped to [-1, 1] (eps recomputed from the clipped x0), and classifier-free
guidance eps = (1 + w) eps_cond - w eps_uncond from one forward pass over the batch [x, x] with labels
[y, null]. Prints `RESULT sample seconds <s> images <n>`.
"""
import argparse
import math
import time
import tomllib

import torch

from unet_bench import UNet


def alpha_bar_schedule(diff):
    """alpha_bar_t for t = 0..T-1 of the config's schedule (cosine or linear, as ddpm-diffusion)."""
    T = diff.get("timesteps", 1000)
    if diff.get("schedule", "linear") == "cosine":
        s = 0.008
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    else:
        scale = 1000 / T
        lo, hi = scale * 1e-4, scale * 0.02
        betas = [lo + (hi - lo) * i / (T - 1) for i in range(T)]
    ab, out = 1.0, []
    for b in betas:
        ab *= 1 - b
        out.append(ab)
    return out


def ddim_timesteps(T, n):
    """improved-diffusion's space_timesteps(T, "ddim{n}"): the stride whose range has n steps."""
    for stride in range(1, T):
        if len(range(0, T, stride)) == n:
            return list(range(0, T, stride))
    raise SystemExit(f"cannot create exactly {n} steps with an integer stride from {T}")


@torch.inference_mode()
def sample(model, ab_full, steps, w, y, null, shape, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape)
    ab = [ab_full[t] for t in steps]  # respaced alpha_bar keeps the original values at the kept steps
    b = shape[0]
    y2 = torch.cat([y, torch.full_like(y, null)])
    for i in reversed(range(len(steps))):
        t2 = torch.full((2 * b,), float(steps[i]))
        out = model(torch.cat([x, x]), t2, y2)
        eps = (1 + w) * out[:b] - w * out[b:]
        a, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
        x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.toml")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with open(a.config, "rb") as f:
        doc = tomllib.load(f)
    cfg = dict(doc["model"])
    k = cfg["num_classes"]
    torch.manual_seed(0)
    model = UNet(**cfg).eval()
    for p in model.parameters():  # zero-initialised layers get weights, as after training
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=1 / math.sqrt(p[0].numel()))
    ab = alpha_bar_schedule(doc.get("diffusion", {}))
    steps = ddim_timesteps(len(ab), a.steps)
    y = torch.tensor([i % k for i in range(a.num)])
    shape = (a.num, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{sum(p.numel() for p in model.parameters())} parameters, DDIM-{len(steps)} CFG w={a.cfg}, "
          f"{a.num} images in one batch ({2 * a.num} per forward)")
    start = time.perf_counter()
    x = sample(model, ab, steps, a.cfg, y, k, shape, 0)
    secs = time.perf_counter() - start
    assert torch.isfinite(x).all()
    print(f"pytorch: {a.num} images in {secs:.2f} s, {a.num / secs:.3f} images/s")
    print(f"RESULT sample seconds {secs:.4f} images {a.num}")


if __name__ == "__main__":
    main()
