"""DPS: diffusion posterior sampling (Chung et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.measurements import Measurement
from ..core.process import NoiseProcess
from ..samplers import _common
from ..samplers.ddim import ddim_step
from ._common import observation

__all__ = ["sample_dps"]


def sample_dps(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    measurement: Measurement,
    *,
    zeta: float = 1.0,
    eta: float = 1.0,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Chung et al. 2023, Algorithm 1 (Gaussian noise): an ancestral step, then a gradient step on the residual of
    the denoised estimate,

        x_s' = DDPM step (x_t, x0_hat(x_t)),    x_s = x_s' - zeta_t grad_{x_t} ||y - A x0_hat(x_t)||^2,
        zeta_t = zeta / ||y - A x0_hat(x_t)||       (their Appendix C: the step normalized by the residual).

    It approximates p_t(y | x_t) by N(y; A x0_hat(x_t), .), so the gradient flows through the denoiser (one
    backward pass per step). The normalization is per example (azula normalizes over the whole batch, which makes
    the step shrink as the batch grows). Any linear A and any sigma_y >= 0; not exact: the residual is pulled
    towards 0 whatever sigma_y is, and the samples are biased towards the posterior's modes. The normalized step
    moves x_t by about 2 zeta |d x0_hat / d x_t| whatever the residual's size: zeta = 1 suits images (thousands of
    measured numbers); with a few measured numbers it overshoots (a 2-D mask: the measured coordinate's spread
    1.1 at zeta = 1 against 0.08 at zeta = 0.1), so scale zeta down for small measurements.

    Args: as ``samplers.sample_ddim``; measurement: ``Measurement(A, y, sigma_y)``; zeta: the step scale zeta'
        (their 1.0 for most tasks); eta: of the ancestral step (1: DDPM's, as in Algorithm 1).
    """
    if not zeta >= 0:
        raise ValueError(f"zeta must be >= 0, got {zeta}")
    y = observation(measurement, x, noiseless=None)
    A = measurement.operator
    x, g = _common.setup(process, x, ts)
    x = x.detach()
    nfe = 0
    for i in range(g.n):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0_hat = denoiser(xg, g.time(i, xg), **cond)
            residual = (y - A(x0_hat)).flatten(1).norm(dim=1)  # (B,)
            (grad,) = torch.autograd.grad((residual**2).sum(), xg)
        nfe += 1
        x0_hat = x0_hat.detach()
        step = (zeta / residual.detach().clamp_min(torch.finfo(x.dtype).tiny)).reshape(-1, *[1] * (x.ndim - 1))
        x = ddim_step(g, i, x, x0_hat, eta, generator)
        if not g.lands[i]:
            x = x - step * grad
        _common.report(callback, i, g, x, x0_hat, nfe)
    return _common.finish(denoiser, g, x, final_denoise, cond)
