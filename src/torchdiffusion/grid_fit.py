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

Parametrization: the grid keeps its ends (t_start, t_end) and has positive steps in lam,
h_i = (lam_end - lam_start) softmax(v)_i, starting from v = 0 (the uniform lam grid, ``grid_lam``). For
n <= ``free_steps`` every step is free; longer grids warp the uniform grid with v interpolated
linearly between ``knots`` values, so the search has few unknowns at any n. Minimized derivative-free
with Powell's method (scipy). Cost: about ``max_evals`` runs of the n-step sampler on the pilot batch plus
``teacher_steps`` + 1 evaluations; once per (model, sampler, n), after which the grid is plain data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .process import NoiseProcess, _as_t
from .samplers import count_nfe, sample_dpm_solver_pp
from .timesteps import _ends, _lam_start, grid_lam

__all__ = ["GridFit", "fit_grid", "lam_grid_from_params"]


@dataclass(frozen=True)
class GridFit:
    """A fitted grid and what it cost: ``ts`` goes to any sampler's ``ts`` argument."""

    ts: Tensor  # float64, n + 1 decreasing times
    error: float  # E(ts): mean distance of the pilot samples to the teacher's
    error_uniform_lam: float  # E of the uniform lam grid with the same ends, where the search started
    evals: int  # runs of the n-step sampler on the pilot batch
    nfe: int  # network evaluations the fit used (teacher and search), each on the whole pilot batch


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


def _times(process: NoiseProcess, lams: np.ndarray, a: float, b: float) -> Tensor:
    ts = process.t_from_lam(torch.from_numpy(lams))
    ts[0], ts[-1] = a, b  # exact ends (lam may be -inf at t_start, e.g. Flow at t = 1)
    return ts


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
    teacher_steps: int = 400,
    max_evals: int | None = None,
    free_steps: int = 12,
    knots: int = 8,
    t_start=None,
    t_end=None,
    final_denoise: bool = True,
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
        max_evals: budget of sampler runs for the search (default 40 per unknown).
        free_steps: up to this n every lam step is an unknown; above it, ``knots`` unknowns warp the grid.
        t_start, t_end: the ends, kept fixed (default ``process.t_max``, ``process.t_min``).
        final_denoise: passed to the sampler and the teacher (see ``samplers._loop``).
        progress: show a tqdm bar over the sampler runs.
    Returns:
        ``GridFit`` with the grid ``ts`` (float64, n + 1 times) and the errors before and after.
    """
    if int(n) < 1:
        raise ValueError(f"a grid needs at least 1 step, got n = {n}")
    if int(teacher_steps) < 2 * int(n):
        raise ValueError(f"teacher_steps must be at least 2 n = {2 * int(n)} to be a teacher, got {teacher_steps}")
    from scipy.optimize import minimize
    from tqdm.auto import tqdm

    n, a, b = int(n), *_ends(process, t_start, t_end)
    lam_a, lam_b = _lam_start(process, a), float(process.lam(_as_t(b)))
    if not math.isfinite(lam_b):
        raise ValueError(f"fit_grid needs sigma(t_end) > 0 (finite lam), got t_end = {b}")
    fine = grid_lam(process, teacher_steps, t_start=a, t_end=b)
    teacher = sample_dpm_solver_pp(denoiser, process, x_T, fine, order=3, final_denoise=final_denoise, **cond)
    kw = {**cond, "final_denoise": final_denoise}  # what every run of the sampler gets
    target = teacher.flatten(1).to(torch.float64)
    unknowns = n if n <= free_steps else min(int(knots), n)
    max_evals = 40 * unknowns if max_evals is None else int(max_evals)
    bar = tqdm(total=max_evals, desc=f"fit grid (n = {n})", disable=not progress, unit="run", leave=False)
    evals = 0

    def error(v: np.ndarray) -> float:
        nonlocal evals
        evals += 1
        bar.update()
        try:
            ts = _times(process, lam_grid_from_params(v, n, lam_a, lam_b), a, b)
            out = sampler(denoiser, process, x_T, ts, **kw)
        except ValueError:  # two times that round to one (a step below the inverse's resolution)
            return math.inf
        e = float((out.flatten(1).to(torch.float64) - target).norm(dim=1).mean())
        return e if math.isfinite(e) else math.inf

    v0 = np.zeros(unknowns)
    ts0 = _times(process, lam_grid_from_params(v0, n, lam_a, lam_b), a, b)
    _check_deterministic(sampler, denoiser, process, x_T, ts0, kw)
    e0 = error(v0)
    res = minimize(error, v0, method="Powell", options={"maxfev": max_evals, "xtol": 1e-2, "ftol": 1e-4})
    bar.close()
    v = res.x if res.fun < e0 else v0
    ts = _times(process, lam_grid_from_params(v, n, lam_a, lam_b), a, b)
    d = count_nfe(denoiser)  # one more run, on one start, to count the sampler's NFE
    sampler(d, process, x_T[:1], ts, **kw)
    runs = evals + 3  # the search, the determinism check (2) and the count
    return GridFit(ts, min(float(res.fun), e0), e0, evals, len(fine) - 1 + final_denoise + runs * d.nfe)
