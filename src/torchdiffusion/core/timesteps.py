"""Time grids: decreasing float64 tensors from t_max to t_min. A grid is data, never a flag.

Every grid has n + 1 points for n steps, starts at ``process.t_max`` and ends at
``process.t_min`` (unless given ``t_start`` / ``t_end``). Samplers walk the pairs
(ts[i], ts[i+1]) and finish with one denoising step at ts[-1] (see ``samplers``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .process import NoiseProcess, as_time

__all__ = ["grid_t", "grid_lam", "grid_karras", "grid_quadratic", "grid_discrete", "check_grid", "grid_ends"]
__all__ += ["lam_start"]


def grid_ends(process: NoiseProcess, t_start, t_end) -> tuple[float, float]:
    """(t_start, t_end) of a grid: the given ends, else (t_max, t_min); t_start > t_end is checked."""
    t_start = process.t_max if t_start is None else float(t_start)
    t_end = process.t_min if t_end is None else float(t_end)
    if not t_start > t_end:
        raise ValueError(f"a grid runs from t_start > t_end, got {t_start} and {t_end}")
    return t_start, t_end


def _check_n(n: int) -> None:
    if int(n) < 1:
        raise ValueError(f"a grid needs at least 1 step, got n = {n}")


def grid_t(process: NoiseProcess, n: int, *, t_start=None, t_end=None) -> Tensor:
    """n steps uniform in t (Song et al. 2021's default for SDE samplers)."""
    _check_n(n)
    a, b = grid_ends(process, t_start, t_end)
    return torch.linspace(a, b, n + 1, dtype=torch.float64)


def grid_quadratic(process: NoiseProcess, n: int, *, t_start=None, t_end=None) -> Tensor:
    """n steps uniform in sqrt(t - t_end): denser near the data (DDIM's "quadratic" spacing)."""
    _check_n(n)
    a, b = grid_ends(process, t_start, t_end)
    u = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    return b + (a - b) * u**2


# Where alpha(t_start) = 0 (Flow at t = 1) lam is -inf and a grid uniform in lam cannot start there.
# Such grids then run uniformly from LAM_MIN = -log(80) (sigma/alpha = 80, EDM's sigma_max) and
# keep t_start as their first point: one first step from pure noise to sigma/alpha = 80.
LAM_MIN = -math.log(80.0)


def lam_start(process: NoiseProcess, a: float) -> float:
    """lam at the grid's first time a, or ``LAM_MIN`` where that is -inf (alpha(a) = 0)."""
    lam = float(process.lam(as_time(a)))
    return lam if math.isfinite(lam) else LAM_MIN


def grid_lam(process: NoiseProcess, n: int, *, t_start=None, t_end=None) -> Tensor:
    """n steps uniform in half log-SNR lam (DPM-Solver's "logSNR" grid; geometric sigmas on VE).

    A grid that ends where sigma = 0 (t_end = 0 on VP, Cosine, EDM, Flow, Discrete: lam = +inf) runs its first n - 1
    steps uniformly in lam to ``process.t_min`` and takes the last step from there onto t_end, where samplers
    return x0_hat (the data-end policy of ``samplers._common``), as the start handles alpha = 0 (``LAM_MIN``)."""
    _check_n(n)
    a, b = grid_ends(process, t_start, t_end)
    if float(process.sigma(as_time(b))) == 0.0:
        if n == 1 or not a > process.t_min > b:
            return torch.tensor([a, b], dtype=torch.float64) if n == 1 else grid_t(process, n, t_start=a, t_end=b)
        return torch.cat(
            [grid_lam(process, n - 1, t_start=a, t_end=process.t_min), torch.tensor([b], dtype=torch.float64)]
        )
    lams = torch.linspace(lam_start(process, a), float(process.lam(as_time(b))), n + 1, dtype=torch.float64)
    ts = process.t_from_lam(lams)
    ts[0], ts[-1] = a, b  # exact ends despite the inverse's rounding
    return ts


def grid_karras(process: NoiseProcess, n: int, *, rho: float = 7.0, t_start=None, t_end=None) -> Tensor:
    """n steps uniform in (sigma/alpha)^(1/rho) (Karras et al. 2022, Eq. 5, rho = 7)."""
    _check_n(n)
    a, b = grid_ends(process, t_start, t_end)
    # sigma/alpha = exp(-lam) is the noise level of the equivalent alpha = 1 process.
    s_max, s_min = math.exp(-lam_start(process, a)), float(torch.exp(-process.lam(as_time(b))))
    u = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    ts = process.t_from_lam(-torch.log(s))
    ts[0], ts[-1] = a, b
    return ts


def grid_discrete(process: NoiseProcess, n: int, *, spacing: str = "leading") -> Tensor:
    """n integer steps of a discrete process with T = process.n_steps, as DDPM codebases space them.

    - "linspace": round(linspace(T, 1, n)) (DDIM / iDDPM "uniform" rounding);
    - "leading":  1 + k * (T // n) for k = n-1..0 (Stable Diffusion's default; ends at t = 1);
    - "trailing": T - k * (T / n) for k = 0..n-1, rounded (Lin et al. 2024, starts at t = T).
    With n = T all three give T, T-1, ..., 1: Ho et al.'s Algorithm 2.
    """
    if not process.discrete:
        raise ValueError(f"grid_discrete needs a discrete-time process (Discrete), got {process!r}")
    T = process.n_steps
    if not 1 <= n <= T:
        raise ValueError(f"n must be in 1..{T}, got {n}")
    if spacing == "linspace":
        ts = torch.linspace(T, 1, n, dtype=torch.float64).round()
    elif spacing == "leading":
        ts = 1 + torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n)
    elif spacing == "trailing":
        ts = (T - torch.arange(0, n, dtype=torch.float64) * (T / n)).round()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of ['leading', 'linspace', 'trailing']")
    return ts


def check_grid(ts) -> Tensor:
    """Validate a grid: a 1-d float64 tensor of at least 1 strictly decreasing time."""
    ts = as_time(torch.as_tensor(ts))
    if ts.ndim != 1 or ts.numel() < 1:
        raise ValueError(f"ts must be a 1-d tensor of times, got shape {tuple(ts.shape)}")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("ts must be strictly decreasing (from noise to data)")
    if not bool(torch.isfinite(ts).all()):
        raise ValueError("ts must be finite")
    return ts
