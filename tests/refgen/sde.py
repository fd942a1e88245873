#!/usr/bin/env python3
"""Reference trajectories for the score-SDE and EDM stochastic samplers (tests/data/refs/sde_samplers.json).

An independent float64 numpy implementation, written from the papers (Song et al. 2021, "Score-Based
Generative Modeling through Stochastic Differential Equations", Sec. 4 and App. F/G; Karras et al.
2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 2), not from the
Rust code. Only numpy is needed:

    python3 tests/refgen/sde.py                    # writes tests/data/refs/sde_samplers.json
    python3 tests/refgen/sde.py --check-only       # prints the closed-form cross-checks, writes nothing

The model is a toy with an exact score: data x0 ~ N(mu, diag(s^2)) (mu, s per element), for which
E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), a = abar at the model's timestep.
All noise is drawn here (numpy, seed 0) and stored, so nobody has to reproduce this RNG.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "refs", "sde_samplers.json")

TOY_VP = "eps(x, t) = sqrt(1 - a) * (x - sqrt(a) * mu) / (a * s^2 + 1 - a), a = alphas_cumprod[t] of the full schedule"
TOY_VE = "d(x, sigma) = sigma * (x - mu) / (s^2 + sigma^2)"


# ---------------------------------------------------------------- schedules (improved-diffusion)
def betas_for(schedule, T):
    if schedule == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if schedule == "cosine":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    raise ValueError(schedule)


def respaced_betas(ac_full, use):
    """improved-diffusion SpacedDiffusion: beta'_k = 1 - ac[t_k] / ac[t_{k-1}], ac[t_{-1}] = 1."""
    out, last = [], 1.0
    for t in sorted(use):
        out.append(1.0 - ac_full[t] / last)
        last = ac_full[t]
    return np.array(out)


# ---------------------------------------------------------------- the toy model
def toy_eps(x, a, mu, s):
    return math.sqrt(1 - a) * (x - math.sqrt(a) * mu) / (a * s * s + 1 - a)


def toy_d(x, sigma, mu, s):
    return sigma * (x - mu) / (s * s + sigma * sigma)


# ---------------------------------------------------------------- score-SDE steps (VP-SDE, Song et al.)
def per_sample_norm(v):
    return np.sqrt((v.reshape(v.shape[0], -1) ** 2).sum(axis=1))


def bcast(v, like):
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def predictor(kind, x, score, beta, z, last):
    # reverse-time VP-SDE dx = [-beta/2 x - beta score] dt + sqrt(beta) dw, stepped back by beta dt = beta_k
    if kind == "euler_maruyama":
        x_mean = x + beta * (0.5 * x + score)
    elif kind == "reverse_diffusion":
        # x - [f - g^2 score] with the discrete f = (sqrt(1 - beta) - 1) x, g = sqrt(beta)
        x_mean = x - ((math.sqrt(1 - beta) - 1) * x - beta * score)
    else:
        raise ValueError(kind)
    return x_mean if last else x_mean + math.sqrt(beta) * z


def langevin(x, score, z, alpha, snr):
    g = per_sample_norm(score)
    n = per_sample_norm(z)
    step = 2 * alpha * (snr * n / g) ** 2
    return x + bcast(step, x) * score + bcast(np.sqrt(2 * step), x) * z, step


def sde_trajectory(case_cfg, x_T, mu, s, noise):
    T, schedule, use = case_cfg["T"], case_cfg["schedule"], case_cfg["use_timesteps"]
    ac_full = np.cumprod(1 - betas_for(schedule, T))
    rb = respaced_betas(ac_full, use)
    ac_r = np.cumprod(1 - rb)
    sampler = case_cfg["sampler"]
    if sampler == "pc":
        pred, nc, snr = case_cfg["params"]["predictor"], case_cfg["params"]["corrector_steps"], case_cfg["params"]["snr"]
    else:
        pred, nc, snr = sampler, 0, None
    x = x_T.copy()
    samples, eps_all, t_model_all, step_sizes = [x.copy()], [], [], []
    draw = 0
    for k in reversed(range(len(use))):
        tm = use[k]
        a_model = ac_full[tm]
        std = math.sqrt(1 - ac_r[k])
        for _ in range(nc):
            e = toy_eps(x, a_model, mu, s)
            eps_all.append(e)
            t_model_all.append(tm)
            x, st = langevin(x, -e / std, noise[draw], 1 - rb[k], snr)
            draw += 1
            step_sizes.append(st)
        e = toy_eps(x, a_model, mu, s)
        eps_all.append(e)
        t_model_all.append(tm)
        x = predictor(pred, x, -e / std, rb[k], noise[draw], k == 0)
        draw += 1
        samples.append(x.copy())
    assert draw == len(noise)
    out = {
        "respaced_betas": rb,
        "t_model": t_model_all,
        "model_eps": np.stack(eps_all),
        "samples": np.stack(samples),
    }
    if sampler == "pc":
        out["langevin_step_sizes"] = np.stack(step_sizes)
    return out


