"""DDIM: the non-Markovian reverse step of Song, Meng & Ermon 2021, with its stochasticity knob eta."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.process import NoiseProcess
from . import _loop

__all__ = ["sample_ddim"]


def ddim_coeffs(process: NoiseProcess, ts: Tensor, eta: float) -> tuple[list[float], list[float], list[float]]:
    """Float64 (c_x, c_0, c_z) per step of ``ts``: x_s = c_x x_t + c_0 x0_hat + c_z z (see ``sample_ddim``).

    With q = sqrt(1 - eta^2 (1 - e^{-2h})) = sqrt(sigma_s^2 - c^2) / sigma_s, every term is a sum of
    non-negative parts (no cancellation for small h):

        c_x = q sigma_s / sigma_t,  c_0 = alpha_s ((1 - e^{-h}) + e^{-h} (1 - q)),  c_z = eta sigma_s sqrt(1 - e^{-2h})

    e^{-h} = sigma_s alpha_t / (alpha_s sigma_t) comes from the curves themselves, so alpha_t = 0 (lam_t = -inf,
    Flow at t = 1) gives e^{-h} = 0 and the finite step x_s = q sigma_s/sigma_t x_t + alpha_s x0_hat + c_z z.
    """
    a, sg, lam = process.alpha(ts).tolist(), process.sigma(ts).tolist(), process.lam(ts).tolist()
    c_x, c_0, c_z = [], [], []
    for i in range(len(ts) - 1):
        if sg[i + 1] == 0.0:  # lands on the data: x_s = x0_hat (``_loop.lands_on_data``)
            c_x.append(0.0), c_0.append(1.0), c_z.append(0.0)
            continue
        h = lam[i + 1] - lam[i]
        em = sg[i + 1] * a[i] / (a[i + 1] * sg[i])  # e^{-h}
        one_m_em = -math.expm1(-h) if math.isfinite(h) else 1.0  # 1 - e^{-h}
        one_m_em2 = -math.expm1(-2 * h) if math.isfinite(h) else 1.0  # 1 - e^{-2h}
        q2 = 1.0 - eta**2 * one_m_em2
        q = math.sqrt(q2)
        c_x.append(q * sg[i + 1] / sg[i])
        c_0.append(a[i + 1] * (one_m_em + em * (1.0 - q2) / (1.0 + q)))
        c_z.append(eta * sg[i + 1] * math.sqrt(one_m_em2))
    return c_x, c_0, c_z


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
      with the same noise draws as ``sample_ddpm(variance="posterior")``.

    Computed in the x0 form (``ddim_coeffs``), which stays finite where alpha_t = 0 (Flow at t = 1).

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat.
        process: the noise process.
        x: (B, ...) start, usually ``process.prior_sample``; not modified.
        ts: decreasing times (n + 1 for n steps), e.g. ``grid_lam(process, n)``.
        eta: 0 <= eta <= 1, the fraction of the posterior standard deviation injected as noise.
        final_denoise: return x0_hat at ts[-1] (see ``samplers._loop``).
        generator: the only source of noise (used only when eta > 0).
        callback: called with {"i", "t", "x", "x0_hat", "nfe"} after each step.
    Returns:
        samples shaped like x. NFE = 1 per step, plus 1 for the final denoising step.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (Song et al. 2021, Eq. 16), got {eta}")
    x, ts = _loop.prepare(x, ts)
    c_x, c_0, c_z = ddim_coeffs(process, ts, float(eta))
    lands = [_loop.lands_on_data(process, s) for s in ts[1:]]
    for i in range(len(ts) - 1):
        x0_hat = denoiser(x, _loop.batch_t(ts[i], x), **cond)
        if lands[i]:
            x = x0_hat
        else:
            x = c_x[i] * x + c_0[i] * x0_hat
            if c_z[i] > 0:
                x = x + c_z[i] * _loop.noise_like(x, generator)
        _loop.report(callback, i, ts[i], x, x0_hat, i + 1)
    return _loop.finish(denoiser, process, x, ts[-1], final_denoise, cond)
