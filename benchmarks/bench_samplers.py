"""Benchmark: sample quality per NFE on exact Gaussian mixtures, torchdiffusion next to k-diffusion and diffusers.

Every sampler gets the exact denoiser E[x0 | x_t], so the error is the solver's alone. Mixtures: "ring8" (8 equal
sharp modes, radius 2, std 0.05), "unequal2d" (4 modes, weights 0.5/0.25/0.15/0.1, unequal diagonal variances),
"mix16d" (16-D, 5 seeded random modes). Per NFE budget (all calls, final denoise included; fewer if a sampler's
steps do not fit): every available torchdiffusion sampler on VP/grid_lam and EDM/grid_karras (DDPM also VP/grid_t),
and k-diffusion and diffusers as their users run them (``anchors.py``); all start from the same normal draw.
Metrics against n exact samples: sliced W2, mixture-weight error (TV of mode frequencies), log-density gap = mean
log p(generated) - E log p(exact) (> 0: too concentrated, < 0: too spread; E from 200k samples). Noise floor: the
metrics of independent exact sets of size n (mean, 2-sd band). Also the per-step overhead with a trivial denoiser.

One thread by default: the tensors (4000 x K x D) are too small for intra-op parallelism, and on a shared 2-core
machine two threads made every run 5-10x slower (spinning workers); --threads 2 is there.

Run: ``make bench-samplers`` (or ``python benchmarks/bench_samplers.py --quick --out bench-output``).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import time
import warnings
from functools import partial
from pathlib import Path

import anchors as A
import numpy as np
import torch
from tqdm.auto import tqdm

import torchdiffusion.samplers as S
from torchdiffusion import EDM, VP, GaussianMixture, grid_karras, grid_lam, grid_optimized, grid_t
from torchdiffusion.core.optimized_grid import FINAL_DENOISE
from torchdiffusion.evaluation.metrics import mixture_weight_error
from torchdiffusion.samplers.grid_fit import SPREAD, fit_grid

F64, DTYPE = torch.float64, torch.float32  # samplers run in float32, as users run them
LIBS = ("torchdiffusion", "k-diffusion", "diffusers")
OURS = [  # label, function in torchdiffusion.samplers, knobs, in --quick
    ("ddpm", "sample_ddpm", {}, True),
    ("ddim", "sample_ddim", {"eta": 0.0}, True),
    ("euler", "sample_euler", {}, True),
    ("heun", "sample_heun", {}, True),
    ("rk4", "sample_rk4", {}, False),
    ("dpm_solver-1", "sample_dpm_solver", {"order": 1}, False),
    ("dpm_solver-2", "sample_dpm_solver", {"order": 2}, True),
    ("dpm_solver-3", "sample_dpm_solver", {"order": 3}, False),
    ("dpm_solver_pp-2", "sample_dpm_solver_pp", {"order": 2}, True),
    ("dpm_solver_pp-3", "sample_dpm_solver_pp", {"order": 3}, True),
    ("dpm_solver_pp_sde", "sample_dpm_solver_pp_sde", {}, False),
    ("dpm_solver_pp_2s_a", "sample_dpm_solver_pp_2s_ancestral", {}, False),
    ("unipc-2", "sample_unipc", {"order": 2}, True),
    ("unipc-3", "sample_unipc", {"order": 3}, False),
    ("optimized", "sample_optimized", {}, True),  # the few-step default: only on VP/optimized (elsewhere UniPC-3)
    ("reverse_sde", "sample_reverse_sde", {}, False),
    ("pc", "sample_pc", {}, False),
    ("ald", "sample_annealed_langevin", {"n_steps_each": 1}, False),
    ("ode_adaptive", "sample_ode_adaptive", {}, False),
]
SETUPS = {
    "VP/lam": (VP(), grid_lam),
    "EDM/karras": (EDM(), grid_karras),
    "VP/t": (VP(), grid_t),
    "EDM/fit": (EDM(), None),  # fitted per mixture, sampler and n (OursRunner._grid)
    "VP/optimized": (VP(), grid_optimized),  # stored, optimized offline on other mixtures (core.optimized_grid)
}
# Deterministic samplers also run on a grid fitted to each mixture's exact denoiser (``grid_fit.fit_grid`` with
# its SPREAD recipe: free end, no final denoise, log-density term; on FIT_PILOT starts of another seed than the
# samples): the cost of the fit is reported, not in the NFE.
FIT_LABELS, FIT_PILOT = ("dpm_solver_pp-2", "unipc-2", "unipc-3"), 1024
FIXED = "VP/optimized"  # the default's grid without a fit (Pipeline.sample's default): target i-fixed
FEW_STEP = "optimized"  # Pipeline.sample's default sampler (sample_optimized), judged on FIXED by target i-fixed
KD_QUICK = ("sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde")
DF_QUICK = ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler")
ADAPTIVE_TOLS = (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)


def make_mixtures() -> dict[str, GaussianMixture]:
    ang = torch.arange(8, dtype=F64) * (2 * math.pi / 8)
    ring8 = GaussianMixture(torch.ones(8), 2.0 * torch.stack([ang.cos(), ang.sin()], 1), 0.05**2)
    means = [[-1.0, -0.5], [1.2, 0.8], [0.8, -1.5], [-1.2, 1.5]]
    stds = torch.tensor([[0.3, 0.1], [0.05, 0.2], [0.15, 0.15], [0.02, 0.08]], dtype=F64)
    g = torch.Generator().manual_seed(1234)
    w, m = torch.rand(5, generator=g, dtype=F64) + 0.3, 1.5 * torch.randn(5, 16, generator=g, dtype=F64)
    s = 0.1 + 0.5 * torch.rand(5, 16, generator=g, dtype=F64)
    unequal = GaussianMixture([0.5, 0.25, 0.15, 0.1], means, stds**2)
    return {"ring8": ring8, "unequal2d": unequal, "mix16d": GaussianMixture(w, m, s**2)}


# -- running the samplers -----------------------------------------------------------------------------


def _ours_specs(quick: bool, notes: list[str]):
    """(label, fn, knobs) for every torchdiffusion sampler that exists and takes the knobs."""
    specs = []
    for label, name, knobs, in_quick in OURS:
        fn = getattr(S, name, None)
        if fn is None:
            notes.append(f"torchdiffusion.samplers.{name} not available: {label} skipped")
        elif not set(knobs) <= set(inspect.signature(fn).parameters):
            notes.append(f"{name} does not take {sorted(knobs)}: {label} skipped")
        elif in_quick or not quick:
            specs.append((label, fn, knobs))
    return specs


class OursRunner:
    """One torchdiffusion sampler on one (process, grid): runs it within NFE budgets."""

    def __init__(self, fn, knobs, process, grid, gm, n, seed, fits=None):
        if fn is getattr(S, "sample_annealed_langevin", None):  # its step_eps is tuned for sigma_L = 0.01
            knobs = {**knobs, "step_eps": 0.2 * float(process.sigma(torch.tensor(process.t_min, dtype=F64))) ** 2}
        self.fn, self.knobs, self.process, self.grid = fn, knobs, process, grid
        self.gm, self.n, self.seed, self.nfe_of_steps = gm, n, seed, {}
        self.adaptive, self.ladder = fn is getattr(S, "sample_ode_adaptive", None), None
        self.fits = fits  # a list that collects the fitted grids (for EDM/fit); None for the fixed grids
        self.run_kw = {} if grid is not None else {"final_denoise": SPREAD["final_denoise"]}
        if grid is grid_optimized:  # fitted without the final x0_hat
            self.run_kw = {"final_denoise": FINAL_DENOISE}

    def _grid(self, n_steps: int):
        """The fixed grid, or one fitted to this mixture for this sampler and n_steps (on the pilot starts)."""
        if self.grid is not None:
            return self.grid(self.process, n_steps)
        pilot = self.process.prior_sample(
            (FIT_PILOT, *self.gm.shape), generator=torch.Generator().manual_seed(self.seed + 1000), dtype=DTYPE
        )
        sampler = partial(self.fn, **self.knobs)
        fit = fit_grid(sampler, self.gm.denoiser(self.process), self.process, n_steps, pilot, **SPREAD)
        self.fits.append(
            {
                "n_steps": n_steps,
                "error": fit.error,
                "error_uniform_lam": fit.error_uniform_lam,
                "logp_gap": fit.logp_gap,
                "logp_gap_uniform_lam": fit.logp_gap_uniform_lam,
                "fit_nfe": fit.nfe,
                "lam": self.process.lam(fit.ts).tolist(),
            }
        )
        return fit.ts

    def _run(self, n_steps, n, probe=False, **extra):
        g = torch.Generator().manual_seed(self.seed)
        x = self.process.prior_sample((n, *self.gm.shape), generator=g, dtype=DTYPE)
        d = S.count_nfe(self.gm.denoiser(self.process))
        ts = grid_lam(self.process, n_steps) if probe else self._grid(n_steps)  # the NFE does not depend on the times
        out = self.fn(d, self.process, x, ts, generator=g, **self.knobs, **self.run_kw, **extra)
        return (out[0] if isinstance(out, tuple) else out), d.nfe

    def _nfe(self, n_steps: int) -> float:
        if n_steps not in self.nfe_of_steps:  # probe on 2 samples: the NFE does not depend on the batch
            try:
                self.nfe_of_steps[n_steps] = self._run(n_steps, 2, probe=True)[1]
            except (ValueError, RuntimeError):
                self.nfe_of_steps[n_steps] = math.inf
        return self.nfe_of_steps[n_steps]

    def steps_for(self, budget: int) -> int | None:
        """The most steps whose total NFE is <= budget (the NFE is affine in the steps, a + b n)."""
        b = self._nfe(3) - self._nfe(2)
        b = max(int(b), 1) if math.isfinite(b) else 1
        n = max(1, int((budget - self._nfe(2) + 2 * b) // b)) if math.isfinite(self._nfe(2)) else 1
        while n > 1 and self._nfe(n) > budget:
            n -= 1
        while self._nfe(n + 1) <= budget:
            n += 1
        return n if self._nfe(n) <= budget else None

    def __call__(self, budget: int, max_budget: int):
        if self.adaptive:  # a ladder of tolerances; each budget takes the tightest that fits
            if self.ladder is None:
                self.ladder = []
                for tol in ADAPTIVE_TOLS:
                    self.ladder.append(self._run(1, self.n, rtol=tol, atol=tol))
                    if self.ladder[-1][1] > max_budget:
                        break
            fits = [r for r in self.ladder if r[1] <= budget]
            return max(fits, key=lambda r: r[1]) if fits else None
        steps = self.steps_for(budget)
        return None if steps is None else self._run(steps, self.n)


def jobs(gm, args, notes, fits):
    """(library, label, setup, run(budget, max_budget) -> (x, nfe) | None) for every sampler to run.
    Fitted grids are appended to ``fits[label]``."""
    out = []
    for label, fn, knobs in _ours_specs(args.quick, notes):
        extra = ("VP/t",) if label == "ddpm" else ("EDM/fit", "VP/optimized") if label in FIT_LABELS else ()
        setups = (FIXED,) if label == FEW_STEP else ("VP/lam", "EDM/karras") + extra
        for setup in setups:
            process, grid = SETUPS[setup]
            log = fits.setdefault(label, []) if grid is None else None
            run = OursRunner(fn, knobs, process, grid, gm, args.n, args.seed, log)
            out.append(("torchdiffusion", label, setup, run))
    if A.load_k_diffusion_sampling() is None:
        notes.append("k-diffusion not installed: its samplers skipped")
    else:
        for name in KD_QUICK if args.quick else A.KDIFF_SAMPLERS:
            out.append(("k-diffusion", name, "EDM/karras", _kdiff_run(name, gm, args)))
    if importlib.util.find_spec("diffusers") is None:
        notes.append("diffusers not installed: its schedulers skipped")
        return out
    for name in DF_QUICK if args.quick else A.DIFFUSERS_SCHEDULERS:
        out.append(("diffusers", name, "DDPM/default", _diffusers_run(name, gm, args)))
    return out


def _kdiff_run(name, gm, args):
    return lambda b, _: A.run_k_diffusion(name, gm, args.n, b, seed=args.seed, dtype=DTYPE)


def _diffusers_run(name, gm, args):
    """A scheduler within a budget, or None where none of its step counts fits (PNDM's warm-up takes 12 calls)."""

    def run(b, _):
        if A.diffusers_steps_for_budget(name, b) is not None:
            return A.run_diffusers(name, gm, args.n, b, seed=args.seed, dtype=DTYPE)

    return run


# -- metrics ------------------------------------------------------------------------------------------


class Reference:
    """n exact samples, and E log p from 200k: what every sample set is measured against.

    SW2 is ``metrics.sliced_wasserstein``'s definition (512 directions from seed 0, sorted projections of
    equal-size sets), computed with numpy's sort, which is ~15x faster than torch's on CPU here.
    """

    def __init__(self, gm, n, seed):
        self.gm, self.n = gm, n
        theta = torch.randn(gm.dim, 512, generator=torch.Generator().manual_seed(0), dtype=F64)
        self.theta = (theta / theta.norm(dim=0, keepdim=True)).numpy()
        self.ref = self._sorted(gm.sample(n, generator=torch.Generator().manual_seed(seed + 1)))
        self.lp = float(gm.log_prob(gm.sample(200_000, generator=torch.Generator().manual_seed(seed + 2))).mean())

    def _sorted(self, x):
        return np.sort((x.reshape(x.shape[0], -1).to(F64).numpy() @ self.theta).T, axis=1)

    def __call__(self, x) -> dict:
        x = x.to(F64)
        if not bool(torch.isfinite(x).all()):
            return {"sw2": math.nan, "weight_err": math.nan, "logp_gap": math.nan}
        return {
            "sw2": float(np.sqrt(np.mean((self._sorted(x) - self.ref) ** 2))),
            "weight_err": mixture_weight_error(x, self.gm),
            "logp_gap": float(self.gm.log_prob(x).mean()) - self.lp,
        }

    def floor(self, reps, seed) -> dict:
        """Mean and sd of the metrics of independent exact sets of size n: what a perfect sampler scores."""
        runs = [
            self(self.gm.sample(self.n, generator=torch.Generator().manual_seed(seed + 100 + r))) for r in range(reps)
        ]
        return {
            k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))}
            for k in runs[0]
            for v in [[r[k] for r in runs]]
        }


