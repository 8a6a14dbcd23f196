"""PiGDM: pseudo-inverse guided diffusion models (Song, Vahdat, Mardani & Kautz 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.measurements import Measurement
from ..core.predictions import gaussian_x0_variance, x0_shift
from ..core.process import NoiseProcess
from ..samplers import _common
from ..samplers.ddim import ddim_step
from ._common import observation

__all__ = ["sample_pigdm"]


def sample_pigdm(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    measurement: Measurement,
    *,
    eta: float = 0.0,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Song et al. 2023 (Eqs. 5-8): p(x0 | x_t) ~ N(x0_hat, r_t^2 I) makes p_t(y | x_t) ~ N(A x0_hat, r_t^2 A A^T +
    sigma_y^2 I), whose score is the vector-Jacobian product

        g = (d x0_hat / d x_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat),
        r_t^2 = sigma_t^2 / (alpha_t^2 + sigma_t^2)

    (their choice of r_t for data of unit variance, in the noise level sigma/alpha of x/alpha). The guided score
    score + g is turned back into x0_hat by Tweedie's formula, x0_hat + sigma_t^2 / alpha_t g, and a DDIM step with
    ``eta`` follows. The inverse acts through A's SVD (A A^T = U diag(s^2) U^T), so it is cheap for masks,
    colorization and pooling and dense otherwise. Any linear A and sigma_y >= 0; not exact (the Gaussian
    approximation of p(x0 | x_t)).

    Args: as ``samplers.sample_ddim``; measurement: ``Measurement(A, y, sigma_y)``.
    """
    y = observation(measurement, x, noiseless=None)
    A, sigma_y = measurement.operator, measurement.sigma_y
    svd = A.svd()
    x, g = _common.setup(process, x, ts)
    x = x.detach()
    B = x.shape[0]
    nfe = 0
    for i in range(g.n):
        a, sig = g.alpha[i], g.sigma[i]
        r2 = gaussian_x0_variance(a, sig)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0_hat = denoiser(xg, g.time(i, xg), **cond)
            resid = (y - A(x0_hat.detach())).reshape(B, -1)
            w = svd.Ut(resid) / (r2 * svd.s.to(resid) ** 2 + sigma_y**2)  # (r^2 A A^T + sigma_y^2 I)^{-1} on range
            v = A.adjoint(svd.U(w).reshape(y.shape))
            (guide,) = torch.autograd.grad(x0_hat, xg, grad_outputs=v)
        nfe += 1
        x0_hat = x0_hat.detach()
        if a > 0 and not g.lands[i]:
            x0_hat = x0_hat + x0_shift(guide, a, sig)
        x = ddim_step(g, i, x, x0_hat, eta, generator)
        _common.report(callback, i, g, x, x0_hat, nfe)
    return _common.finish(denoiser, g, x, final_denoise, cond)