# ---------------------------------------------------------------- EDM Algorithm 2
def edm_trajectory(p, sigmas, x0, mu, s, noise):
    n = len(sigmas) - 1
    x = x0.copy()
    samples, ds, gammas, hats = [x.copy()], [], [], []
    for i in range(n):
        sig, nxt = sigmas[i], sigmas[i + 1]
        gamma = min(p["s_churn"] / n, math.sqrt(2) - 1) if p["s_tmin"] <= sig <= p["s_tmax"] else 0.0
        hat = sig + gamma * sig
        x_hat = x + math.sqrt(hat * hat - sig * sig) * p["s_noise"] * noise[i]
        d = toy_d(x_hat, hat, mu, s)
        ds.append(d)
        x = x_hat + (nxt - hat) * d
        if nxt != 0:
            d2 = toy_d(x, nxt, mu, s)
            ds.append(d2)
            x = x_hat + (nxt - hat) * 0.5 * (d + d2)
        gammas.append(gamma)
        hats.append(hat)
        samples.append(x.copy())
    return {"gammas": np.array(gammas), "sigma_hats": np.array(hats), "d": np.stack(ds), "samples": np.stack(samples)}


def karras_sigmas(n, smin=0.002, smax=80.0, rho=7.0):
    i = np.arange(n)
    sig = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return np.concatenate([sig, [0.0]])


# ---------------------------------------------------------------- closed-form cross-checks
def chain_moments(kind, schedule, T, mu, s):
    """Exact mean and variance of the full T-step predictor chain on scalar Gaussian data, x_T ~ N(0, 1):
    with the exact score every step is x <- A x + b + c z, so m <- A m + b, v <- A^2 v + c^2."""
    b_ = betas_for(schedule, T)
    ac = np.cumprod(1 - b_)
    m, v = 0.0, 1.0
    for k in reversed(range(T)):
        a, beta = ac[k], b_[k]
        q = a * s * s + 1 - a  # score = -(x - sqrt(a) mu) / q
        cx = (1 + 0.5 * beta) if kind == "euler_maruyama" else (2 - math.sqrt(1 - beta))
        A = cx - beta / q
        b = beta * math.sqrt(a) * mu / q
        c2 = beta if k > 0 else 0.0
        m, v = A * m + b, A * A * v + c2
    return m, v


def monte_carlo(kind, schedule, T, mu, s, n, rng):
    b_ = betas_for(schedule, T)
    ac = np.cumprod(1 - b_)
    x = rng.standard_normal(n)
    for k in reversed(range(T)):
        e = toy_eps(x, ac[k], mu, s)
        x = predictor(kind, x, -e / math.sqrt(1 - ac[k]), b_[k], rng.standard_normal(n), k == 0)
    return x.mean(), x.var()


def crosschecks():
    rng = np.random.default_rng(1)
    mu, s = 0.3, 0.5
    lines = []
    for kind in ["euler_maruyama", "reverse_diffusion"]:
        for sch in ["linear", "cosine"]:
            m, v = chain_moments(kind, sch, 1000, mu, s)
            mm, mv = monte_carlo(kind, sch, 1000, mu, s, 200000, rng)
            lines.append(
                f"{kind:17s} {sch:6s} T=1000: exact chain mean {m:.5f} std {math.sqrt(v):.5f} | "
                f"Monte Carlo (2e5) mean {mm:.5f} std {math.sqrt(mv):.5f} | data mean {mu} std {s}"
            )
    # EDM Algorithm 2 with many levels recovers the data distribution
    sig = karras_sigmas(256)
    x = sig[0] * rng.standard_normal(200000)
    p = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.0}
    out = edm_trajectory(p, sig, x, mu, s, rng.standard_normal((256, 200000)))
    xf = out["samples"][-1]
    lines.append(f"edm S_churn=40 256 levels: Monte Carlo (2e5) mean {xf.mean():.5f} std {xf.std():.5f} | data mean {mu} std {s}")
    return lines


