"""The consistency function's parameterization: f(x_t, t) with the boundary condition f(x, t_min) = x / alpha(t_min).

A consistency function maps every point of a probability-flow ODE trajectory to the trajectory's point at the
smallest time t_min (Song et al. 2023, Sec. 3, Eq. 4 and Definition 1). In the scaled coordinates of any
process, x~ = x / alpha and noise level s = sigma / alpha (the equivalent alpha = 1 process; Karras et al.
2022, Sec. 4), the network's output is mixed with its input as

    f(x_t, t) = c_skip(s) x~ + c_out(s) F(c_in x_t, c_noise),
    c_skip(s) = sigma_data^2 / ((s - s_min)^2 + sigma_data^2),
    c_out(s) = sigma_data (s - s_min) / sqrt(sigma_data^2 + s^2)

(Song et al. 2023, Eq. 7 and Appendix C, with s_min = the noise level at t_min: c_skip(s_min) = 1 and
c_out(s_min) = 0, so f(x, t_min) = x~ for every network F). The input scaling c_in and the time input c_noise
are those of ``denoiser.Preconditioned`` (``network_inputs``). Written with alpha and sigma rather than s, the
two factors stay finite where alpha = 0 (Flow at t = 1): c_skip(s) x~ = sigma_data^2 alpha x / ((sigma -
alpha s_min)^2 + alpha^2 sigma_data^2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .denoiser import network_inputs
from .process import NoiseProcess, as_time, batch_time

__all__ = ["ConsistencyModel", "consistency_scalings", "noise_level"]


def noise_level(process: NoiseProcess, t) -> Tensor:
    """s(t) = sigma(t) / alpha(t) = exp(-lam(t)), the noise level of the equivalent alpha = 1 process (float64)."""
    alpha, sigma = process.alpha_sigma(as_time(t))
    return sigma / alpha


def consistency_scalings(
    alpha: Tensor, sigma: Tensor, sigma_data: float, s_min: float, at_min: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(c_skip_x, c_out) with f = c_skip_x x_t + c_out F: c_skip_x = c_skip(s) / alpha, c_out(s) (the module's
    formulas, Song et al. 2023, Appendix C). ``at_min`` (bool, broadcast like alpha) marks t = t_min, where the two
    are set to 1 / alpha and 0 exactly: the boundary condition holds bit for bit, not up to rounding of s_min."""
    d = sigma - alpha * s_min  # alpha (s - s_min)
    c_skip_x = sigma_data**2 * alpha / (d**2 + alpha**2 * sigma_data**2)
    c_out = sigma_data * d / torch.sqrt(alpha**2 * sigma_data**2 + sigma**2)
    if at_min is not None:
        c_skip_x = torch.where(at_min, 1 / alpha, c_skip_x)
        c_out = torch.where(at_min, torch.zeros_like(c_out), c_out)
    return c_skip_x, c_out


class ConsistencyModel(nn.Module):
    """A raw network ``net(c_in x, c_noise, **cond)`` as a consistency function f(x_t, t, **cond) -> x_{t_min} / alpha.

    Callable like a denoiser (x (B, ...), t (B,)), and it returns an estimate of the data, but it is not the
    posterior mean: it is the end of the probability-flow ODE started at (x_t, t), so one call is a sample.
    Sample with ``samplers.consistency.sample_consistency``; train with ``objectives.consistency``.

    Args:
        net: the raw network (``nets``), as ``Preconditioned`` would take it.
        process: the noise process; every process with alpha(t_min) > 0.
        sigma_data: the data's standard deviation (c_skip, c_out and c_in).
        t_min: the boundary time (Song et al. 2023's epsilon); default ``process.t_min``. s_min = sigma / alpha
            there must be finite (alpha(t_min) > 0).
    """

    def __init__(self, net: nn.Module, process: NoiseProcess, sigma_data: float = 1.0, t_min: float | None = None):
        super().__init__()
        self.net, self.process, self.sigma_data = net, process, float(sigma_data)
        self.t_min = float(process.t_min if t_min is None else t_min)
        self.s_min = float(noise_level(process, self.t_min))
        if not self.s_min >= 0 or self.s_min == float("inf"):
            raise ValueError(f"the boundary time t_min={self.t_min} needs alpha(t_min) > 0; got s_min={self.s_min}")

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        t = batch_time(t, x)
        alpha, sigma = self.process.at(t, x)
        c_in, c_noise = network_inputs(alpha, sigma, self.sigma_data)
        at_min = (t <= self.t_min).view(-1, *[1] * (x.ndim - 1))
        c_skip_x, c_out = consistency_scalings(alpha, sigma, self.sigma_data, self.s_min, at_min)
        return c_skip_x * x + c_out * self.net(c_in * x, c_noise, **cond)

    def extra_repr(self) -> str:
        return f"t_min={self.t_min}, s_min={self.s_min:.4g}, sigma_data={self.sigma_data}"
