"""DDRM: denoising diffusion restoration models (Kawar, Elad, Ermon & Song 2022)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.measurements import Measurement
from ..core.predictions import eps_from
from ..core.process import NoiseProcess
from ..samplers import _common
from ._common import observation

__all__ = ["sample_ddrm"]


def sample_ddrm(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    measurement: Measurement,
    *,
    eta: float = 0.85,
    eta_b: float = 1.0,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """DDRM (Kawar et al. 2022, Eqs. 7-8): a DDIM-like step in the spectral space of A = U diag(s) V^T.

    Any linear A (through its thin SVD, ``A.svd()``: closed form for masks, colorization and pooling, dense for
    ``Blur`` and ``Dense``) and any sigma_y >= 0. The paper works with the variance-exploding chain; here that is
    u = x / alpha at the noise level sigma_t := sigma(t) / alpha(t) (the same for every process). In the coordinates
    u_bar = V^T u (R of them, one per singular value s_i > 0), y_bar = diag(1/s) U^T y and the null-space part
    u - V V^T u (the coordinates with s_i = 0, which all follow one rule, so that part is one projection), with
    x0_bar = V^T x0_hat from the denoiser at t and c_i = sigma_y / s_i (y_bar_i's noise level), a step t -> s draws
    (Eq. 8)

        s_i = 0:         u_bar_s = x0_bar + sqrt(1 - eta^2) sigma_s (u_bar_t - x0_bar) / sigma_t + eta sigma_s z
        sigma_s < c_i:   u_bar_s = x0_bar + sqrt(1 - eta^2) sigma_s (y_bar - x0_bar) / c_i + eta sigma_s z
        sigma_s >= c_i:  u_bar_s = (1 - eta_b) x0_bar + eta_b y_bar + sqrt(sigma_s^2 - eta_b^2 c_i^2) z

    and x_s = alpha_s u_s. (u_bar_t - x0_bar) / sigma_t is eps_hat's part, (x_t - alpha_t x0_hat) / sigma_t, finite
    where alpha_t = 0 (Flow at t = 1); (y_bar - x0_bar) / c_i is computed as (U^T y - s x0_bar) / sigma_y, which
    never divides by a small s_i. The start is Eq. 7, N(y_bar, sigma_T^2 - c_i^2) on the range coordinates, drawn
    from the noise of the given x (N(0, sigma(ts[0])^2 I), so u_bar ~ N(0, sigma_T^2)): u_bar <- y_bar + sqrt(1 -
    c_i^2 / sigma_T^2) u_bar, i.e. x_bar <- alpha y_bar + sqrt(1 - (alpha c_i / sigma)^2) x_bar at ts[0] (x itself
    where alpha = 0); coordinates with sigma_T <= c_i and the null space keep their noise (the authors' code treats
    such singular values as zero at the start). The last step (``final_denoise`` with sigma(ts[-1]) > 0, or a step
    that lands on sigma = 0) is Eq. 8 at sigma_s = 0: x0_bar on the null space and where c_i > 0, (1 - eta_b) x0_bar
    + eta_b y_bar where sigma_y = 0. So at sigma_y = 0 and eta_b = 1 every range coordinate is y_bar + sigma_s z at
    every step (the projection of ``sample_projection``) and A x = y exactly at the end.

    Defaults are the paper's, eta = 0.85 and eta_b = 1 (their code's third knob, eta_a of the sigma_s < c_i case, is
    eta, as in the paper), with their 20 steps in mind: eta > 0 adds eta sigma_s of fresh noise whatever the step,
    so its bias does not shrink on a finer grid: on a Gaussian coordinate of variance v with the exact denoiser, a
    step however small changes the variance by -(2 - 2 sqrt(1 - eta^2) - eta^2) v sigma^2 / (v + sigma^2) (-0.22
    v sigma^2 / (v + sigma^2) at eta = 0.85). On a diagonal Gaussian and a mask the unmeasured variance came out
    23-26% low at eta = 0.85 with 400 or 1600 steps, and within its 1% standard error at eta = 0 with 400 (eta = 0 is
    DDIM on the null space, which converges to the probability-flow ODE). Not exact in general: each range
    coordinate sees only its own y_bar_i. At sigma_y = 0 (eta = 0, eta_b = 1) it is exact up to the null-space
    steps' discretization when the prior makes the range and null-space coordinates of A independent (an isotropic
    Gaussian and any A; a diagonal one and a mask).

    Args: as ``samplers.sample_ddim``; measurement: ``Measurement(A, y, sigma_y)``, y of batch 1 or B; eta: 0 <=
        eta <= 1, the noise of the null-space and sigma_s < c_i cases; eta_b: 0 <= eta_b <= 1, the weight of y_bar
        in the sigma_s >= c_i case. x: the start at ts[0], usually ``process.prior_sample``; Eq. 7 reuses its
        noise. callback: called with {"i", "t", "x", "x0_hat", "nfe"} after each step.
    Returns:
        samples shaped like x. NFE = len(ts) - 1, plus 1 for the final step.
    """
    for name, v in (("eta", eta), ("eta_b", eta_b)):
        if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise ValueError(
                f"{name} must be a number in [0, 1] (Kawar et al. 2022, Eq. 8; default 0.85, 1), got {v!r}"
            )
    y = observation(measurement, x, noiseless=None)
    sigma_y = measurement.sigma_y
    svd = measurement.operator.svd()
    x, g = _common.setup(process, x, ts)
    B, shape = x.shape[0], x.shape
    s = svd.s.to(x)
    c = sigma_y / s  # (R,) the noise level of each y_bar coordinate (0 at sigma_y = 0)
    Uty = svd.Ut(y.reshape(B, -1))
    y_bar = Uty / s
    root = math.sqrt(1.0 - eta**2)

    def step(i: int, x: Tensor, x0_hat: Tensor, sig_s: float, z: Tensor | None) -> Tensor:
        """Eq. 8 from ts[i] (flattened x, x0_hat) to u_s at the noise level sig_s (z: the noise, None at 0)."""
        eps_hat = eps_from(x, x0_hat, g.alpha[i], g.sigma[i])  # (u_t - x0_hat) / sigma_t
        x0_bar = svd.Vt(x0_hat)
        null = x0_hat - svd.V(x0_bar)
        if root > 0 and sig_s > 0:  # s_i = 0: the null-space part of eps_hat
            null = torch.add(null, eps_hat - svd.V(svd.Vt(eps_hat)), alpha=root * sig_s)
        low = sig_s >= c  # sigma_s >= c_i (every coordinate at sigma_y = 0)
        bar = torch.lerp(x0_bar, y_bar, eta_b)  # (1 - eta_b) x0_bar + eta_b y_bar; exactly y_bar at eta_b = 1
        if sigma_y > 0:  # sigma_s < c_i
            bar = torch.where(low, bar, torch.add(x0_bar, Uty - s * x0_bar, alpha=root * sig_s / sigma_y))
        if z is not None:
            z_bar = svd.Vt(z)
            null = torch.add(null, z - svd.V(z_bar), alpha=eta * sig_s)  # independent of z_bar (orthogonal parts)
            std = torch.where(low, (sig_s**2 - eta_b**2 * c**2).clamp_min(0.0).sqrt(), eta * sig_s)
            bar = bar + std * z_bar
        return svd.V(bar) + null

    # Eq. 7, in x = alpha u: x_bar <- alpha y_bar + sqrt(1 - (alpha c / sigma)^2) x_bar where sigma > alpha c
    a0, r0 = g.alpha[0], g.alpha[0] / g.sigma[0]
    flat = x.reshape(B, -1)
    x_bar = svd.Vt(flat)
    start = torch.where(1 > r0 * c, a0 * y_bar + (1 - (r0 * c) ** 2).clamp_min(0.0).sqrt() * x_bar, x_bar)
    x = (flat + svd.V(start - x_bar)).reshape(shape)

    nfe = 0
    for i in range(g.n):
        x0_hat = denoiser(x, g.time(i, x), **cond)
        nfe += 1
        a_s = g.alpha[i + 1]
        sig_s = 0.0 if g.lands[i] else g.sigma[i + 1] / a_s
        z = None if g.lands[i] else _common.noise_like(x, generator).reshape(B, -1)
        x = (a_s * step(i, x.reshape(B, -1), x0_hat.reshape(B, -1), sig_s, z)).reshape(shape)
        _common.report(callback, i, g, x, x0_hat, nfe)
    if final_denoise and g.sigma[-1] > 0:
        x0_hat = denoiser(x, g.time(-1, x), **cond)
        x = step(g.n, x.reshape(B, -1), x0_hat.reshape(B, -1), 0.0, None).reshape(shape)
    return x
