"""Progressive distillation (Salimans & Ho 2022): a student that takes in one DDIM step what its teacher takes in two.

For a student step t -> s and the teacher's midpoint t_mid, the teacher walks x_t -> x_mid -> x_s by two
deterministic DDIM steps, and the student's x0_hat is trained towards the one x~ whose single DDIM step from
(x_t, t) lands on that x_s (Salimans & Ho 2022, Algorithm 2):

    x~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t).

Where sigma_s = 0 (the step lands on the data) x~ = x_s / alpha_s. The loss is |x0_hat - x~|^2 with their
"truncated SNR" weight max(SNR(t), 1) (Sec. 4, form "x"), or the same error in v units, |v_hat - v~|^2 (form
"v", which on a variance-preserving process weighs by SNR + 1). Rounds halve the steps: the student of one
round (N steps) is the teacher of the next (N / 2), on the same nested grid (``halving_grid``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.predictions import V
from ..core.process import NoiseProcess, append_dims, as_time
from ..core.timesteps import grid_karras
from .teacher import ode_step

__all__ = ["progressive_target", "progressive_loss", "halving_grid", "FORMS"]

FORMS = ("x", "v")


def halving_grid(process: NoiseProcess, steps: int, *, rho: float = 7.0) -> Tensor:
    """The grid of a ``steps``-step DDIM sampler whose even points are the grid of ``steps // 2`` steps.

    ``grid_karras`` (Karras et al. 2022, Eq. 5, rho = 7: uniform in (sigma / alpha)^(1/rho), so nested for every
    power of 2). Where the process reaches the data (sigma(0) = 0: VP, Cosine, EDM, Flow, Discrete) its last point
    t_min becomes t = 0, where DDIM returns x0_hat: an N-step student costs exactly N evaluations. Without a data
    end (VE) the sampler's last denoising step at t_min adds one evaluation.
    """
    if steps < 1 or steps & (steps - 1):
        raise ValueError(f"progressive distillation halves the steps: steps must be a power of 2, got {steps}")
    ts = grid_karras(process, steps, rho=rho)
    if float(process.sigma(as_time(0.0))) == 0.0 and process.t_min > 0:
        ts[-1] = 0.0
    return ts


def progressive_target(teacher, process: NoiseProcess, x_t: Tensor, t: Tensor, t_mid: Tensor, s: Tensor, **cond):
    """x~ of the module's formula: the x0_hat whose DDIM step t -> s equals the teacher's two, t -> t_mid -> s.
    t, t_mid, s: (B,) float64 with t > t_mid > s."""
    x_mid = ode_step(teacher, process, x_t, t, t_mid, **cond)
    x_s = ode_step(teacher, process, x_mid, t_mid, s, **cond)
    a_t, sg_t = (append_dims(v, x_t.ndim).to(x_t.dtype) for v in process.alpha_sigma(t))
    a_s, sg_s = (append_dims(v, x_t.ndim).to(x_t.dtype) for v in process.alpha_sigma(s))
    r = sg_s / sg_t
    return (x_s - r * x_t) / (a_s - r * a_t)


def progressive_loss(
    student,
    teacher,
    process: NoiseProcess,
    x0: Tensor,
    *,
    t: Tensor,
    t_mid: Tensor,
    s: Tensor,
    noise: Tensor,
    form: str = "x",
    **cond,
) -> Tensor:
    """Per-example loss (B,) of one progressive-distillation step (Salimans & Ho 2022, Algorithm 2).

    Args:
        student, teacher: denoisers (x, t, **cond) -> x0_hat; the teacher is not differentiated.
        x0: data (B, ...); x_t = alpha_t x0 + sigma_t noise. t, t_mid, s: (B,) the student's step and its midpoint.
        form: "x" (|x0_hat - x~|^2 weighted by max(SNR(t), 1)) or "v" (|v_hat - v~|^2).
    """
    if form not in FORMS:
        raise ValueError(f"unknown progressive-distillation form {form!r}; choose one of {list(FORMS)}")
    x_t = process.perturb(x0, t, noise)
    with torch.no_grad():
        goal = progressive_target(teacher, process, x_t, t, t_mid, s, **cond)
    out = student(x_t, t.to(x0.dtype), **cond)
    if form == "v":
        err = V.from_x0(process, x_t, t, out) - V.from_x0(process, x_t, t, goal)
        return (err**2).flatten(1).mean(1)
    weight = process.snr(t).clamp(min=1.0).to(x0.dtype)
    return weight * ((out - goal) ** 2).flatten(1).mean(1)
