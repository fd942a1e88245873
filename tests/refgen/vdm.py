#!/usr/bin/env python3
"""Reference vectors for the continuous-time (VDM) math of ddpm-diffusion: writes tests/data/refs/vdm.json.

An independent float64 numpy re-implementation of Kingma et al. 2021 ("Variational Diffusion Models")
as this project uses it (see crates/diffusion/src/vdm/): gamma(t) = -log SNR(t), alpha^2 = sigmoid(-gamma),
sigma^2 = sigmoid(gamma); the fixed linear-in-log-SNR and truncated cosine schedules; VDM's three-layer
monotone network normalised to learnable endpoints; the three ELBO terms in bits/dim; the T-step
diffusion term; the continuous-time sampler steps and low-discrepancy times.

It is written from the paper's formulas, not from the Rust code: the network uses VDM's centred
sigmoid 2 (sigmoid(x) - 1/2) (the Rust code uses tanh(x/2)), derivatives are analytic and cross-checked
by complex-step differentiation, and the decoder likelihood follows tests/data/refs/README.md.

Run from the repository root (numpy only):   python3 tests/refgen/vdm.py
It prints its hand cross-checks (recorded in tests/data/refs/README.md) and fails if any is off.
"""

import json
import math
import os
import sys

import numpy as np

SEED = 0
LN2 = math.log(2.0)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "refs", "vdm.json")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- schedules

def linear_gamma(t, lo, hi):
    return lo + (hi - lo) * t


def cosine_gamma(t, lo, hi):
    a, b = np.arctan(np.exp(lo / 2.0)), np.arctan(np.exp(hi / 2.0))
    return 2.0 * np.log(np.tan(a + (b - a) * t))


def cosine_dgamma(t, lo, hi):
    a, b = np.arctan(np.exp(lo / 2.0)), np.arctan(np.exp(hi / 2.0))
    u = a + (b - a) * t
    # d/du 2 log tan u = 2 sec^2 u / tan u
    return 2.0 * (b - a) / (np.cos(u) ** 2 * np.tan(u))


def nnet_raw(t, p):
    """VDM NoiseSchedule_NNet without the first layer's bias: l1(t) + l3(2 (sigmoid(l2(2t - 1)) - 1/2)) / H."""
    t = np.asarray(t)
    h = len(p["w2"])
    w1, w2, b2, w3 = abs(p["w1"]), np.abs(p["w2"]), np.asarray(p["b2"]), np.abs(p["w3"])
    pre = np.multiply.outer(2.0 * t - 1.0, w2) + b2
    return w1 * t + (2.0 * (sigmoid(pre) - 0.5)) @ w3 / h


def nnet_draw(t, p):
    t = np.asarray(t)
    h = len(p["w2"])
    w1, w2, b2, w3 = abs(p["w1"]), np.abs(p["w2"]), np.asarray(p["b2"]), np.abs(p["w3"])
    s = sigmoid(np.multiply.outer(2.0 * t - 1.0, w2) + b2)
    return w1 + (2.0 * s * (1.0 - s) * 2.0 * w2) @ w3 / h


def learned_gamma(t, p):
    r0, r1 = nnet_raw(0.0, p), nnet_raw(1.0, p)
    return p["gamma_0"] + (p["gamma_1"] - p["gamma_0"]) * (nnet_raw(t, p) - r0) / (r1 - r0)


def learned_dgamma(t, p):
    r0, r1 = nnet_raw(0.0, p), nnet_raw(1.0, p)
    return (p["gamma_1"] - p["gamma_0"]) * nnet_draw(t, p) / (r1 - r0)


def gamma_fns(sched):
    kind = sched["type"]
    if kind == "linear_logsnr":
        lo, hi = sched["gamma_min"], sched["gamma_max"]
        return (lambda t: linear_gamma(np.asarray(t), lo, hi),
                lambda t: np.full(np.shape(t), hi - lo))
    if kind == "cosine":
        lo, hi = sched["gamma_min"], sched["gamma_max"]
        return (lambda t: cosine_gamma(np.asarray(t), lo, hi), lambda t: cosine_dgamma(np.asarray(t), lo, hi))
    return (lambda t: learned_gamma(t, sched), lambda t: learned_dgamma(t, sched))


