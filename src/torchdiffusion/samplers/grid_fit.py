"""A time grid fitted to one model and one sampler: least global error against an accurate teacher.

Sampling trajectories of one model are so alike that a grid chosen on a few of them serves all (Chen et al.
2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML, Sec. 4). Shaul et al. 2024
("Bespoke Solvers for Generative Flow Models", ICLR) fit a solver's time steps to one model by the global
error of its samples against accurately solved trajectories. We fit the grid only, for any deterministic
sampler of ``samplers``, by that global error:

    E(ts) = mean over the pilot starts x_T of || sampler(x_T; ts) - teacher(x_T) ||

where the teacher is DPM-Solver++(3M) with ``teacher_steps`` steps uniform in lam over the same range. With
the exact denoiser of the pilot's model, E -> 0 exactly when the n-step sampler reproduces the ODE's flow
map, so the fitted grid is the n-step grid that best reproduces the model's own samples.

Spread (``logp_weight`` > 0). The distance alone rewards a few-step sampler for pulling its samples toward the
modes (the mean of what it cannot resolve is closer to every possible answer), so its samples come out too
concentrated. The fit can also hold the samples' log-density at the teacher's:

    J(ts) = E(ts) / (s_data sqrt(d)) + logp_weight |G(ts)| / d,
    G(ts) = mean over x_T of log p(sampler(x_T; ts)) - log p(teacher(x_T)),

both per coordinate (s_data: the RMS standard deviation of the teacher's samples, d: numbers per sample).
G needs no density: log p(b) - log p(a) is the line integral of the model's score, int_0^1 score(a + u (b - a))
. (b - a) du, here by Gauss-Legendre with ``logp_nodes`` nodes and the score of the model at t_end, Tweedie's
(alpha x0_hat - x) / sigma^2 (seed 003). ``fit_end`` makes the end an unknown as well: the grid may stop at a
larger sigma than t_end, and without the final denoise the noise left there spreads the samples back out.

Parametrization: the grid keeps its start t_start and has positive steps in lam,
h_i = (lam_end - lam_start) softmax(v)_i, searched from v = 0 (the uniform lam grid, ``grid_lam``) and from the
stored few-step grid of ``core.optimized_grid`` (``init``), whose basins differ from model to model. For
n <= ``free_steps`` every step is free; longer grids warp the uniform grid with v interpolated
linearly between ``knots`` values, so the search has few unknowns at any n. The end is t_end, or with
``fit_end`` lam_end = lam(t_end) - u^2 with one more unknown u (kept in the upper half of the lam range).
Minimized derivative-free with Powell's method (scipy). Cost: about ``max_evals`` runs of the n-step sampler on
the pilot batch (plus ``logp_nodes`` evaluations each with ``logp_weight``) and ``teacher_steps`` + 1
evaluations; once per (model, sampler, n), after which the grid is plain data.

The defaults (a 200-step teacher, 8 nodes, 15 runs per unknown from each of the two starts, the end searched
first) cost about 2,300 evaluations of the pilot batch at n = 5 and 5,500 at n = 10, half the first recipe's (400
steps, 16 nodes, 40 runs per unknown from the uniform lam grid: 4,900-11,000), for the same sliced W2 on the sampler
benchmark's mixtures within the noise floor (``docs/bench/samplers.md``, "Fit cost").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..core.optimized_grid import grid_optimized
from ..core.predictions import tweedie_score
from ..core.process import NoiseProcess, as_time, batch_time
from ..core.timesteps import grid_ends, grid_lam, lam_start
from . import count_nfe, sample_dpm_solver_pp

INITS = ("both", "optimized", "lam")  # where fit_grid's search starts (its docstring)
__all__ = ["SPREAD", "INITS", "GridFit", "fit_grid", "lam_grid_from_params", "logp_difference"]

# The recipe that keeps few-step samples as spread as the teacher's: fit the end too, no final denoise, and hold
# the log-density gap (see the module docstring). ``fit_grid(..., **SPREAD)``, then sample with
# ``final_denoise=fit.final_denoise``.
SPREAD = {"final_denoise": False, "fit_end": True, "logp_weight": 0.5}


@dataclass(frozen=True)
class GridFit:
    """A fitted grid and what it cost: ``ts`` goes to any sampler's ``ts`` argument."""

    ts: Tensor  # float64, n + 1 decreasing times
    error: float  # E(ts): mean distance of the pilot samples to the teacher's
    error_uniform_lam: float  # E of the uniform lam grid with the same ends, where the search started
    evals: int  # runs of the n-step sampler on the pilot batch
    nfe: int  # network evaluations the fit used (teacher and search), each on the whole pilot batch
    logp_gap: float = math.nan  # G(ts), mean log p(samples) - log p(teacher's) in nats (with logp_weight > 0)
    logp_gap_uniform_lam: float = math.nan  # G of the uniform lam grid
    final_denoise: bool = True  # what the grid was fitted with: pass the same to the sampler


