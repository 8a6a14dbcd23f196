"""Ancestral sampling: draw x_s from the model's reverse step p(x_s | x_t) = q(x_s | x_t, x0_hat)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..parameterization import eps_from_x0
from ..process import NoiseProcess, append_dims
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
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0_hat = denoiser(x, _loop.batch_t(t, x), **cond)
        c_x, c_0, var = process.posterior_coeffs(s, t)
        if variance == "beta":
            var = process.transition_var(s, t)
        if form == "x0":
            mean = c_x.to(x) * x + c_0.to(x) * x0_hat
        else:
            a_ts = process.alpha(t) / process.alpha(s)
            eps_hat = eps_from_x0(process, x, _loop.batch_t(t, x), x0_hat)
            k = (process.transition_var(s, t) / process.sigma(t)).to(x)
            mean = (x - k * eps_hat) / a_ts.to(x)
        # No noise is added on a step that lands on sigma = 0 (the data): Algorithm 2, line 3.
        x = mean + append_dims(var.sqrt().to(x), x.ndim) * _loop.noise_like(x, generator)
        _loop.report(callback, i, t, x, x0_hat, i + 1)
    return _loop.finish(denoiser, process, x, ts[-1], final_denoise, cond)