def best_rows(rows, floor=None):
    """Per (library, budget) the row with the lowest SW2. With a ``floor``, among the rows whose SW2 is within
    one noise-floor sd of that lowest (statistically tied), the one with the smallest |logp gap|."""
    tol, groups, best = floor["sw2"]["sd"] if floor else 0.0, {}, {}
    for r in rows:
        if math.isfinite(r["sw2"]):
            groups.setdefault((r["library"], r["budget"]), []).append(r)
    for key, rs in groups.items():
        lo = min(r["sw2"] for r in rs)
        best[key] = min((r for r in rs if r["sw2"] <= lo + tol), key=lambda r: (abs(r["logp_gap"]), r["sw2"]))
    return best


def default_label() -> tuple[str, str]:
    """Our default sampler's (label, setup): ``samplers.DEFAULT_SAMPLER`` (a name in ``SAMPLERS``, a function or a
    partial of one) matched to a row of OURS by function and knobs; else DPM-Solver++(2M). Its setup is the fitted
    grid where it runs on one (FIT_LABELS), else VP/lam."""
    label, d = "dpm_solver_pp-2", getattr(S, "DEFAULT_SAMPLER", None)
    if isinstance(d, str):
        d = getattr(S, "SAMPLERS", {}).get(d) or getattr(S, d, None) or getattr(S, f"sample_{d}", None)
    if callable(d):
        fn = getattr(d, "func", d)
        params = {k: p.default for k, p in inspect.signature(fn).parameters.items()} | getattr(d, "keywords", {})
        for row, name, knobs, _ in OURS:
            if name == fn.__name__ and all(params.get(k) == v for k, v in knobs.items()):
                label = row
                break
    return label, ("EDM/fit" if label in FIT_LABELS else "VP/lam")