def lam_grid_from_params(v: np.ndarray, n: int, lam_start: float, lam_end: float) -> np.ndarray:
    """n + 1 increasing lam values from lam_start to lam_end with steps proportional to softmax(v).

    ``v`` has n entries (one per step) or fewer: then they are values at knots spread evenly over the steps,
    interpolated linearly. A floor of 1e-3 of the mean step keeps every step positive.
    """
    v = np.asarray(v, dtype=np.float64)
    if v.size != n:
        v = np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, v.size), v)
    w = np.exp(v - v.max())
    w = w / w.sum()
    w = (w + 1e-3 / n) / (1.0 + 1e-3)
    return lam_start + (lam_end - lam_start) * np.concatenate([[0.0], np.cumsum(w)])


def _params_of(lams: np.ndarray, lam_a: float, step_unknowns: int, lam_b: float | None) -> np.ndarray:
    """Parameters v whose grid from ``lam_a`` (``lam_grid_from_params``, and with ``lam_b`` the end u) is close to
    ``lams``: the log step sizes, centred (at the knots where there are fewer unknowns than steps), and
    u = sqrt(lam_b - end). Only the start of a search: the 1e-3 floor of the steps makes it approximate."""
    log_h = np.log(np.maximum(np.diff(np.concatenate([[lam_a], lams[1:]])), 1e-12))
    if log_h.size != step_unknowns:
        log_h = np.interp(np.linspace(0, 1, step_unknowns), np.linspace(0, 1, log_h.size), log_h)
    v = log_h - log_h.mean()
    return v if lam_b is None else np.append(v, np.sqrt(max(lam_b - float(lams[-1]), 0.0)))


def _times(process: NoiseProcess, lams: np.ndarray, a: float, b: float | None = None) -> Tensor:
    """Times of the lam values with the exact start a (lam may be -inf there, e.g. Flow at t = 1) and end b
    (None: the end is where lams ends)."""
    ts = process.t_from_lam(torch.from_numpy(lams))
    ts[0] = a
    if b is not None:
        ts[-1] = b
    return ts


def logp_difference(denoiser, process: NoiseProcess, t: float, a: Tensor, b: Tensor, nodes: int = 16, **cond):
    """log p_t(b) - log p_t(a) per example, by the line integral of the model's score from a to b.

    The score is Tweedie's (alpha x0_hat - x) / sigma^2 at time t (seed 003), integrated along the segment
    by ``nodes``-point Gauss-Legendre: ``nodes`` network evaluations on the batch. Exact for any density
    whose log is a polynomial of degree <= 2 nodes along the segment (a Gaussian needs one node); segments
    that cross between modes need more nodes.

    Returns a float64 tensor (B,).
    """
    u, w = np.polynomial.legendre.leggauss(int(nodes))
    t_, d = torch.tensor(float(t), dtype=torch.float64), (b - a).to(torch.float64)
    total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for ui, wi in zip((u + 1) / 2, w / 2, strict=True):
        x = (a.to(torch.float64) + ui * d).to(a.dtype)
        alpha, sigma = process.at(t_, x)
        score = tweedie_score(x, denoiser(x, batch_time(t_, x, x.dtype), **cond), alpha, sigma)
        total += wi * (score.to(torch.float64) * d).flatten(1).sum(1)
    return total


def _check_deterministic(sampler, denoiser, process, x_T, ts, kw) -> None:
    outs = [
        sampler(denoiser, process, x_T, ts, generator=torch.Generator(x_T.device).manual_seed(s), **kw) for s in (0, 1)
    ]
    if not torch.equal(outs[0], outs[1]):
        raise ValueError(
            "fit_grid needs a deterministic sampler (an ODE solver such as dpmpp_2m, unipc_2, ddim, euler, heun): "
            "this one gave different samples for two generators"
        )