def complex_step(f, t, h=1e-30):
    return np.imag(f(np.asarray(t, dtype=complex) + 1j * h)) / h


# ---------------------------------------------------------------- ELBO terms

def approx_cdf(x):
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def disc_loglik(x, mean, log_scale):
    c = x - mean
    inv = np.exp(-log_scale)
    cp, cm = approx_cdf(inv * (c + 1.0 / 255.0)), approx_cdf(inv * (c - 1.0 / 255.0))
    lo = np.log(np.maximum(cp, 1e-12))
    hi = np.log(np.maximum(1.0 - cm, 1e-12))
    mid = np.log(np.maximum(cp - cm, 1e-12))
    return np.where(x < -0.999, lo, np.where(x > 0.999, hi, mid))


def flat_mean(a):
    return a.reshape(a.shape[0], -1).mean(axis=1)


def bcast(v, like):
    return np.asarray(v).reshape((-1,) + (1,) * (like.ndim - 1))


def prior_bpd(x, g1):
    s2, a2 = sigmoid(g1), sigmoid(-g1)
    return flat_mean(0.5 * (s2 + a2 * x ** 2 - np.log(s2) - 1.0)) / LN2


def recon_bpd(x, z0, g0):
    mean = z0 / math.sqrt(sigmoid(-g0))
    return -flat_mean(disc_loglik(x, mean, 0.5 * g0)) / LN2


def diffusion_continuous(eps, eps_hat, dg):
    return 0.5 * dg * flat_mean((eps - eps_hat) ** 2) / LN2


def diffusion_discrete(eps, eps_hat, gt, gs, big_t):
    return 0.5 * big_t * np.expm1(gt - gs) * flat_mean((eps - eps_hat) ** 2) / LN2


# ---------------------------------------------------------------- JSON helpers

def shapes_of(obj, prefix, out):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k != "shapes":
                shapes_of(v, f"{prefix}.{k}" if prefix else k, out)
    elif isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            shapes_of(v, f"{prefix}[{i}]", out)
    elif isinstance(obj, np.ndarray):
        out[prefix] = list(obj.shape)
    return out


def jsonable(obj):
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def finish_case(case):
    case["shapes"] = shapes_of(case, "", {})
    return case


# ---------------------------------------------------------------- cases

T_POINTS = np.array([0.0, 1e-3, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0])


def learned_params(rng, h):
    return {
        "type": "learned",
        "gamma_0": -9.5,
        "gamma_1": 4.25,
        "w1": -0.8,
        "w2": rng.normal(size=h) * 2.0,
        "b2": rng.normal(size=h),
        "w3": rng.normal(size=h) * 1.5,
    }


def schedule_case(name, sched):
    g, dg = gamma_fns(sched)
    gam = np.asarray(g(T_POINTS), dtype=float)
    expected = {
        "gamma": gam,
        "dgamma": np.asarray(dg(T_POINTS), dtype=float),
        "alpha2": sigmoid(-gam),
        "sigma2": sigmoid(gam),
        "snr": np.exp(-gam),
    }
    if sched["type"] == "learned":
        expected["raw"] = nnet_raw(T_POINTS, sched)
        expected["raw_derivative"] = nnet_draw(T_POINTS, sched)
    return finish_case({"name": name, "kind": "schedule", "schedule": sched,
                        "inputs": {"t": T_POINTS.copy()}, "expected": expected})


