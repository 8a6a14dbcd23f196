"""Langevin dynamics and annealed Langevin dynamics (Song & Ermon 2019)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.predictions import tweedie_score
from ..core.process import NoiseProcess
from . import _common

__all__ = ["langevin_dynamics", "sample_annealed_langevin"]


def langevin_dynamics(
    score,
    x: Tensor,
    *,
    step_size: float,
    n_steps: int,
    generator: torch.Generator | None = None,
    callback=None,
) -> Tensor:
    """Unadjusted Langevin dynamics x <- x + tau score(x) + sqrt(2 tau) z (seed 003, "Langevin Dynamics").

    Args:
        score: callable x -> grad log p(x), shaped like x.
        x: (B, ...) start; not modified.
        step_size: tau > 0. The chain's stationary law approaches p as tau -> 0.
        n_steps: number of updates.
    """
    if step_size <= 0 or n_steps < 0:
        raise ValueError(f"need step_size > 0 and n_steps >= 0, got {step_size} and {n_steps}")
    for i in range(n_steps):
        x = x + step_size * score(x) + math.sqrt(2 * step_size) * _common.noise_like(x, generator)
        if callback is not None:
            callback({"i": i, "x": x})
    return x


def sample_annealed_langevin(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    n_steps_each: int = 100,
    step_eps: float = 2e-5,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1; seed 003, "Sampling (via ALD)").

    For each level t_i of ``ts`` (sigma_1 > ... > sigma_L), with step
    a_i = step_eps * sigma_i^2 / sigma_L^2, run ``n_steps_each`` updates

        x <- x + a_i / 2 * s(x, t_i) + sqrt(a_i) z,

    where the score s comes from the denoiser by Tweedie's formula. The paper's
    step_eps = 2e-5 is tuned for sigma_L = 0.01 (a_L / sigma_L^2 = 0.2); scale it with
    sigma_L^2 for other grids. On VE, ``grid_lam`` gives the paper's geometric sigmas.

    Returns samples shaped like x; NFE = len(ts) * n_steps_each (+1 for the final denoise).
    """
    if step_eps <= 0 or n_steps_each < 1:
        raise ValueError(f"need step_eps > 0 and n_steps_each >= 1, got {step_eps} and {n_steps_each}")
    x, g = _common.setup(process, x, ts)
    if g.sigma[-1] <= 0:
        raise ValueError("annealed Langevin needs sigma(ts[-1]) > 0; end the grid at process.t_min")
    nfe = 0
    for i, (alpha, sigma) in enumerate(zip(g.alpha, g.sigma)):
        step = step_eps * sigma**2 / g.sigma[-1] ** 2  # a_i = eps sigma_i^2 / sigma_L^2
        t = g.time(i, x)
        for _ in range(n_steps_each):
            x0_hat = denoiser(x, t, **cond)
            nfe += 1
            score = tweedie_score(x, x0_hat, alpha, sigma)
            x = x + (step / 2) * score + math.sqrt(step) * _common.noise_like(x, generator)
        _common.report(callback, i, g, x, x0_hat, nfe)
    return _common.finish(denoiser, g, x, final_denoise, cond)
