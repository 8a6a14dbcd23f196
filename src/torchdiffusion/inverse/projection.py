"""Replacement / projection conditioning (Song et al. 2021, Sec. 5 and Appendix I.2, "imputation")."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.measurements import Measurement
from ..core.process import NoiseProcess
from ..samplers import _common
from ..samplers.ddim import ddim_step
from ._common import observation

__all__ = ["sample_projection"]


def sample_projection(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    measurement: Measurement,
    *,
    eta: float = 1.0,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Unconditional steps, then the measured part of x_s replaced by a draw of the noised observation.

    Song et al. 2021 (Appendix I.2) impute the known dimensions of x_s from q(x_s | x0) at each step; for any
    linear A with SVD A = U diag(s) V^T this replaces the range component of x_s by that of a sample of
    alpha_s x0 + sigma_s z consistent with A x0 = y:

        x_s <- (I - V V^T) x_s + alpha_s A^+ y + sigma_s V V^T z,

    which for a 0/1 mask is x_s <- (1 - mask) x_s + mask (alpha_s y + sigma_s z). The unconditional step is DDIM
    with ``eta`` (1: DDPM's ancestral step). The final x0_hat is projected onto A x = y too. Assumes sigma_y = 0
    (refused otherwise). Not exact in general: the unmeasured part never sees y except through x_s (the known
    "harmonization" gap); exact when the prior factorizes over the range and null space of A.

    Args: as ``samplers.sample_ddim``; measurement: ``Measurement(A, y, 0)``, y of batch 1 or B.
    """
    y = observation(measurement, x, noiseless="sample_projection")
    A = measurement.operator
    svd = A.svd()
    flat = x.shape[0], -1

    def project_range(v: Tensor) -> Tensor:  # V V^T v
        return svd.V(svd.Vt(v.reshape(flat))).reshape(v.shape)

    x0_part = A.pinv(y)  # A^+ y
    x, g = _common.setup(process, x, ts)
    for i in range(g.n):
        x0_hat = denoiser(x, g.time(i, x), **cond)
        x = ddim_step(g, i, x, x0_hat, eta, generator)
        s = i + 1
        z = _common.noise_like(x, generator) if g.sigma[s] > 0 else torch.zeros_like(x)
        x = x - project_range(x) + g.alpha[s] * x0_part + g.sigma[s] * project_range(z)
        _common.report(callback, i, g, x, x0_hat, i + 1)
    if final_denoise and g.sigma[-1] > 0:
        x0_hat = denoiser(x, g.time(-1, x), **cond)
        x = x0_hat - project_range(x0_hat) + x0_part
    return x
