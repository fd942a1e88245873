#!/usr/bin/env python3
"""PyTorch twin of ddpm-unet's U-Net, for speed comparison and a numerical cross-check.

Builds the same architecture as `ddpm_unet::UNet` (improved-diffusion layout, same parameter names
and shapes), prints its parameter count, and times forward and forward+backward at the same batch
and shape as crates/unet/examples/bench_unet.rs. Lines `RESULT <model> <metric> <ms>` are parsed by
bench/unet.sh. With --export FILE it instead writes random weights, an input and the eval-mode
output to a safetensors file that the Rust example checks with `--crosscheck FILE`.
"""
import argparse
import contextlib
import json
import math
import struct
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_features(t, dim, max_period=10000.0):
    # cos first, frequencies computed in f32 (improved-diffusion convention)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, groups, scale_shift, dropout):
        super().__init__()
        self.scale_shift = scale_shift
        self.cout = cout
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout if scale_shift else cout))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Attention(nn.Module):
    def __init__(self, ch, heads, groups):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x):
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))  # [B, 3C, T], channels [head][q|k|v][d]
        d = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * d, -1).split(d, dim=1)
        w = torch.einsum("bct,bcs->bts", q / math.sqrt(d), k).softmax(dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return x + self.proj_out(a).reshape(b, c, hh, ww)


class Down(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout,
                 channel_mult, num_classes=None, num_heads=1, num_head_channels=None, use_scale_shift_norm=False,
                 learn_sigma=False, num_groups=32):
        super().__init__()
        mc, g, ss = model_channels, num_groups, use_scale_shift_norm
        heads = (lambda ch: ch // num_head_channels) if num_head_channels else (lambda ch: num_heads)
        e = 4 * mc
        self.mc = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, e), nn.SiLU(), nn.Linear(e, e))
        self.label_emb = nn.Embedding(num_classes + 1, e) if num_classes else None
        ch = mc * channel_mult[0]
        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skips, res = [ch], image_size
        for lvl, m in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mc * m, e, g, ss, dropout)]
                ch = mc * m
                if res in attention_resolutions:
                    layers.append(Attention(ch, heads(ch), g))
                self.input_blocks.append(Stage(layers))
                skips.append(ch)
            if lvl + 1 < len(channel_mult):
                self.input_blocks.append(Stage([Down(ch)]))
                skips.append(ch)
                res //= 2
        self.middle_block = Stage([ResBlock(ch, ch, e, g, ss, dropout), Attention(ch, heads(ch), g),
                                   ResBlock(ch, ch, e, g, ss, dropout)])
        self.output_blocks = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mc * m, e, g, ss, dropout)]
                ch = mc * m
                if res in attention_resolutions:
                    layers.append(Attention(ch, heads(ch), g))
                if lvl and i == num_res_blocks:
                    layers.append(Up(ch))
                    res *= 2
                self.output_blocks.append(Stage(layers))
        out_ch = in_channels * (2 if learn_sigma else 1)
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(self, x, t, y=None):
        emb = self.time_embed(timestep_features(t, self.mc))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for s in self.input_blocks:
            h = s(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for s in self.output_blocks:
            h = s(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


CONFIGS = {
    "small": dict(image_size=32, in_channels=3, model_channels=64, num_res_blocks=2, attention_resolutions=[16],
                  dropout=0.1, channel_mult=[1, 2, 2, 2]),
    "cifar10": dict(image_size=32, in_channels=3, model_channels=128, num_res_blocks=2, attention_resolutions=[16],
                    dropout=0.1, channel_mult=[1, 2, 2, 2]),
}
CONFIGS["cond"] = dict(CONFIGS["small"], num_classes=10, use_scale_shift_norm=True, learn_sigma=True,
                       num_head_channels=32)
# The tiny model whose export is checked into crates/unet/tests/data/ (a CI test compares candle with it).
CONFIGS["tiny"] = dict(image_size=8, in_channels=3, model_channels=8, num_res_blocks=1, attention_resolutions=[4],
                       dropout=0.0, channel_mult=[1, 2], num_classes=3, use_scale_shift_norm=True, learn_sigma=True,
                       num_head_channels=4, num_groups=4)




def model_config(name):
    """A preset, or "quickstart" / a path ending in .toml: the [model] table of that training config
    (configs/quickstart.toml for "quickstart", relative to the repository root), as the Rust bench reads it."""
    if name in CONFIGS:
        return CONFIGS[name]
    path = "configs/quickstart.toml" if name == "quickstart" else name
    if not path.endswith(".toml"):
        raise SystemExit(f"unknown model {name} (quickstart, {', '.join(CONFIGS)}, or a config .toml)")
    with open(path, "rb") as f:
        return dict(tomllib.load(f)["model"])


def bench_labels(cfg, batch):
    """Labels as training draws them (the Rust bench's rule): every tenth example has the null label
    (num_classes, label dropout 0.1), the others cycle through the classes. None when unconditional."""
    k = cfg.get("num_classes")
    if not k:
        return None
    return torch.tensor([k if i % 10 == 9 else i % k for i in range(batch)], device=DEVICE)


DEVICE = torch.device("cpu")
AMP = None  # torch.bfloat16 under --amp bf16


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(reps, fn):
    fn()
    sync()
    times = []
    for _ in range(max(reps, 1)):
        s = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - s) * 1e3)
    times.sort()
    return times[len(times) // 2]


def autocast():
    if AMP is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=DEVICE.type, dtype=AMP)