def overhead(steps=100, reps=20, shape=(4000, 2)) -> dict[str, float]:
    """Microseconds per step with a trivial denoiser (zeros), float32 (4000, 2): the samplers' own cost.
    Best of ``reps`` runs, taken round-robin so that every sampler sees the same background load."""
    zero, x = (lambda x, *a, **k: torch.zeros_like(x)), torch.randn(shape)
    cases = A.overhead_cases(zero, x, steps)
    for name in ("sample_euler", "sample_dpm_solver_pp", "sample_ddim"):
        if (fn := getattr(S, name, None)) is not None:
            ts = grid_lam(VP(), steps)
            cases[f"torchdiffusion/{name}"] = lambda fn=fn, ts=ts: fn(zero, VP(), x, ts, final_denoise=False)
    cases = dict(sorted(cases.items(), key=lambda kv: LIBS.index(kv[0].split("/")[0])))
    best = dict.fromkeys(cases, math.inf)
    for _ in range(reps + 1):  # the first round warms up
        for key, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0) if _ else math.inf
    return {key: 1e6 * t / steps for key, t in best.items()}


# -- reporting ----------------------------------------------------------------------------------------


def _cell(r, bold=False) -> str:
    if r is None:
        return "—"
    if not math.isfinite(r["sw2"]):
        return "diverged"
    nfe = "" if r["nfe"] == r["budget"] else f" ({r['nfe']})"
    cell = f"{r['sw2']:.3f} / {r['weight_err']:.3f} / {r['logp_gap']:+.2f}"
    return (f"**{cell}**" if bold else cell) + nfe


