"""Consistency distillation and consistency training (Song et al. 2023), with the improved recipe of Song &
Dhariwal 2023 ("improved consistency training", iCT).

Both compare the consistency function at two neighbouring noise levels s_n < s_{n+1} of a discretization of
[s_min, s_max] (Karras et al. 2022's rho = 7 spacing, ``consistency_levels``):

    L = lambda(s_n) d( f_theta(x_{n+1}, t_{n+1}), f_target(x^_n, t_n) ),    x_{n+1} = alpha_{n+1} x0 + sigma_{n+1} z,

where x^_n is one step of a teacher's probability-flow ODE solver from x_{n+1} (distillation, Eq. 7 of Song et al.
2023) or, without a teacher, alpha_n x0 + sigma_n z with the same z (training, Eq. 10: the one-sample estimate of
the teacher's score). f_target is an EMA of theta in the original recipe and theta itself, not differentiated,
in iCT (Sec. 3.2).

``CM`` and ``ICT`` bundle the choices of each recipe: the number of levels over training (``levels_at``), how the
pair n is drawn (``pair_probs``), the weight lambda and the distance d. iCT: pseudo-Huber distance with
c = 0.00054 sqrt(dim) (Sec. 3.3), lambda(s_n) = 1 / (s_{n+1} - s_n) (Sec. 3.1), pairs drawn from a discretized
lognormal with P_mean = -1.1, P_std = 2 (Sec. 3.5), and N doubling from 10 to 1280 (Sec. 3.4, Eq. 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.consistency import noise_level
from ..core.process import NoiseProcess
from ..core.timesteps import LAM_MIN, grid_karras
from .teacher import ode_step

__all__ = [
    "ConsistencyRecipe",
    "CM",
    "ICT",
    "RECIPES",
    "consistency_levels",
    "consistency_loss",
    "pseudo_huber",
    "draw_pairs",
]


def consistency_levels(process: NoiseProcess, n: int, *, t_min: float | None = None, rho: float = 7.0) -> Tensor:
    """n increasing times t_1 = t_min < ... < t_n = t_max whose noise levels s = sigma / alpha are Karras et al.'s
    rho-spacing (Song et al. 2023, Appendix C; ``grid_karras`` reversed)."""
    if n < 2:
        raise ValueError(f"a consistency discretization needs at least 2 levels, got {n}")
    return grid_karras(process, n - 1, rho=rho, t_end=process.t_min if t_min is None else t_min).flip(0)


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Per-example sqrt(|a - b|^2 + c^2) - c (Song & Dhariwal 2023, Sec. 3.3); c = 0.00054 sqrt(dim) by default."""
    dim = a[0].numel()
    c = 0.00054 * math.sqrt(dim) if c is None else c
    return torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + c**2) - c


def _l2(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)


