"""Consistency sampling: one step, or several with fresh noise in between (Song et al. 2023, Algorithm 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.consistency import noise_level
from ..core.process import NoiseProcess
from ..core.timesteps import check_grid, grid_karras
from . import _common

__all__ = ["sample_consistency", "consistency_times"]


def consistency_times(process: NoiseProcess, steps: int, *, t_min: float | None = None) -> Tensor:
    """The ``steps`` times a k-step consistency sampler evaluates f at: Karras et al.'s rho = 7 spacing of the
    noise level from t_max down to (not including) t_min, the grid of ``grid_karras`` without its last point.
    Song et al. 2023 chose their multistep times by search; this is the search-free default."""
    t_min = process.t_min if t_min is None else t_min
    return grid_karras(process, int(steps), t_end=t_min)[:-1]


def sample_consistency(
    model,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    t_min: float | None = None,
    generator: torch.Generator | None = None,
    callback=None,
    final_denoise: bool = True,
    **cond,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) for any process.

    x0 = f(x, ts[0]); then for each later time t of ``ts``: x_t = alpha_t (x0 + sqrt(s_t^2 - s_min^2) z), the
    forward process from the boundary t_min to t in scaled coordinates (s = sigma / alpha, ``noise_level``), and
    x0 = f(x_t, t). With one time it is one-step generation.

    Args:
        model: a consistency function f(x_t, t (B,), **cond) -> x_{t_min} / alpha (``core.consistency``).
        process: its noise process. x: (B, ...) a draw of the prior at ts[0] (``process.prior_sample``).
        ts: decreasing times, all above t_min (``consistency_times(process, k)``).
        t_min: the model's boundary time (default: ``model.t_min``, else ``process.t_min``).
        generator: the only source of noise. callback: {"i", "t", "x", "x0_hat", "nfe"} after each evaluation.
        final_denoise: no effect (f already returns the data end); accepted so every sampler takes the same options.
    Returns:
        samples shaped like x. NFE = len(ts).
    """
    ts = check_grid(ts).to(x.device)
    t_min = float(getattr(model, "t_min", process.t_min) if t_min is None else t_min)
    if float(ts[-1]) <= t_min:
        raise ValueError(
            f"consistency sampling evaluates f above its boundary t_min={t_min}; got ts[-1]={float(ts[-1])}"
        )
    s_min = float(noise_level(process, t_min))
    alpha, s = process.alpha(ts).tolist(), noise_level(process, ts).tolist()
    x0 = None
    for i in range(len(ts)):
        if i > 0:  # re-noise the current estimate to level s_i
            z = _common.noise_like(x0, generator)
            x = alpha[i] * torch.add(x0, z, alpha=math.sqrt(s[i] ** 2 - s_min**2))
        x0 = model(x, torch.full((x.shape[0],), float(ts[i]), dtype=x.dtype, device=x.device), **cond)
        if callback is not None:
            callback({"i": i, "t": float(ts[i]), "x": x, "x0_hat": x0, "nfe": i + 1})
    return x0