@torch.no_grad()
def fit_grid(
    sampler,
    denoiser,
    process: NoiseProcess,
    n: int,
    x_T: Tensor,
    *,
    teacher_steps: int = 200,
    max_evals: int | None = None,
    free_steps: int = 12,
    knots: int = 8,
    t_start=None,
    t_end=None,
    final_denoise: bool = True,
    fit_end: bool = False,
    logp_weight: float = 0.0,
    logp_nodes: int = 8,
    init: str = "both",
    progress: bool = False,
    **cond,
) -> GridFit:
    """Fit an n-step grid for ``sampler`` on this denoiser (see the module docstring for the method).

    Args:
        sampler: a deterministic sampler with the common signature, e.g. ``SAMPLERS["dpmpp_2m"]``.
        denoiser: (x, t (B,), **cond) -> x0_hat, the model the grid is for.
        process: the noise process.
        n: steps of the grid (n + 1 times).
        x_T: (B, ...) pilot starts, e.g. ``process.prior_sample((256, ...), generator=...)``: draw them with
            another seed than the samples you will make, so the grid is not fitted to those.
        teacher_steps: steps of the DPM-Solver++(3M) teacher (uniform in lam).
        max_evals: budget of sampler runs for the search, shared by the starts (default 15 per unknown and start).
        free_steps: up to this n every lam step is an unknown; above it, ``knots`` unknowns warp the grid.
        t_start, t_end: the ends (default ``process.t_max``, ``process.t_min``); t_start is kept, and t_end too
            unless ``fit_end``.
        final_denoise: passed to the sampler and the teacher (see ``samplers._common``).
        fit_end: let the grid end earlier than t_end (one more unknown); pair it with ``final_denoise=False``.
        logp_weight: weight of the log-density gap G against the distance (both per coordinate); 0 fits the
            distance alone. ``SPREAD = dict(final_denoise=False, fit_end=True, logp_weight=0.5)`` is the recipe
            the sampler benchmark runs (docs/bench/samplers.md). G uses the score at t_end: a network's score at
            a tiny sigma is noisy, so for trained models give a t_end where its x0_hat is still smooth.
        logp_nodes: Gauss-Legendre nodes of the line integral behind G.
        init: where the search starts: "optimized", the stored few-step grid (``core.optimized_grid``, its step
            proportions and, with ``fit_end``, its end); "lam", the uniform lam grid; "both" (default), a search
            from each with half the budget (their basins differ from model to model); with ``t_start`` or
            ``t_end`` given, only the uniform lam grid (the stored one has the process's ends). Either way
            ``error_uniform_lam`` reports the uniform lam grid, and the result is never worse than it or a start.
        progress: show a tqdm bar over the sampler runs.
    Returns:
        ``GridFit`` with the grid ``ts`` (float64, n + 1 times) and the errors before and after.
    """
    if not (math.isfinite(float(logp_weight)) and float(logp_weight) >= 0):
        raise ValueError(f"logp_weight must be a number >= 0, got {logp_weight}")
    if int(n) < 1:
        raise ValueError(f"a grid needs at least 1 step, got n = {n}")
    if int(teacher_steps) < 2 * int(n):
        raise ValueError(f"teacher_steps must be at least 2 n = {2 * int(n)} to be a teacher, got {teacher_steps}")
    from scipy.optimize import minimize
    from tqdm.auto import tqdm

    n, a, b = int(n), *grid_ends(process, t_start, t_end)
    lam_a, lam_b = lam_start(process, a), float(process.lam(as_time(b)))
    if not math.isfinite(lam_b):
        raise ValueError(f"fit_grid needs sigma(t_end) > 0 (finite lam), got t_end = {b}")
    fine = grid_lam(process, teacher_steps, t_start=a, t_end=b)
    teacher = sample_dpm_solver_pp(denoiser, process, x_T, fine, order=3, final_denoise=final_denoise, **cond)
    kw = {**cond, "final_denoise": final_denoise}  # what every run of the sampler gets
    target = teacher.flatten(1).to(torch.float64)
    d = target.shape[1]
    # per-coordinate scales of J (module docstring): the teacher's RMS std, and d
    scale = float(target.std(dim=0).pow(2).mean().sqrt()) * math.sqrt(d) if target.shape[0] > 1 else 1.0
    scale = scale if scale > 0 else 1.0
    step_unknowns = n if n <= free_steps else min(int(knots), n)
    unknowns = step_unknowns + bool(fit_end)
    max_evals = 15 * unknowns * (1 + (init == "both")) if max_evals is None else int(max_evals)
    logp_evals = runs = 0

    def grid(v: np.ndarray) -> Tensor:
        lam_e = max(lam_b - float(v[-1]) ** 2, (lam_a + lam_b) / 2) if fit_end else lam_b
        lams = lam_grid_from_params(v[:step_unknowns], n, lam_a, lam_e)
        return _times(process, lams, a, b if lam_e >= lam_b else None)

    def gap(out: Tensor) -> float:
        nonlocal logp_evals
        logp_evals += 1
        return float(logp_difference(denoiser, process, b, teacher, out, logp_nodes, **cond).mean())

    bar = tqdm(total=max_evals, desc=f"fit grid (n = {n})", disable=not progress, unit="run", leave=False)
    evals = 0

    seen: dict[bytes, tuple[float, float]] = {}

    def measure(v: np.ndarray) -> tuple[float, float]:
        """(E, G) of the grid of v; G is nan without logp_weight; (inf, nan) where the grid is not valid."""
        key = np.asarray(v, dtype=np.float64).tobytes()
        if key not in seen:
            seen[key] = _measure(v)
        return seen[key]

    def _measure(v: np.ndarray) -> tuple[float, float]:
        nonlocal runs
        runs += 1
        try:
            out = sampler(denoiser, process, x_T, grid(v), **kw)
        except ValueError:  # two times that round to one (a step below the inverse's resolution)
            return math.inf, math.nan
        e = float((out.flatten(1).to(torch.float64) - target).norm(dim=1).mean())
        g = gap(out) if logp_weight > 0 and math.isfinite(e) else math.nan
        return (e, g) if math.isfinite(e) else (math.inf, math.nan)

    def objective(v: np.ndarray) -> float:
        nonlocal evals
        evals += 1
        bar.update()
        e, g = measure(v)
        j = e / scale + (logp_weight * abs(g) / d if logp_weight > 0 else 0.0)
        return j if math.isfinite(j) else math.inf

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    zeros = np.zeros(unknowns)  # the uniform lam grid
    _check_deterministic(sampler, denoiser, process, x_T, grid(zeros), kw)
    e0, g0 = measure(zeros)
    starts = [zeros]
    if init != "lam" and t_start is None and t_end is None:  # the stored grid's ends are the process's
        stored = _params_of(process.lam(grid_optimized(process, n)).numpy(), lam_a, step_unknowns,
                            lam_b if fit_end else None)  # fmt: skip
        starts = [stored] if init == "optimized" else [zeros, stored]
    # Powell searches its directions in turn: the end first (with fit_end it moves the objective most), then steps.
    # Each start gets an equal share of the budget; the result is the best point seen at any start or end.
    direc = np.roll(np.eye(unknowns), int(bool(fit_end)), axis=0)
    options = {"maxfev": max_evals // len(starts), "xtol": 1e-2, "ftol": 1e-4, "direc": direc}
    found = [(objective(zeros), 0, zeros)]
    for i, v0 in enumerate(starts):
        res = minimize(objective, v0, method="Powell", options=options)
        found += [(objective(v0), 2 * i + 1, v0), (res.fun, 2 * i + 2, res.x)]
    bar.close()
    v = min(found, key=lambda c: c[:2])[2]
    ts = grid(v)
    e, g = measure(v)
    count = count_nfe(denoiser)  # one more run, on one start, to count the sampler's NFE
    sampler(count, process, x_T[:1], ts, **{k: v[:1] if isinstance(v, Tensor) else v for k, v in kw.items()})
    runs += 3  # the determinism check (2) and the count
    nfe = len(fine) - 1 + final_denoise + runs * count.nfe + logp_evals * int(logp_nodes)
    return GridFit(ts, e, e0, evals, nfe, g, g0, bool(final_denoise))
