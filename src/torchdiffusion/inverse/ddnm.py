"""DDNM: denoising diffusion null-space model (Wang et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.measurements import Measurement
from ..core.process import NoiseProcess
from ..samplers import _common
from ..samplers.ddim import ddim_step
from ._common import observation

__all__ = ["sample_ddnm"]


def sample_ddnm(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    measurement: Measurement,
    *,
    eta: float = 0.85,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """DDIM with x0_hat corrected by the range-null space decomposition (Wang et al. 2023, Eq. 13, Algorithm 1).

    x = A^+ A x + (I - A^+ A) x: the range part of a solution is fixed by y, the null-space part is free. Each
    step replaces x0_hat's range part by A^+ y,

        x0_hat <- x0_hat - A^+ (A x0_hat - y),

    and takes the DDIM step (eta; the paper's default 0.85) with it; the final x0_hat is corrected the same way, so
    A x = y holds exactly. Assumes sigma_y = 0 (refused otherwise; the paper's DDNM+ scales the correction for
    noisy y).

    Args: as ``samplers.sample_ddim``; measurement: ``Measurement(A, y, 0)``, y of batch 1 or B.
    """
    y = observation(measurement, x, noiseless="sample_ddnm")
    A = measurement.operator

    def correct(x0_hat: Tensor) -> Tensor:
        return x0_hat - A.pinv(A(x0_hat) - y)

    x, g = _common.setup(process, x, ts)
    for i in range(g.n):
        x0_hat = correct(denoiser(x, g.time(i, x), **cond))
        x = ddim_step(g, i, x, x0_hat, eta, generator)
        _common.report(callback, i, g, x, x0_hat, i + 1)
    if final_denoise and g.sigma[-1] > 0:
        x = correct(denoiser(x, g.time(-1, x), **cond))
    return x
