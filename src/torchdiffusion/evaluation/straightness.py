"""How straight a model's probability-flow trajectories are (Liu et al. 2023, "Flow straight and fast", Eq. 5).

S = integral over t of E |(x_1 - x_0) - v(x_t, t)|^2 dt along the ODE's own trajectories, with x_1 the noise
the trajectory starts from and x_0 where it ends: 0 exactly when every trajectory is a straight line walked
at constant speed, which one Euler step then solves exactly. For any process the trajectory is measured in the
coordinates of the linear interpolation x_t = (1 - t) x0 + t eps (``core.processes.Flow``), where the velocity is
eps_hat - x0_hat: a model of another process is walked on its own ODE and compared in those coordinates, since
(eps_hat, x0_hat) at a point of its trajectory are the same numbers whichever process names its time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.consistency import noise_level
from ..core.predictions import eps_from
from ..core.process import NoiseProcess
from ..core.timesteps import grid_lam, grid_t
from ..samplers import sample_euler, sample_heun

__all__ = ["straightness"]


@torch.no_grad()
def straightness(denoiser, process: NoiseProcess, z: Tensor, *, steps: int = 100, **cond) -> float:
    """S of ``denoiser`` over trajectories from x_T = sigma(t_max) z (the module docstring), per dimension.

    The ODE is walked with Euler on ``steps`` uniform steps in t for a Flow model (t = 1 -> 0), else with Heun on
    ``grid_lam``. Each evaluation's error |(z - x0_end) - (eps_hat - x0_hat)|^2 / dim is placed at the Flow time of
    equal signal-to-noise ratio, tau = s / (1 + s) with s = sigma / alpha, and the integral over tau is the
    trapezoid rule divided by the tau interval covered (evaluations at one tau averaged).
    """
    seen: list = []  # (t, x, x0_hat, alpha, sigma) of every evaluation

    def record(x, t, **c):
        x0_hat = denoiser(x, t, **c)
        seen.append((float(t.flatten()[0]), x, x0_hat, *process.at(t, x)))
        return x0_hat

    flow = float(process.alpha(torch.tensor(process.t_max, dtype=torch.float64))) == 0.0
    x_t = z * process.prior_std
    if flow:
        x0_end = sample_euler(record, process, x_t, grid_t(process, steps, t_end=0.0), final_denoise=False, **cond)
    else:
        x0_end = sample_heun(record, process, x_t, grid_lam(process, steps), **cond)
    errors: dict[float, list[float]] = {}
    for t, x, x0_hat, alpha, sigma in seen:
        s = float(noise_level(process, t))
        tau = 1.0 if s == float("inf") else s / (1 + s)
        err = ((z - x0_end) - (eps_from(x, x0_hat, alpha, sigma) - x0_hat)).pow(2).flatten(1).mean(1).mean()
        errors.setdefault(tau, []).append(float(err))
    taus = sorted(errors)
    vals = [sum(errors[k]) / len(errors[k]) for k in taus]
    if len(taus) == 1:
        return vals[0]
    area = sum((taus[i + 1] - taus[i]) * (vals[i] + vals[i + 1]) / 2 for i in range(len(taus) - 1))
    return area / (taus[-1] - taus[0])