def _band(f) -> str:
    return f"{f['mean']:.3f} ± {2 * f['sd']:.3f}"


def _best_text(r) -> str:
    return "—" if r is None else f"{r['sampler']} [{r['setup']}] {_cell(r)}"


TARGET_TEXT = {
    "i": "best torchdiffusion error <= 0.7 x best anchor's, or inside the noise band (value: ours / anchor's)",
    "ii": "default sampler's logp gap inside the noise band (value: gap)",
    "ii*": "the same on VP/lam, a fixed grid without a fit, for information (value: gap)",
    "iii": "our per-step overhead <= anchors' (value: ratio to the fastest anchor)",
    "i-fixed": "our default on its stored grid (no fit), SW2 <= 0.7 x the best anchor's, or inside the noise band "
    "(value: ours / anchor's)",
}
OVERHEAD_PAIRS = {
    "torchdiffusion/sample_euler": ("k-diffusion/sample_euler", "diffusers/EulerDiscreteScheduler"),
    "torchdiffusion/sample_dpm_solver_pp": ("k-diffusion/sample_dpmpp_2m", "diffusers/DPMSolverMultistepScheduler"),
    "torchdiffusion/sample_ddim": ("diffusers/DDIMScheduler",),
}
# Target (i) per metric: the error of a run, and where exact samples put it (mean + 2 sd of the floor).
ERRORS = {
    "SW2": (lambda r, f: r["sw2"], lambda f: f["sw2"]["mean"] + 2 * f["sw2"]["sd"]),
    "weight err": (lambda r, f: r["weight_err"], lambda f: f["weight_err"]["mean"] + 2 * f["weight_err"]["sd"]),
    "|logp gap|": (lambda r, f: abs(r["logp_gap"] - f["logp_gap"]["mean"]), lambda f: 2 * f["logp_gap"]["sd"]),
}


