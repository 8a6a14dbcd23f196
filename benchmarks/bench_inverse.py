"""Benchmark: posterior samplers for linear inverse problems, measured against the exact posterior, side by side.

Every sampler gets the exact denoiser E[x0 | x_t] of a Gaussian-mixture prior, whose posterior p(x0 | y) is again a
mixture known in closed form (``GaussianMixture.posterior``), so what is measured is the method's own error: its
approximation of p_t(y | x_t) and its time discretization. The problems are in ``inverse_problems.py`` (2-D ring
inpainting at sigma_y 0 and 0.05; an 8-D mixture under 1, 2 and 4 random rows; a 64-D 8x8 image-like mixture with
random-pixel inpainting, box inpainting, outpainting and 2x super-resolution).

Libraries, each with its own defaults and only the step count fitted to the NFE budget:
    torchdiffusion   inverse/: projection, DDNM, DPS, PiGDM, MMPS, DDRM, RePaint and the twisted diffusion sampler (SMC:
                     P particles x s steps per sample within the budget, ``smc_budget``), on VP with grid_lam in
                     float32; SMC with sigma_data = the prior's standard deviation (as a trained model records it) as
                     independent runs (smc, smc-mmps: P particles per sample, NFE = P (s + 1) calls per sample) and
                     as one cloud (smc-cloud: the batch is the particle set, NFE = batch calls, as azula's TDS); and
                     SMC in a table of its own: cost (P, s) against the distance to the floor
    azula            its guidance samplers (``inverse_azula.py``)
    deepinv          its DPS, DiffPIR, DDRM (``inverse_deepinv.py``; imported with a stub torchvision)
    diffusers        RePaintScheduler (``inverse_diffusers.py``, masks only)
NFE counts denoiser calls per sample (a batch call counts once; DPS, PiGDM, SMC and some anchors also backpropagate
through each call). Metrics, each next to the exact-vs-exact floor (independent exact posterior sets of the same n):
    SW2        sliced Wasserstein-2 to exact posterior samples (mean over ``--refs`` reference sets)
    weights    total variation between the posterior component weights and the frequencies of the samples' most
               probable posterior component
    residual   the RMS of y - A x per measured number (exact samples have the noise's own, sigma_y-sized one)

Run: ``make bench-inverse`` (or ``python benchmarks/bench_inverse.py --quick --out bench-output``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_name
from inverse_problems import CASES, Problem, make_problems
from tqdm.auto import tqdm

from torchdiffusion import VP, grid_lam
from torchdiffusion.core.denoiser import count_nfe
from torchdiffusion.evaluation.metrics import noise_floor, sliced_wasserstein
from torchdiffusion.inverse import (
    sample_ddnm,
    sample_ddrm,
    sample_dps,
    sample_mmps,
    sample_pigdm,
    sample_projection,
    sample_repaint,
    sample_smc,
)
from torchdiffusion.inverse.repaint import repaint_budget
from torchdiffusion.inverse.smc import smc_budget

F64, DTYPE = torch.float64, torch.float32
PROCESS = VP()
ANCHORS = {"azula": "inverse_azula", "deepinv": "inverse_deepinv", "diffusers": "inverse_diffusers"}
LIBS = ("torchdiffusion", *ANCHORS)
NFES = (20, 50, 100, 250)
SMC_PARTICLES, SMC_STEPS = (4, 16, 64), (25, 50, 100, 200)


# -- torchdiffusion ---------------------------------------------------------------------------------------------


def _dps_zeta(problem: Problem) -> float:
    """Chung et al.'s zeta = 1 is tuned for images with thousands of measured numbers; the normalized step moves x_t
    by about 2 zeta whatever the residual, so with M measured numbers the step is scaled by sqrt(M / 1024) (the
    sampler's docstring: zeta = 1 overshoots a 2-D mask by 14x)."""
    return min(1.0, math.sqrt(problem.operator.out_dim / 1024))


# label -> (function, fixed knobs, applies(problem)); every one runs on VP with grid_lam in float32
OURS = {
    "projection": (sample_projection, {}, lambda p: p.sigma_y == 0),
    "ddnm": (sample_ddnm, {}, lambda p: p.sigma_y == 0),
    "dps": (sample_dps, {}, lambda p: True),
    "dps-scaled": (sample_dps, {"zeta": _dps_zeta}, lambda p: True),
    "pigdm": (sample_pigdm, {}, lambda p: True),
    "ddrm": (sample_ddrm, {}, lambda p: True),
    "ddrm-eta1": (sample_ddrm, {"eta": 1.0}, lambda p: True),
    "repaint": (sample_repaint, {}, lambda p: p.is_mask and p.sigma_y == 0),
    "mmps": (sample_mmps, {}, lambda p: True),
    "mmps-cg3": (sample_mmps, {"cg_iterations": 3}, lambda p: True),
    "mmps-cg10": (sample_mmps, {"cg_iterations": 10}, lambda p: True),
    "smc": (sample_smc, {}, lambda p: True),
    "smc-mmps": (sample_smc, {"proposal": "mmps"}, lambda p: True),
    "smc-cloud": (sample_smc, {}, lambda p: True),
}


def run_ours(label: str, problem: Problem, nfe: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
    if label in ("smc", "smc-mmps"):
        return run_smc(problem, **smc_budget(nfe), n=n, seed=seed, **OURS[label][1])
    if label == "smc-cloud":
        return run_smc_cloud(problem, nfe, n, seed)
    fn, knobs, _ = OURS[label]
    knobs = {k: (v(problem) if callable(v) else v) for k, v in knobs.items()}
    if label == "repaint":
        knobs.update(repaint_budget(nfe))
        steps = knobs.pop("steps")
    else:
        steps = nfe - 1  # one call per step and the final denoise
    g = torch.Generator().manual_seed(seed)
    den = count_nfe(problem.prior.denoiser(PROCESS))
    x = PROCESS.prior_sample((n, *problem.shape), generator=g, dtype=DTYPE)
    ts = grid_lam(PROCESS, steps)
    out = fn(den, PROCESS, x, ts, problem.measurement, generator=g, **knobs)
    return out, den.nfe


def _sigma_data(problem: Problem) -> float:
    """The prior's standard deviation per coordinate: what a trained model records as its sigma_data, and the
    scale of SMC's twist (``sample_smc``'s sigma_data)."""
    return float(problem.prior.covariance().diagonal().mean().sqrt())


def run_smc(problem: Problem, particles: int, steps: int, n: int, seed: int, **kw) -> tuple[torch.Tensor, int]:
    """n independent SMC runs of P particles (one sample each); cost per sample = P x (steps + 1) calls."""
    g = torch.Generator().manual_seed(seed)
    den = count_nfe(problem.prior.denoiser(PROCESS))
    x = PROCESS.prior_sample((n * particles, *problem.shape), generator=g, dtype=DTYPE)
    out = sample_smc(den, PROCESS, x, grid_lam(PROCESS, steps), problem.measurement, particles=particles,
                     sigma_data=_sigma_data(problem), generator=g, **kw)  # fmt: skip
    return out, den.nfe * particles


def run_smc_cloud(problem: Problem, nfe: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """One SMC run of n particles on nfe - 1 steps, its weighted cloud resampled to n samples: the batch is the
    particle set (as azula's TDS sampler runs), so the NFE counts batch calls as for every other method; the n
    samples are dependent (the duplicates of resampling)."""
    g = torch.Generator().manual_seed(seed)
    den = count_nfe(problem.prior.denoiser(PROCESS))
    x = PROCESS.prior_sample((n, *problem.shape), generator=g, dtype=DTYPE)
    parts, lw = sample_smc(den, PROCESS, x, grid_lam(PROCESS, nfe - 1), problem.measurement, particles=n,
                           sigma_data=_sigma_data(problem), return_particles=True, generator=g)  # fmt: skip
    pick = torch.multinomial(torch.softmax(lw[0], 0), n, replacement=True, generator=g)
    return parts[0, pick], den.nfe


# -- metrics ----------------------------------------------------------------------------------------------------


def weight_error(problem: Problem, x: torch.Tensor) -> float:
    """TV between the posterior weights and the frequencies of each sample's most probable posterior component."""
    post = problem.posterior
    k = post.responsibilities(x.reshape(x.shape[0], -1).to(F64)).argmax(1)
    freq = torch.bincount(k, minlength=len(post.weights)).to(F64) / len(k)
    return float(0.5 * (freq - post.weights).abs().sum())


def residual(problem: Problem, x: torch.Tensor) -> float:
    """RMS of y - A x per measured number."""
    r = problem.y - problem.operator(x.to(F64))
    return float(r.pow(2).mean().sqrt())


class Reference:
    """Independent exact posterior sets of size n, and the floors of every metric (exact against exact)."""

    def __init__(self, problem: Problem, n: int, reps: int, seed: int):
        gens = [torch.Generator().manual_seed(10_000 + seed + r) for r in range(reps + 1)]
        sets = [problem.posterior.sample(n, generator=g) for g in gens]
        self.problem, self.refs, self.held_out = problem, sets[:-1], sets[-1]
        self.floor = {
            "sw2": noise_floor(sets),
            "weights": weight_error(problem, self.held_out),
            "residual": residual(problem, self.held_out),
        }

    def measure(self, x: torch.Tensor) -> dict:
        x = x.to(F64)
        if not bool(torch.isfinite(x).all()):
            return {"sw2": math.inf, "weights": math.inf, "residual": math.inf}
        sw = sum(sliced_wasserstein(x, r) for r in self.refs) / len(self.refs)
        return {"sw2": sw, "weights": weight_error(self.problem, x), "residual": residual(self.problem, x)}


# -- the run ----------------------------------------------------------------------------------------------------


def load_anchors(only=None) -> dict:
    mods = {}
    for lib, mod in ANCHORS.items():
        if only is not None and lib not in only:
            continue
        try:
            m = importlib.import_module(mod)
        except ImportError as e:  # pragma: no cover - the compare extra is missing
            print(f"{lib}: adapter not importable ({e}); skipped")
            continue
        if m.available():
            mods[lib] = m
        else:
            print(f"{lib}: not installed (make bench-inverse installs the compare extra); skipped")
    return mods


def jobs(problem: Problem, anchors: dict, ours=None):
    for label, (_, _, applies) in OURS.items():
        if (ours is None or label in ours) and applies(problem):
            yield "torchdiffusion", label, run_ours
    for lib, mod in anchors.items():
        for label in mod.METHODS:
            if mod.applies(label, problem):
                yield lib, label, (lambda m: lambda lab, p, nfe, n, seed: m.run(lab, p, nfe, n, seed))(mod)


def run_all(problems, nfes, n, reps, seed, anchors, ours=None) -> tuple[list, dict]:
    rows, floors = [], {}
    todo = [
        (p, lib, lab, fn, nfe) for p in problems.values() for lib, lab, fn in jobs(p, anchors, ours) for nfe in nfes
    ]
    refs = {}
    bar = tqdm(todo, desc="bench-inverse", unit="run", dynamic_ncols=True)
    for p, lib, label, fn, nfe in bar:
        if p.name not in refs:
            refs[p.name] = Reference(p, n, reps, seed)
            floors[p.name] = refs[p.name].floor
        bar.set_postfix_str(f"{p.name} {lib}:{label} {nfe}")
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x, used = fn(label, p, nfe, n, seed)
            err = None
        except Exception as e:  # an anchor that fails on a case is reported, not fatal
            x, used, err = None, 0, f"{type(e).__name__}: {e}"[:200]
        sec = time.perf_counter() - t0
        m = refs[p.name].measure(x) if x is not None else {"sw2": math.inf, "weights": math.inf, "residual": math.inf}
        rows.append({"case": p.name, "lib": lib, "method": label, "budget": nfe, "nfe": used, "seconds": sec, **m})
        if err:
            rows[-1]["error"] = err
    return rows, floors


def run_smc_table(problems, n, reps, seed, particles=SMC_PARTICLES, steps=SMC_STEPS) -> list:
    rows, refs = [], {name: Reference(p, n, reps, seed) for name, p in problems.items()}
    todo = [(p, P, s) for p in problems.values() for P in particles for s in steps]
    for p, P, s in tqdm(todo, desc="smc", unit="run", dynamic_ncols=True):
        ref = refs[p.name]
        t0 = time.perf_counter()
        x, cost = run_smc(p, P, s, n, seed)
        sec = time.perf_counter() - t0
        m = ref.measure(x)
        rows.append({"case": p.name, "particles": P, "steps": s, "nfe_per_sample": cost, "seconds": sec, **m})
        rows[-1]["floor_sw2"] = ref.floor["sw2"]
    return rows


# -- report -----------------------------------------------------------------------------------------------------


def best(rows, case, lib, budget, key="sw2"):
    cand = [r for r in rows if r["case"] == case and r["lib"] == lib and r["budget"] == budget and "error" not in r]
    return min(cand, key=lambda r: r[key]) if cand else None


def table(rows, floors, nfes) -> str:
    libs = [lib for lib in LIBS if any(r["lib"] == lib for r in rows)]
    head = "| case | NFE | " + " | ".join(f"{lib}: SW2 / weights / residual (method)" for lib in libs)
    lines = [head + " | floor | ours / best anchor (SW2) |", "|" + "---|" * (len(libs) + 4)]
    for case in floors:
        for nfe in nfes:
            cells, anchor_best, ours = [], math.inf, None
            for lib in libs:
                b = best(rows, case, lib, nfe)
                cells.append(
                    "-" if b is None else f"{b['sw2']:.4f} / {b['weights']:.2f} / {b['residual']:.3f} ({b['method']})"
                )
                if b is not None and lib != "torchdiffusion":
                    anchor_best = min(anchor_best, b["sw2"])
                if b is not None and lib == "torchdiffusion":
                    ours = b["sw2"]
            ratio = "-" if ours is None or not math.isfinite(anchor_best) else f"{ours / anchor_best:.2f}"
            f = floors[case]
            floor = f"{f['sw2']:.4f} / {f['weights']:.2f} / {f['residual']:.3f}"
            lines.append(f"| {case} | {nfe} | " + " | ".join(cells) + f" | {floor} | {ratio} |")
    return "\n".join(lines)


def smc_summary(rows) -> str:
    lines = ["| case | particles | steps | NFE per sample | SW2 | floor | SW2 / floor | weights | seconds |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['particles']} | {r['steps']} | {r['nfe_per_sample']} | {r['sw2']:.4f} | "
            f"{r['floor_sw2']:.4f} | {r['sw2'] / r['floor_sw2']:.2f} | {r['weights']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(path, rows, floors, nfes):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(floors)
    cols = 3
    fig, axes = plt.subplots(
        math.ceil(len(cases) / cols), cols, figsize=(4.2 * cols, 3.3 * math.ceil(len(cases) / cols))
    )
    axes = np.atleast_1d(axes).ravel()
    colors = {"torchdiffusion": "C3", "azula": "C0", "deepinv": "C2", "diffusers": "C1"}
    for ax, case in zip(axes, cases):
        for lib in LIBS:
            pts = [(nfe, best(rows, case, lib, nfe)) for nfe in nfes]
            pts = [(nfe, b["sw2"]) for nfe, b in pts if b is not None and math.isfinite(b["sw2"])]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colors[lib], label=lib)
        ax.axhline(floors[case]["sw2"], color="k", ls="--", lw=1, label="exact vs exact")
        ax.set(xscale="log", yscale="log", title=case, xlabel="NFE")
        ax.set_xticks(list(nfes), [str(v) for v in nfes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for ax in axes[::cols]:
        ax.set_ylabel("SW2 to the exact posterior")
    for ax in axes[len(cases) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.suptitle("Best method of each library per NFE; dashed: two exact sample sets (the floor)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-output")
    ap.add_argument("--quick", action="store_true", help="n = 500, NFE 20 50, three cases, a short SMC table")
    ap.add_argument("--n", type=int, default=None, help="samples per run (default 2000; 500 with --quick)")
    ap.add_argument(
        "--nfe", type=int, nargs="+", default=None, help=f"NFE budgets (default {' '.join(map(str, NFES))})"
    )
    ap.add_argument("--cases", nargs="+", default=None, choices=list(CASES), metavar="CASE", help=f"of {list(CASES)}")
    ap.add_argument(
        "--libs", nargs="*", default=None, choices=list(ANCHORS), help="anchors to run (default all; none: ours only)"
    )
    ap.add_argument("--ours", nargs="+", default=None, choices=list(OURS), help="our methods to run (default all)")
    ap.add_argument("--refs", type=int, default=3, help="independent exact sets (mean SW2 against them, floor)")
    ap.add_argument("--no-smc", action="store_true", help="skip the SMC cost table")
    ap.add_argument("--smc-only", action="store_true", help="only the SMC cost table")
    ap.add_argument(
        "--report", default=None, metavar="RESULTS", help="only rebuild the table and plot of a results.json"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.report:
        d = json.loads(Path(a.report).read_text())
        print(table(d["rows"], d["floors"], d["nfes"]))
        plot(Path(a.report).with_name("sw2_vs_nfe.png"), d["rows"], d["floors"], d["nfes"])
        return
    torch.set_num_threads(a.threads)
    n = a.n or (500 if a.quick else 2000)
    nfes = tuple(a.nfe or ((20, 50) if a.quick else NFES))
    cases = a.cases or (["ring2d-s05", "mix8d-r2", "img8-box"] if a.quick else list(CASES))
    problems = make_problems(cases)
    anchors = load_anchors(a.libs)
    out = Path(a.out) / "inverse"
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    rows, floors = ([], {}) if a.smc_only else run_all(problems, nfes, n, a.refs, a.seed, anchors, a.ours)
    smc_rows = []
    if not a.no_smc:
        smc_cases = {k: v for k, v in problems.items() if k.startswith(("ring2d", "mix8d"))}
        kw = {"particles": (1, 16), "steps": (50,)} if a.quick else {}
        smc_rows = run_smc_table(smc_cases, n, a.refs, a.seed, **kw)
    minutes = (time.perf_counter() - t0) / 60

    summary = {"machine": cpu_name(), "n": n, "nfes": nfes, "floors": floors, "rows": rows, "smc": smc_rows}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    md = [
        f"n = {n} samples per run, {a.refs} exact reference sets; {cpu_name()}; {minutes:.1f} min.",
        "",
        "Per case and NFE, each library's method with the best SW2 (in brackets), with its SW2, posterior-weight",
        "error and residual RMS; the same three between independent exact sets (the floor); our best SW2 over the",
        "best anchor's:",
        "",
        table(rows, floors, nfes) if rows else "(not run: --smc-only)",
    ]
    if smc_rows:
        md += ["", "Twisted diffusion sampler (ours, asymptotically exact): cost against distance to the floor", ""]
        md += [smc_summary(smc_rows)]
    errors = [r for r in rows if "error" in r]
    if errors:
        md += ["", "Runs that failed:"] + [
            f"- {r['case']} {r['lib']}:{r['method']} {r['budget']}: {r['error']}" for r in errors
        ]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    if rows:
        plot(out / "sw2_vs_nfe.png", rows, floors, nfes)
    print("\n".join(md))
    print(f"\nwrote {out}/results.json, summary.md, sw2_vs_nfe.png")


if __name__ == "__main__":
    main()