def elbo_case(name, sched, rng):
    shape = (4, 3, 4, 4)
    xu = rng.integers(0, 256, size=shape)
    xu.flat[0], xu.flat[1] = 0, 255
    x = xu / 255.0 * 2.0 - 1.0
    eps, eps0 = rng.normal(size=shape), rng.normal(size=shape)
    eps_hat = eps + 0.3 * rng.normal(size=shape)
    t = np.array([0.0, 0.37, 0.73, 1.0])
    g, dg = gamma_fns(sched)
    gt, dgt = np.asarray(g(t), dtype=float), np.asarray(dg(t), dtype=float)
    g0, g1 = float(g(0.0)), float(g(1.0))
    z_t = np.sqrt(bcast(sigmoid(-gt), x)) * x + np.sqrt(bcast(sigmoid(gt), x)) * eps
    z_0 = math.sqrt(sigmoid(-g0)) * x + math.sqrt(sigmoid(g0)) * eps0
    prior, recon = prior_bpd(x, g1), recon_bpd(x, z_0, g0)
    diff = diffusion_continuous(eps, eps_hat, dgt)
    discrete = []
    for big_t in (10, 1000):
        td = np.maximum(np.ceil(t * big_t), 1.0) / big_t
        s = td - 1.0 / big_t
        gtd, gs = np.asarray(g(td), dtype=float), np.asarray(g(s), dtype=float)
        discrete.append({"T": big_t, "t": td, "s": s, "gamma_t": gtd, "gamma_s": gs,
                         "diffusion_bpd": diffusion_discrete(eps, eps_hat, gtd, gs, big_t)})
    return finish_case({
        "name": name, "kind": "elbo", "schedule": sched,
        "inputs": {"x_uint8": xu, "x": x, "eps": eps, "eps_0": eps0, "eps_hat": eps_hat, "t": t},
        "expected": {"gamma_t": gt, "dgamma_t": dgt, "gamma_0": g0, "gamma_1": g1, "z_t": z_t, "z_0": z_0,
                     "prior_bpd": prior, "diffusion_bpd": diff, "reconstruction_bpd": recon,
                     "total_bpd": prior + diff + recon, "discrete": discrete},
    })


def sampler_case(rng):
    shape = (2, 1, 3, 3)
    z_t, eps_hat, noise = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)
    steps = []
    for gt, gs in ((4.0, 1.5), (-2.0, -13.3), (5.0, -13.3)):
        k = -math.expm1(gs - gt)
        a = math.sqrt(sigmoid(-gs) / sigmoid(-gt))
        b = a * k * math.sqrt(sigmoid(gt))
        c = math.sqrt(sigmoid(gs)) * math.sqrt(k)
        at, st, as_, ss = (math.sqrt(sigmoid(-gt)), math.sqrt(sigmoid(gt)),
                           math.sqrt(sigmoid(-gs)), math.sqrt(sigmoid(gs)))
        x_hat = (z_t - st * eps_hat) / at
        xc = np.clip(x_hat, -1.0, 1.0)
        eps_c = (z_t - at * xc) / st
        steps.append({"gamma_t": gt, "gamma_s": gs, "coefficients": np.array([a, b, c]),
                      "ancestral_z_s": a * z_t - b * eps_hat + c * noise,
                      "ddim_z_s": as_ * x_hat + ss * eps_hat,
                      "ddim_clip_z_s": as_ * xc + ss * eps_c,
                      "final_mean": np.clip(z_t / math.sqrt(sigmoid(-gs)), -1.0, 1.0)})
    return finish_case({"name": "sampler_steps", "kind": "sampler",
                        "inputs": {"z_t": z_t, "eps_hat": eps_hat, "noise": noise}, "steps": steps})


def low_discrepancy_case():
    u, n, first, count = 0.6180339887498949, 12, 5, 7
    t = np.mod(u + (first + np.arange(count)) / n, 1.0)
    return finish_case({"name": "low_discrepancy", "kind": "low_discrepancy", "u": u, "n": n,
                        "first": first, "count": count, "expected": {"t": t}})


# ---------------------------------------------------------------- hand cross-checks

