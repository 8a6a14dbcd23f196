"""Ancestral sampling: draw x_s from the model's reverse step p(x_s | x_t) = q(x_s | x_t, x0_hat)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.process import NoiseProcess
from . import _loop

__all__ = ["sample_ddpm"]

VARIANCES = ("posterior", "beta")
FORMS = ("x0", "eps")


def sample_ddpm(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    variance: str = "posterior",
    form: str = "x0",
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2; seed 003, "Sampling from DDPM").

    For each pair t > s of ``ts``, with alpha_ts = alpha_t/alpha_s and
    sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2:

    - form "x0" (seed 003):  x_s = alpha_ts sigma_s^2/sigma_t^2 x_t + alpha_s sigma_ts^2/sigma_t^2 x0_hat + std z
    - form "eps" (Ho et al., Algorithm 2): x_s = (x_t - sigma_ts^2 / sigma_t eps_hat) / alpha_ts + std z

    The two are the same map; on the grid T, T-1, ..., 1 they are Algorithm 2 exactly.

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat.
        process: the noise process.
        x: (B, ...) start, usually ``process.prior_sample``; not modified.
        ts: decreasing times; e.g. ``grid_discrete(process, T)`` or ``grid_t(process, n)``.
        variance: "posterior" (sigma_q^2, Ho's beta-tilde) or "beta" (sigma_ts^2, Ho's beta_t).
        form: "x0" or "eps", see above.
        final_denoise: return x0_hat at ts[-1] (see ``samplers._loop``).
        generator: the only source of noise.
        callback: called with {"i", "t", "x", "x0_hat", "nfe"} after each step.
    Returns:
        samples shaped like x. NFE = len(ts) - 1, plus 1 for the final denoising step.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {list(VARIANCES)}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {list(FORMS)}")
    x, ts = _loop.prepare(x, ts)
    t, s = ts[:-1], ts[1:]
    # All coefficients for the whole grid at once, in float64, then as Python floats: the
    # loop itself does only tensor arithmetic on x (this is what keeps per-step overhead low).
    c_x, c_0, var = process.posterior_coeffs(s, t)
    if variance == "beta":
        # Ho et al.'s sigma_t^2 = beta_t, but no noise on a step that lands on the data (z = 0 at t = 1).
        var = torch.where(process.sigma(s) > 0, process.transition_var(s, t), 0.0)
    if form == "eps" and not bool((process.alpha(t) > 0).all()):
        raise ValueError("form='eps' divides by alpha(t), which is 0 on this grid (e.g. Flow at t = 1); use form='x0'")
    a_t, s_t = process.alpha(t), process.sigma(t)
    a_ts, k = a_t / process.alpha(s), process.transition_var(s, t) / s_t
    c_x, c_0, std, a_t, s_t, a_ts, k = (v.tolist() for v in (c_x, c_0, var.sqrt(), a_t, s_t, a_ts, k))
    t_in = ts.to(x.dtype)
    for i in range(len(ts) - 1):
        x0_hat = denoiser(x, t_in[i].expand(x.shape[0]), **cond)
        if form == "x0":
            mean = c_x[i] * x + c_0[i] * x0_hat
        else:
            eps_hat = (x - a_t[i] * x0_hat) / s_t[i]
            mean = (x - k[i] * eps_hat) / a_ts[i]
        # No noise on a step that lands on sigma = 0 (the data): Algorithm 2, line 3.
        x = mean + std[i] * _loop.noise_like(x, generator) if std[i] > 0 else mean
        _loop.report(callback, i, ts[i], x, x0_hat, i + 1)
    return _loop.finish(denoiser, process, x, ts[-1], final_denoise, cond)