def bench(name, batch, reps, full_step=False):
    torch.manual_seed(0)
    cfg = model_config(name)
    model = UNet(**cfg).to(DEVICE)
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: parameters {n}")
    print(f"RESULT {name} params {n}")
    s, c = cfg["image_size"], cfg["in_channels"]
    x = torch.randn(batch, c, s, s, device=DEVICE)
    noise = torch.randn(batch, c, s, s, device=DEVICE)
    t = torch.tensor([float(i * 61 % 1000) for i in range(batch)], device=DEVICE)
    y = bench_labels(cfg, batch)
    model.eval()
    with torch.no_grad(), autocast():
        fwd = median_ms(reps, lambda: model(x, t, y))
    print(f"{name}: forward batch {batch}: {fwd:.1f} ms")
    print(f"RESULT {name} forward {fwd:.3f}")
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = (model(x, t, y).float() - noise).pow(2).mean()
        loss.backward()

    train = median_ms(reps, step)
    print(f"{name}: forward+backward batch {batch}: {train:.1f} ms")
    print(f"RESULT {name} train {train:.3f}")
    if full_step:
        # What one ddpm-train step does besides forward and backward: noising x_t from x_0 at random
        # timesteps, AdamW with gradient clipping, one EMA update (f32 master weights and state).
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
        ema = [p.detach().clone() for p in model.parameters()]
        ac = torch.cos(torch.linspace(0, 1.5, 1000, device=DEVICE)) ** 2

        def full():
            ts = torch.randint(0, 1000, (batch,), device=DEVICE)
            a = ac[ts][:, None, None, None]
            eps = torch.randn_like(x)
            xt = a.sqrt() * x + (1 - a).sqrt() * eps
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = (model(xt, ts.float(), y).float() - eps).pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.9999)

        full_ms = median_ms(reps, full)
        print(f"{name}: full training step batch {batch}: {full_ms:.1f} ms")
        print(f"RESULT {name} step {full_ms:.3f}")


def conv_ops(batch, reps):
    # The speed issue's reference shape: 64->64 3x3 at 32x32.
    x = torch.randn(batch, 64, 32, 32)
    w = torch.randn(64, 64, 3, 3)
    y = F.conv2d(x, w, padding=1)
    g = torch.randn_like(y)
    f = median_ms(reps, lambda: F.conv2d(x, w, padding=1))
    dx = median_ms(reps, lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1))
    dw = median_ms(reps, lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1))
    print(f"  torch conv 64->64 k3 s1 32x32: {f:.1f} / {dx:.1f} / {dw:.1f} ms (fwd / dX / dW)")
    print(f"RESULT small conv_64_64_k3_s1_32 {f:.3f} {dx:.3f} {dw:.3f}")


def write_safetensors(path, tensors, metadata):
    header, blobs, off = {"__metadata__": metadata}, [], 0
    for k in sorted(tensors):
        b = tensors[k].detach().contiguous().to(torch.float32).numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(tensors[k].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def export(path, name):
    torch.manual_seed(1)
    cfg = model_config(name)
    model = UNet(**cfg).eval()
    with torch.no_grad():
        # Non-zero everywhere, including the zero-initialised layers; 1-D "weight"s are GroupNorm scales.
        for pname, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            elif pname.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        s = cfg["image_size"]
        x = torch.randn(2, cfg["in_channels"], s, s)
        t = torch.tensor([3.0, 917.0])
        y = torch.tensor([1, cfg["num_classes"]]) if cfg.get("num_classes") else None
        out = model(x, t, y)
    tensors = dict(model.state_dict())
    tensors.update({"io.x": x, "io.t": t, "io.out": out})
    if y is not None:
        tensors["io.y"] = y.float()
    write_safetensors(path, tensors, {"config": json.dumps(cfg), "torch": torch.__version__})
    print(f"exported {len(model.state_dict())} parameters of {name} to {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="small,cifar10")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-ops", action="store_true")
    ap.add_argument("--export", metavar="FILE")
    ap.add_argument("--export-model", default="small")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", default="off", choices=["off", "bf16"], help="bf16 autocast")
    ap.add_argument("--tf32", default="off", choices=["off", "on"],
                    help="TF32 in cuDNN convolutions and matmuls (PyTorch allows it in cuDNN by default)")
    ap.add_argument("--full-step", action="store_true", help="also time noising + AdamW + EMA steps")
    a = ap.parse_args()
    global DEVICE, AMP
    DEVICE = torch.device(a.device)
    AMP = torch.bfloat16 if a.amp == "bf16" else None
    if DEVICE.type == "cuda":
        torch.backends.cudnn.allow_tf32 = a.tf32 == "on"
        torch.backends.cuda.matmul.allow_tf32 = a.tf32 == "on"
        torch.backends.cudnn.benchmark = True
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.export:
        export(a.export, a.export_model)
        return
    print(f"torch {torch.__version__}, CPU threads: {torch.get_num_threads()}, mkldnn: {torch.backends.mkldnn.is_available()}")
    if DEVICE.type == "cuda":
        print(f"cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}, "
              f"amp {a.amp}, tf32 {a.tf32}, cudnn.benchmark on")
    for m in a.models.split(","):
        bench(m, a.batch, a.reps, a.full_step)
    if not a.no_ops and DEVICE.type == "cpu":
        conv_ops(a.batch, a.reps)


if __name__ == "__main__":
    main()
