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
    x~_s = x~_t + (s_s - s_t) / 2 (d_t + d_s) with d = (x~ - x0_hat) / s, 2 NFE (1 where s_s = 0, which Euler
    reaches exactly). Heun needs alpha_t > 0.
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
    if bool((a_t == 0).any()):
        raise ValueError("the Heun teacher step needs alpha(t) > 0; use solver='ddim' from t where alpha = 0")
    ends = (sg_s > 0).flatten()
    if not bool(ends.any()):
        return x_s
    ss, st = sg_s / a_s, sg_t / a_t
    x_s_safe = torch.where(append_dims(ends, x.ndim), x_s, x)  # keep the second call finite where s_s = 0
    s_eval = torch.where(ends, s, t)
    d_s = denoiser(x_s_safe, s_eval.to(x.dtype), **cond)
    slope_t = (x / a_t - d_t) / st
    slope_s = (x_s_safe / a_s - d_s) / torch.where(ss > 0, ss, torch.ones_like(ss))
    heun = a_s * (x / a_t + (ss - st) / 2 * (slope_t + slope_s))
    return torch.where(append_dims(ends, x.ndim), heun, x_s)