def _target(target, where, nfe, value, ok) -> dict:
    return {"target": target, "where": where, "nfe": nfe, "value": value, "ok": bool(ok)}


def best_errors(rows, floor, budget) -> dict:
    """Per metric of ERRORS and library group ("ours", "anchors"): the lowest error at this budget, and the run."""
    out = {}
    for metric, (err, _) in ERRORS.items():
        for r in (r for r in rows if r["budget"] == budget and math.isfinite(r["sw2"])):
            side = "ours" if r["library"] == "torchdiffusion" else "anchors"
            if (metric, side) not in out or err(r, floor) < out[(metric, side)][0]:
                out[(metric, side)] = (err(r, floor), r)
    return out


def targets(results, floors, over, budgets) -> list[dict]:
    out, (label, setup) = [], default_label()
    for mix, rows in results.items():
        f = floors[mix]
        for b in (b for b in budgets if b in (5, 10)):
            best = best_errors(rows, f, b)
            for metric, (_, band) in ERRORS.items():
                if (metric, "ours") in best and (metric, "anchors") in best:
                    (e_o, r_o), (e_a, r_a) = best[(metric, "ours")], best[(metric, "anchors")]
                    where = f"{mix} {metric}: {r_o['sampler']} [{r_o['setup']}] vs {r_a['sampler']}"
                    at_floor = e_o <= band(f)
                    where += " (ours inside the noise band)" if at_floor else ""
                    out.append(_target("i", where, b, e_o / max(e_a, 1e-12), e_o <= 0.7 * e_a or at_floor))
        g = f["logp_gap"]
        for r in rows:
            for tag, s in (("ii", setup), ("ii*", "VP/lam")):
                if (r["library"], r["sampler"], r["setup"]) == ("torchdiffusion", label, s) and r["budget"] >= 20:
                    ok = abs(r["logp_gap"] - g["mean"]) <= 2 * g["sd"]
                    out.append(_target(tag, f"{mix} {label} [{s}]", r["budget"], r["logp_gap"], ok))
            if setup == "VP/lam":
                break
        for b in (b for b in budgets if b in (5, 10)):  # issue #15 item 2: the default as users run it, no fit
            mine = [r for r in rows if (r["library"], r["sampler"], r["setup"]) == ("torchdiffusion", FEW_STEP, FIXED)]
            mine = [r for r in mine if r["budget"] == b and math.isfinite(r["sw2"])]
            theirs = [r for r in rows if r["library"] != "torchdiffusion" and r["budget"] == b]
            theirs = [r for r in theirs if math.isfinite(r["sw2"])]
            if mine and theirs:
                e_o, r_a = mine[0]["sw2"], min(theirs, key=lambda r: r["sw2"])
                at_floor = e_o <= f["sw2"]["mean"] + 2 * f["sw2"]["sd"]
                where = f"{mix} SW2: {FEW_STEP} [{FIXED}] vs {r_a['sampler']}" + (" (inside the noise band)" * at_floor)
                out.append(
                    _target("i-fixed", where, b, e_o / max(r_a["sw2"], 1e-12), e_o <= 0.7 * r_a["sw2"] or at_floor)
                )
    for ours, theirs in OVERHEAD_PAIRS.items():
        theirs = [over[k] for k in theirs if k in over]
        if ours in over and theirs:
            out.append(_target("iii", ours, "", over[ours] / min(theirs), over[ours] <= min(theirs)))
    return out