@dataclass(frozen=True)
class ConsistencyRecipe:
    """The choices of one consistency recipe (see the module docstring)."""

    name: str
    distance: str  # "l2" (mean square) or "pseudo_huber"
    weighting: str  # "uniform" or "inverse_gap" (1 / (s_{n+1} - s_n))
    pairs: str  # "uniform" or "lognormal"
    ema_target: bool  # f_target is the EMA net (True) or theta without gradient (False)
    s0: int  # levels at the start of training
    s1: int  # levels at the end
    curriculum: str  # "sqrt" (Song et al. 2023, Appendix C, N(k)) or "doubling" (iCT Eq. 8)

    def levels_at(self, step: int, total: int) -> int:
        """N(k): the number of levels at optimizer step k of K."""
        k, K = step, max(total, 1)
        if self.curriculum == "sqrt":  # N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1
            return int(math.ceil(math.sqrt(k / K * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2) - 1)) + 1
        k_prime = max(1, math.floor(K / (math.log2(self.s1 // self.s0) + 1)))
        return min(self.s0 * 2 ** (k // k_prime), self.s1) + 1

    def pair_probs(self, process: NoiseProcess, levels: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
        """Probabilities of the N - 1 pairs (n, n + 1) of ``levels``: uniform, or iCT's lognormal
        p(n) ~ erf((ln s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_n - P_mean) / (sqrt 2 P_std))."""
        m = len(levels) - 1
        if self.pairs == "uniform":
            return torch.full((m,), 1.0 / m, dtype=torch.float64)
        ln_s = torch.log(noise_level(process, levels).clamp(min=1e-300))
        cdf = torch.erf((ln_s - p_mean) / (math.sqrt(2) * p_std))
        p = (cdf[1:] - cdf[:-1]).clamp(min=0)
        return p / p.sum()

    def weight(self, process: NoiseProcess, t: Tensor, s: Tensor) -> Tensor:
        """lambda for the pair (s, t), s < t: 1, or 1 / (s(t) - s(s)) in noise levels. Where alpha(t) = 0 (Flow
        at t = 1) the level is the one the grid puts there, ``timesteps.LAM_MIN``'s 80, not infinity, whose
        weight 0 would leave the time of one-step sampling untrained."""
        if self.weighting == "uniform":
            return torch.ones_like(t)
        top = noise_level(process, t)
        top = torch.where(torch.isinf(top), torch.full_like(top, math.exp(-LAM_MIN)), top)
        return 1.0 / (top - noise_level(process, s))

    def dist(self, a: Tensor, b: Tensor) -> Tensor:
        return pseudo_huber(a, b) if self.distance == "pseudo_huber" else _l2(a, b)


CM = ConsistencyRecipe("cm", "l2", "uniform", "uniform", True, 2, 150, "sqrt")
"""Song et al. 2023: squared L2 (their LPIPS needs an image network), uniform pairs, an EMA target, N from 2 to 150."""
ICT = ConsistencyRecipe("ict", "pseudo_huber", "inverse_gap", "lognormal", False, 10, 1280, "doubling")
"""Song & Dhariwal 2023: pseudo-Huber, 1 / gap weights, lognormal pairs, no EMA target, N doubling 10 -> 1280."""
RECIPES = {r.name: r for r in (CM, ICT)}


def draw_pairs(probs: Tensor, u: Tensor) -> Tensor:
    """Pair indices n (0-based, into the N - 1 pairs) from uniforms u by the inverse CDF of ``probs``."""
    cdf = torch.cumsum(probs.to(u.device), 0)
    return torch.searchsorted(cdf, u.to(cdf.dtype).clamp(max=float(cdf[-1]) - 1e-12), right=True).clamp(
        max=len(probs) - 1
    )


def consistency_loss(
    model,
    target_model,
    process: NoiseProcess,
    x0: Tensor,
    *,
    t: Tensor,
    s: Tensor,
    noise: Tensor,
    recipe: ConsistencyRecipe = CM,
    teacher=None,
    solver: str = "ddim",
    **cond,
) -> Tensor:
    """Per-example loss (B,) between f at (x_t, t) and the target at (x^_s, s), s < t (the module's formula).

    Args:
        model: the consistency function being trained (``core.consistency.ConsistencyModel``).
        target_model: the same function with the target weights (EMA), or ``model`` itself (iCT); not differentiated.
        x0: data (B, ...); noise: z (B, ...); t, s: (B,) float64 times of the pair, s < t.
        teacher: a denoiser (distillation: x^_s is its ``solver`` step from x_t), or None (training: x^_s = alpha_s
            x0 + sigma_s z).
    """
    x_t = process.perturb(x0, t, noise)
    with torch.no_grad():
        x_s = (
            process.perturb(x0, s, noise) if teacher is None else ode_step(teacher, process, x_t, t, s, solver, **cond)
        )
        goal = target_model(x_s, s.to(x0.dtype), **cond)
    out = model(x_t, t.to(x0.dtype), **cond)
    return recipe.weight(process, t, s).to(x0.dtype) * recipe.dist(out, goal)
