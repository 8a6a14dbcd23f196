"""A teacher's deterministic probability-flow ODE steps with a time per example, as distillation needs them.

The samplers of ``samplers/`` walk one grid of Python floats for the whole batch; a distillation loss draws a
different pair of times for every example, so its teacher steps take (B,) time tensors. The update is the same
first-order exponential integrator as ``samplers.ddim`` (DDIM with eta = 0, Song et al. 2021, Eq. 12), and the
second-order Heun step is Karras et al. 2022's Algorithm 1 in the scaled coordinates x~ = x / alpha, s = sigma /
alpha, where the ODE reads dx~/ds = (x~ - x0_hat) / s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.process import NoiseProcess, append_dims

__all__ = ["ode_step", "SOLVERS"]

SOLVERS = ("ddim", "heun")


def _curves(process: NoiseProcess, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    alpha, sigma = process.alpha_sigma(t)
    return append_dims(alpha, x.ndim).to(x.dtype), append_dims(sigma, x.ndim).to(x.dtype)


def ode_step(denoiser, process: NoiseProcess, x: Tensor, t: Tensor, s: Tensor, solver: str = "ddim", **cond) -> Tensor:
    """x_s from x_t along the probability-flow ODE of ``denoiser``, per example (t, s: (B,) float64, t > s).

    "ddim": x_s = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) x0_hat(x_t, t), 1 NFE; where
    sigma_s = 0 it is alpha_s x0_hat. "heun": Euler in (x~, s) is that same step; Heun adds the slope at its end,
    x~_s = x~_t + (s_s - s_t) / 2 (d_t + d_s) with the slope d = (x~ - x0_hat) / s = eps_hat, 2 NFE. Where s_s = 0
    (Euler lands on the data exactly) or alpha_t = 0 (Flow at t = 1: s_t is infinite, and so is Heun's step in s)
    the example takes the DDIM step.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; choose one of {list(SOLVERS)}")
    a_t, sg_t = _curves(process, t, x)
    a_s, sg_s = _curves(process, s, x)
    r = sg_s / sg_t
    d_t = denoiser(x, t.to(x.dtype), **cond)
    x_s = r * x + (a_s - a_t * r) * d_t
    if solver == "ddim":
        return x_s
    heun = ((sg_s > 0) & (a_t > 0)).flatten()
    if not bool(heun.any()):
        return x_s
    mask = append_dims(heun, x.ndim)
    x_eval = torch.where(mask, x_s, x)  # the second call only where Heun applies; elsewhere a harmless repeat
    d_s = denoiser(x_eval, torch.where(heun, s, t).to(x.dtype), **cond)
    slope_t = (x - a_t * d_t) / sg_t  # eps_hat at t
    slope_s = (x_eval - a_s * d_s) / torch.where(mask, sg_s, sg_t)  # eps_hat at s
    step = torch.where(mask, sg_s / a_s - sg_t / a_t, torch.zeros_like(a_t))  # s_s - s_t where Heun applies
    return torch.where(mask, x_s + a_s * step / 2 * (slope_s - slope_t), x_s)