# ---------------------------------------------------------------- JSON output
def tolist(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def shapes_of(d, prefix=""):
    out = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(shapes_of(v, path + "."))
        elif isinstance(v, np.ndarray):
            out[path] = list(v.shape)
        elif isinstance(v, list) and v and isinstance(v[0], (int, float)):
            out[path] = [len(v)]
    return out


def jsonable(d):
    if isinstance(d, dict):
        return {k: jsonable(v) for k, v in d.items()}
    return tolist(d)


def check_finite(v):
    if isinstance(v, dict):
        for x in v.values():
            check_finite(x)
    elif isinstance(v, np.ndarray):
        assert np.all(np.isfinite(v))
    elif isinstance(v, float):
        assert math.isfinite(v)


def build():
    rng = np.random.default_rng(0)
    shape = (2, 2, 3, 3)
    mu = rng.uniform(-0.5, 0.5, shape[1:])
    s = rng.uniform(0.3, 0.8, shape[1:])
    cases = []
    sde_cases = [
        dict(name="em_linear_T1000_10", sampler="euler_maruyama", schedule="linear", T=1000,
             use_timesteps=list(range(0, 1000, 100))),
        dict(name="rd_cosine_T1000_10", sampler="reverse_diffusion", schedule="cosine", T=1000,
             use_timesteps=[0, 1, 5, 50, 200, 400, 600, 800, 950, 999]),
        dict(name="pc_rd_langevin2_linear_T1000_8", sampler="pc", schedule="linear", T=1000,
             use_timesteps=[0, 125, 250, 375, 500, 625, 750, 875],
             params={"predictor": "reverse_diffusion", "corrector_steps": 2, "snr": 0.16}),
        dict(name="pc_em_langevin1_cosine_T100_6", sampler="pc", schedule="cosine", T=100,
             use_timesteps=[0, 20, 40, 60, 80, 99],
             params={"predictor": "euler_maruyama", "corrector_steps": 1, "snr": 0.1}),
    ]
    for cfg in sde_cases:
        nc = cfg.get("params", {}).get("corrector_steps", 0)
        n_draw = len(cfg["use_timesteps"]) * (nc + 1)
        x_T = rng.standard_normal(shape)
        noise = rng.standard_normal((n_draw,) + shape)
        exp = sde_trajectory(cfg, x_T, mu, s, noise)
        case = dict(cfg)
        case["toy_model"] = TOY_VP
        case["inputs"] = {"x_T": x_T, "data_mean": mu, "data_std": s, "noise": noise}
        case["expected"] = exp
        cases.append(case)
    edm_cases = [
        dict(name="edm_churn_capped_8", n=8, params={"s_churn": 80.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}),
        dict(name="edm_churn_small_6", n=6, params={"s_churn": 1.5, "s_tmin": 0.01, "s_tmax": 1.0, "s_noise": 1.007}),
        dict(name="edm_deterministic_5", n=5, params={"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 1e30, "s_noise": 1.0}),
    ]
    for cfg in edm_cases:
        sig = karras_sigmas(cfg["n"])
        x0 = sig[0] * rng.standard_normal(shape)
        noise = rng.standard_normal((cfg["n"],) + shape)
        exp = edm_trajectory(cfg["params"], sig, x0, mu, s, noise)
        cases.append({
            "name": cfg["name"], "sampler": "edm", "params": cfg["params"], "toy_model": TOY_VE,
            "inputs": {"x_init": x0, "sigmas": sig, "data_mean": mu, "data_std": s, "noise": noise},
            "expected": exp,
        })
    out_cases = []
    for c in cases:
        check_finite(c)
        shp = shapes_of(c)
        jc = jsonable(c)
        jc["shapes"] = shp
        out_cases.append(jc)
    return {
        "file": "sde_samplers.json",
        "generator": f"tests/refgen/sde.py (numpy {np.__version__}, python {sys.version.split()[0]}, float64)",
        "dtype": "float64",
        "split": "public",
        "rng_seed": 0,
        "description": "Score-SDE samplers (reverse-SDE Euler-Maruyama, reverse diffusion, predictor-corrector with "
                       "Langevin corrector) on respaced DDPM chains and EDM Algorithm 2 in sigma space, driven by the "
                       "exact eps of Gaussian data, with stored noise. See tests/data/refs/README.md section 10.",
        "shapes": {},
        "cases": out_cases,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    for line in crosschecks():
        print(line)
    if args.check_only:
        return
    doc = build()
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.normpath(args.out)} ({os.path.getsize(args.out)} bytes, {len(doc['cases'])} cases)")


if __name__ == "__main__":
    main()