def write_markdown(path, results, floors, over, tgt, budgets, meta):
    lines = [
        f"# Sampler quality per NFE (exact denoiser)\n\n{meta}\n",
        "Cell: SW2 / mixture-weight error / log-density gap (actual NFE if below the budget). Gap > 0: too "
        "concentrated; < 0: too spread. Bold: the best (lowest SW2) of a torchdiffusion sampler's setups. "
        "Best of a library: lowest SW2, or among those within one floor sd of it, the smallest |gap|.\n",
    ]
    for mix, rows in results.items():
        f, by = floors[mix], {}
        for r in rows:
            by.setdefault((r["library"], r["sampler"], r["setup"]), {})[r["budget"]] = r
        ours = {}  # (sampler, budget) -> lowest SW2 over our setups
        for r in (r for r in rows if r["library"] == "torchdiffusion" and r["setup"] != "VP/t"):
            ours[(r["sampler"], r["budget"])] = min(ours.get((r["sampler"], r["budget"]), math.inf), r["sw2"])
        lines += [
            f"## {mix}\n",
            f"Noise floor (mean ± 2 sd): SW2 {_band(f['sw2'])}, weight err "
            f"{_band(f['weight_err'])}, logp gap {_band(f['logp_gap'])}\n",
            "| library | sampler | setup | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
            "|" + "---|" * (3 + len(budgets)),
        ]
        for (lib, name, setup), cells in by.items():
            bold = [lib == "torchdiffusion" and b in cells and ours.get((name, b)) == cells[b]["sw2"] for b in budgets]
            lines.append(
                f"| {lib} | {name} | {setup} | " + " | ".join(map(_cell, map(cells.get, budgets), bold)) + " |"
            )
        best = best_rows(rows, f)
        lines += ["", f"Best of each library ({mix}):\n", "| NFE | " + " | ".join(LIBS) + " |", "|---|---|---|---|"]
        lines += [f"| {b} | " + " | ".join(_best_text(best.get((lib, b))) for lib in LIBS) + " |" for b in budgets]
        lines.append("")
    lines += ["## Per-step overhead (trivial denoiser, float32 (4000, 2), 100 steps)\n", "| sampler | µs / step |"]
    lines += ["|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in over.items()]
    lines += ["", "## Targets\n", "| target | where | NFE | value | holds |", "|---|---|---|---|---|"]
    lines += [
        f"| {t['target']}: {TARGET_TEXT[t['target']]} | {t['where']} | {t['nfe']} | {t['value']:.3g} | "
        f"{'yes' if t['ok'] else 'NO'} |"
        for t in tgt
    ]
    Path(path).write_text("\n".join(lines) + "\n")


def plot(path, results, floors, budgets):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(LIBS, ("tab:blue", "tab:orange", "tab:green")))
    metrics = (("sw2", "sliced W2", lambda v: v), ("logp_gap", "|log-density gap|", lambda v: max(abs(v), 1e-3)))
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    for (mix, rows), ax_row in zip(results.items(), axes):
        curves, best, f = {}, best_rows(rows, floors[mix]), floors[mix]
        for r in (r for r in rows if math.isfinite(r["sw2"])):
            curves.setdefault((r["library"], r["sampler"], r["setup"]), []).append(r)
        for ax, (key, name, fn) in zip(ax_row, metrics):
            for (lib, _, _), rs in curves.items():
                ax.plot([r["nfe"] for r in rs], [fn(r[key]) for r in rs], color=colors[lib], alpha=0.2, lw=0.8)
            lo, hi = f[key]["mean"] - 2 * f[key]["sd"], f[key]["mean"] + 2 * f[key]["sd"]
            lo, hi = (max(lo, 1e-3), hi) if key == "sw2" else (1e-3, max(abs(lo), abs(hi)))
            ax.axhspan(lo, hi, color="gray", alpha=0.3, label="exact samples (2 sd)")
            shown = [lo, hi]  # the y range: the band and the best curves; worse rows run off the top
            for lib in LIBS:
                if rs := [best[(lib, b)] for b in budgets if (lib, b) in best]:
                    xs, ys = [r["nfe"] for r in rs], [fn(r[key]) for r in rs]
                    ax.plot(xs, ys, "o-", color=colors[lib], lw=2.2, label=f"{lib} (best)")
                    shown += ys
            ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=name, title=f"{mix}: {name}")
            ax.set_ylim(min(shown) / 2, max(shown) * 5)
            ax.grid(alpha=0.3)
        ax_row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(results, floors, over, tgt, budgets, notes, wall):
    for mix, rows in results.items():
        best, f = best_rows(rows, floors[mix]), floors[mix]
        print(f"\n{mix}: noise floor SW2 {_band(f['sw2'])}, logp gap {_band(f['logp_gap'])}  (SW2 / weight err / gap)")
        for b in budgets:
            print(f"  NFE {b:>3}  " + "  |  ".join(f"{lib}: {_best_text(best.get((lib, b)))}" for lib in LIBS))
    print("\nper-step overhead (µs): " + ", ".join(f"{k} {v:.0f}" for k, v in over.items()))
    for t in tgt:
        print(f"target {t['target']:>3} {'holds' if t['ok'] else 'FAILS'}: {t['where']} {t['nfe']}: {t['value']:.3g}")
    print("\n".join(f"note: {n}" for n in notes) + f"\nwall time {wall:.0f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-output")
    p.add_argument("--quick", action="store_true", help="n = 1000, NFE 5 10 20, fewer samplers (< 2 minutes)")
    p.add_argument("--n", type=int, default=None, help="samples per run (default 4000; 1000 with --quick)")
    p.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE budgets (default 5 10 20 50 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the module docstring)")
    p.add_argument("--floor-reps", type=int, default=10, help="independent exact sets for the noise floor")
    args = p.parse_args(argv)
    args.n = args.n or (1000 if args.quick else 4000)
    budgets = sorted(args.nfe or ([5, 10, 20] if args.quick else [5, 10, 20, 50, 100]))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torchsde")  # its Brownian-tree bounds, rounded in float32
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    out, start, notes, results, floors, fits = Path(args.out), time.perf_counter(), [], {}, {}, {}
    out.mkdir(parents=True, exist_ok=True)
    for mix, gm in make_mixtures().items():
        ref, rows = Reference(gm, args.n, args.seed), []
        floors[mix] = ref.floor(args.floor_reps, args.seed)
        todo = jobs(gm, args, notes, fits.setdefault(mix, {}))
        for lib, label, setup, run in tqdm(todo, desc=mix, unit="sampler", dynamic_ncols=True):
            for b in budgets:
                t0 = time.perf_counter()
                if (res := run(b, max(budgets))) is not None:
                    row = {"library": lib, "sampler": label, "setup": setup, "budget": b, "nfe": res[1]}
                    rows.append(row | ref(res[0]) | {"seconds": time.perf_counter() - t0})
        results[mix] = rows
    costs = [f["fit_nfe"] for by_label in fits.values() for log in by_label.values() for f in log]
    if costs:
        notes.append(
            f"EDM/fit: a grid fitted (grid_fit.fit_grid, recipe grid_fit.SPREAD = {SPREAD}) per mixture, sampler "
            f"and step count on {FIT_PILOT} pilot starts of seed {args.seed + 1000}; one fit cost "
            f"{min(costs)}-{max(costs)} evaluations on the pilot batch (teacher, search and log-density line "
            "integrals), once per model, not counted in the NFE"
        )
    notes.append(
        "VP/optimized: the stored grids of core.optimized_grid (optimized once, offline, on random mixtures other than "
        "these; no fit here), run without the final denoise; `optimized` on it (sample_optimized: UniPC-3 with weights "
        "optimized offline with the 5-step grid, UniPC-3 itself at other step counts) is the default of "
        "Pipeline.sample and of `sample --steps N`"
    )
    over = overhead()
    tgt, wall, notes = targets(results, floors, over, budgets), time.perf_counter() - start, sorted(set(notes))
    meta = (
        f"n = {args.n} samples per run, seed {args.seed}, {args.threads} thread(s), float32 samplers, wall time "
        f"{wall:.0f} s (torch {torch.__version__}). Default sampler: {' '.join(default_label())}."
    )
    config = {"n": args.n, "budgets": budgets, "seed": args.seed, "quick": args.quick, "threads": args.threads}
    summary = dict(config=config, wall_time_s=wall, noise_floor=floors, results=results, overhead_us_per_step=over)
    summary |= dict(targets=tgt, default_sampler=default_label(), notes=notes, fitted_grids=fits)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    write_markdown(out / "results.md", results, floors, over, tgt, budgets, meta + "".join(f"\n- {n}" for n in notes))
    plot(out / "quality_vs_nfe.png", results, floors, budgets)
    print_summary(results, floors, over, tgt, budgets, notes, wall)


if __name__ == "__main__":
    main()
