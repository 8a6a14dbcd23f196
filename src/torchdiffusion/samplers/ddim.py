"""DDIM: the non-Markovian reverse step of Song, Meng & Ermon 2021, with its stochasticity knob eta."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.process import NoiseProcess
from . import _common

__all__ = ["sample_ddim"]


def sample_ddim(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    eta: float = 0.0,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """DDIM sampling (Song, Meng & Ermon 2021, Eq. 12 with sigma_t(eta) of Eq. 16).

    For each pair t > s of ``ts``, with eps_hat = (x_t - alpha_t x0_hat) / sigma_t and h = lam_s - lam_t:

        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
        c^2 = eta^2 Var[q(x_s | x_t, x0)] = eta^2 sigma_s^2 (1 - e^{-2h})   (Eq. 16 for any process).

    - eta = 0: deterministic; x_s = sigma_s/sigma_t x_t + alpha_s (1 - e^{-h}) x0_hat, the first-order
      exponential integrator of the probability-flow ODE, i.e. DPM-Solver-1 (Lu et al. 2022, Sec. 4.1).
      Order 1; x / alpha depends on the grid only through lam, so VP and VE agree on one lam grid.
    - eta = 1: c^2 is the posterior variance, and the step is DDPM's ancestral step (Ho et al. 2020, Eq. 7)
      with the same noise draws as ``sample_ddpm`` (posterior variance).

    The update (``ddim_step``) is gathered onto x_t and x0_hat: with q = sqrt(sigma_s^2 - c^2) / sigma_s, x_s =
    q sigma_s/sigma_t x_t + alpha_s ((1 - e^{-h}) + e^{-h} (1 - q)) x0_hat + c z, a sum of non-negative parts (no
    cancellation for small h) that stays finite where alpha_t = 0 (Flow at t = 1: e^{-h} = 0).

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat. process: the noise process.
        x: (B, ...) start, usually ``process.prior_sample``; not modified.
        ts: decreasing times (n + 1 for n steps), e.g. ``grid_lam(process, n)``.
        eta: 0 <= eta <= 1, the fraction of the posterior standard deviation injected as noise.
        final_denoise: return x0_hat at ts[-1] (``samplers._common``). generator: the only source of noise.
        callback: called with {"i", "t", "x", "x0_hat", "nfe"} after each step.
    Returns:
        samples shaped like x. NFE = 1 per step, plus 1 for the final denoising step.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (Song et al. 2021, Eq. 16), got {eta}")
    x, g = _common.setup(process, x, ts)
    for i in range(g.n):
        x0_hat = denoiser(x, g.time(i, x), **cond)
        x = ddim_step(g, i, x, x0_hat, eta, generator)
        _common.report(callback, i, g, x, x0_hat, i + 1)
    return _common.finish(denoiser, g, x, final_denoise, cond)


def ddim_step(g: _common.Grid, i: int, x: Tensor, x0_hat: Tensor, eta: float, generator) -> Tensor:
    """One step t_i -> t_{i+1} of ``sample_ddim`` given x0_hat (the restoration samplers reuse it with a corrected
    x0_hat): with q = sqrt(sigma_s^2 - c^2) / sigma_s, x_s = q sigma_s/sigma_t x_t + alpha_s ((1 - e^{-h}) + e^{-h}
    (1 - q)) x0_hat + c z; x0_hat itself on a step that lands on the data."""
    if g.lands[i]:
        return x0_hat
    s, em, omh = i + 1, g.em[i], g.one_minus_em[i]
    one_m_q2 = eta**2 * omh * (1 + em)  # 1 - q^2 = eta^2 (1 - e^{-2h})
    q = math.sqrt(1 - one_m_q2)
    x = torch.add(q * g.sigma[s] / g.sigma[i] * x, x0_hat, alpha=g.alpha[s] * (omh + em * one_m_q2 / (1 + q)))
    if eta > 0:
        x = torch.add(x, _common.noise_like(x, generator), alpha=g.sigma[s] * math.sqrt(one_m_q2))  # c z
    return x
