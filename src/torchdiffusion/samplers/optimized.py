"""The few-step default: UniPC-3, with its combination weights optimized offline together with the stored grid."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.optimized_grid import OPTIMIZED_WEIGHTS, ROUNDING, grid_optimized
from ..core.process import NoiseProcess
from . import _common
from .unipc import sample_unipc

__all__ = ["sample_optimized"]


def stored_weights(process: NoiseProcess, g: _common.Grid) -> list[list[float]] | None:
    """The stored weights for g's step count, each row normalized to sum 1, if g is ``grid_optimized``'s grid
    for that count on this process (lam within the stored rounding); else None."""
    if g.n not in OPTIMIZED_WEIGHTS:
        return None
    stored = process.lam(grid_optimized(process, g.n).to(torch.float64)).tolist()
    if not all(a == b or abs(a - b) <= ROUNDING for a, b in zip(stored, g.lam)):  # a == b: lam = -inf (Flow)
        return None
    return [[w / sum(row) for w in row] for row in OPTIMIZED_WEIGHTS[g.n]]


def _span(g: _common.Grid, j: int) -> float:
    """1 - e^{-(lam_j - lam_0)}, the factor of the weighted x0_hat in x_j (1 where alpha_0 = 0: Flow at t = 1)."""
    return _common.one_minus_exp(1.0, g.lam[j] - g.lam[0], g.alpha[0] * g.sigma[j] / (g.sigma[0] * g.alpha[j]))


def solver_weights(sampler, process: NoiseProcess, ts) -> list[list[float]]:
    """The w_jk (rows j = 1..n, row j holding j values) of an explicit data-prediction multistep ``sampler`` (a
    function like ``sample_unipc``, without a final denoise) on ts, in ``sample_optimized``'s form.

    Read off by running it from x_T = 0 with a denoiser that returns the k-th basis vector at its k-th call: its
    j-th evaluation point (and after n steps its output) is then alpha_j (1 - e^{-(lam_j - lam_0)}) sum_k w_jk e_k.
    """
    x, g = _common.setup(process, torch.zeros(1, len(ts) - 1, dtype=torch.float64), ts)
    calls = []

    def basis(x, t):
        e = torch.zeros_like(x)
        e[:, len(calls)] = 1.0
        calls.append(x.clone())
        return e

    y = sampler(basis, process, x, g.ts, final_denoise=False)
    points = [c[0] for c in calls[1:]] + [y[0]]
    return [(p[:j] / (g.alpha[j] * _span(g, j))).tolist() for j, p in enumerate(points, 1)]


def sample_weighted(
    denoiser, process: NoiseProcess, x: Tensor, ts, weights, *, final_denoise: bool = True, callback=None, **cond
) -> Tensor:
    """The general multistep form of ``sample_optimized`` with the given weights (rows j = 1..n, row j holding j
    values that sum to 1) on ts: what the stored weights run in, and what ``benchmarks/optimize_solver.py`` searches
    over. ts must stay at sigma > 0 (no step lands on the data)."""
    x, g = _common.setup(process, x, ts)
    if [len(r) for r in weights] != list(range(1, g.n + 1)):
        raise ValueError(f"weights for {g.n} steps need rows of 1..{g.n} values, got {[len(r) for r in weights]}")
    if g.lands[-1]:
        raise ValueError("sample_weighted needs sigma > 0 at the last time (its form divides by no sigma, but a "
                         "landing step is _common's x0_hat rule, not a weighted mean)")  # fmt: skip
    x_T, m = x, [denoiser(x, g.time(0, x), **cond)]
    for i in range(g.n):
        j = i + 1
        x = _common.combine(g.sigma[j] / g.sigma[0], x_T, [g.alpha[j] * _span(g, j) * w for w in weights[i]], m)
        if j < g.n:
            m.append(denoiser(x, g.time(j, x), **cond))
        _common.report(callback, i, g, x, m[i], len(m))
    return _common.finish(denoiser, g, x, final_denoise, cond)


def sample_optimized(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """The few-step default: on ``grid_optimized``'s grid for a step count of ``core.optimized_grid.OPTIMIZED_WEIGHTS``,
    the stored weights; on every other grid, UniPC-3 (``sample_unipc``), whose weights they replace.

    Every explicit multistep solver in data-prediction form (DDIM, DPM-Solver++, UniPC with its corrector, which
    only re-weights values already computed) puts its j-th network evaluation, and after n steps its output, at

        x_j = (sigma_j / sigma_0) x_T + alpha_j (1 - e^{-(lam_j - lam_0)}) sum_{k<j} w_jk x0_hat_k,   sum_k w_jk = 1

    with x0_hat_k = D(x_k, t_k): the probability-flow ODE's variation-of-constants solution in lam, data form
    (Lu et al. 2022, Prop. 3.1; DPM-Solver++, Lu et al. 2023, Sec. 4), with x0_hat replaced by a weighted mean of
    the values so far; weights that sum to 1 keep a constant x0_hat exact. UniPC-2 and UniPC-3 are choices of the
    w_jk (from their order conditions); the stored ones started from UniPC's and were optimized once, offline,
    with the grid, on random Gaussian mixtures with exact denoisers, in the spirit of learned-solver work (S4S,
    Frankel et al. 2025; Bespoke solvers, Shaul et al. 2024) but with nothing fitted per model
    (``benchmarks/optimize_solver.py``; ``core.optimized_grid`` says how). Deterministic: one network evaluation
    per step (plus one for the final denoise), ``generator`` unused.

    The weights belong to the grid they were optimized with: on any other grid (another step count, a fitted grid,
    grid_lam) this is UniPC-3 itself, so the function is a sound default everywhere.

    Args: as ``sample_unipc``.
    """
    x, g = _common.setup(process, x, ts)
    weights = stored_weights(process, g)
    if weights is None:
        return sample_unipc(
            denoiser, process, x, ts, order=3, final_denoise=final_denoise, generator=generator, callback=callback,
            **cond,
        )  # fmt: skip
    # grid_optimized ends before the process's t_min, at sigma > 0, as sample_weighted needs
    return sample_weighted(denoiser, process, x, g.ts, weights, final_denoise=final_denoise, callback=callback, **cond)