def crosschecks(cases):
    rows = []

    def row(what, got, want, tol=1e-12):
        err = float(np.max(np.abs(np.asarray(got) - np.asarray(want)) / np.maximum(1.0, np.abs(want))))
        rows.append((what, err, tol))

    g = linear_gamma(np.array([0.0, 0.5, 1.0]), -13.3, 5.0)
    # By hand: gamma(0) = -13.3, gamma(0.5) = (-13.3 + 5) / 2 = -4.15, gamma(1) = 5, SNR = exp(-gamma).
    row("linear log-SNR: SNR(0), SNR(0.5), SNR(1) vs exp(13.3), exp(4.15), exp(-5) (relative)",
        np.exp(-g) / np.array([math.exp(13.3), math.exp(4.15), math.exp(-5.0)]), 1.0)
    a, b = math.atan(math.exp(-6.65)), math.atan(math.exp(2.5))
    row("cosine: alpha^2(0.5) vs cos^2((a+b)/2)", sigmoid(-cosine_gamma(0.5, -13.3, 5.0)),
        math.cos((a + b) / 2.0) ** 2)
    row("cosine: gamma(0), gamma(1) vs -13.3, 5", cosine_gamma(np.array([0.0, 1.0]), -13.3, 5.0), [-13.3, 5.0])
    s2 = 1.0 / (1.0 + math.exp(-5.0))
    row("prior KL at x = 0, gamma_1 = 5 vs 0.5 (s2 - ln s2 - 1) / ln 2",
        prior_bpd(np.zeros((1, 2)), 5.0), 0.5 * (s2 - math.log(s2) - 1.0) / LN2)
    row("prior KL at x = 1, gamma_1 = 0 vs 0.5 (0.5 + 0.5 - ln 0.5 - 1) / ln 2 = 0.5",
        prior_bpd(np.ones((1, 1)), 0.0), 0.5)
    for c in cases:
        if c["kind"] == "schedule":
            g, dg = gamma_fns(c["schedule"])
            tt = T_POINTS[1:-1] if c["schedule"]["type"] == "cosine" else T_POINTS
            row(f"{c['name']}: dgamma vs complex-step derivative", dg(tt), complex_step(g, tt))
            if c["schedule"]["type"] == "learned":
                row(f"{c['name']}: gamma(0), gamma(1) vs gamma_0, gamma_1", g(np.array([0.0, 1.0])),
                    [c["schedule"]["gamma_0"], c["schedule"]["gamma_1"]])
    cos = {"type": "cosine", "gamma_min": -13.3, "gamma_max": 5.0}
    g, dg = gamma_fns(cos)
    big_t = 10 ** 6
    e, eh = np.array([[0.4, -1.0, 2.0]]), np.array([[0.1, -0.7, 1.5]])
    row("cosine: T-step diffusion term at T = 1e6 vs continuous (relative, O(1/T))",
        diffusion_discrete(e, eh, g(0.5), g(0.5 - 1.0 / big_t), big_t) / diffusion_continuous(e, eh, dg(0.5 - 0.5 / big_t)), 1.0, 1e-4)
    return rows


def main():
    rng = np.random.default_rng(SEED)
    lin = {"type": "linear_logsnr", "gamma_min": -13.3, "gamma_max": 5.0}
    cos = {"type": "cosine", "gamma_min": -13.3, "gamma_max": 5.0}
    learned = learned_params(rng, 8)
    cases = [schedule_case("linear_logsnr", lin), schedule_case("cosine", cos),
             schedule_case("learned_H8", learned)]
    cases += [elbo_case("elbo_cosine", cos, rng), elbo_case("elbo_learned_H8", learned, rng),
              sampler_case(rng), low_discrepancy_case()]
    rows = crosschecks(cases)
    bad = [r for r in rows if not r[1] <= r[2]]
    for what, err, tol in rows:
        print(f"| {what} | {err:.2e} | {tol:.0e} |")
    doc = {
        "file": "vdm.json",
        "generator": "tests/refgen/vdm.py",
        "dtype": "float64",
        "split": "public",
        "rng_seed": SEED,
        "description": "Continuous-time VDM math: fixed and learned gamma(t), the three ELBO terms in bits/dim, "
                       "the T-step diffusion term, continuous-time sampler steps, low-discrepancy times.",
        "cases": jsonable(cases),
        "shapes": {},
    }
    text = json.dumps(doc, indent=1, allow_nan=False)
    with open(OUT, "w") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.normpath(OUT)} ({len(text) + 1} bytes)")
    if bad:
        sys.exit(f"cross-checks out of tolerance: {bad}")


if __name__ == "__main__":
    main()
