"""Ancestral sampling: draw x_s from the model's reverse step p(x_s | x_t) = q(x_s | x_t, x0_hat)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.process import NoiseProcess
from . import _common

__all__ = ["sample_ddpm"]


def sample_ddpm(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    beta_variance: bool = False,
    eps_form: bool = False,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2; seed 003, "Sampling from DDPM").

    For each pair t > s of ``ts``, x_s ~ q(x_s | x_t, x0 = x0_hat): the posterior of ``NoiseProcess.posterior``
    (Ho et al., Eqs. 6-7), mean c_x x_t + c_0 x0_hat, with the posterior variance (Ho's beta-tilde) or, with
    ``beta_variance``, sigma_ts^2 (Ho's beta_t, the other extreme of the reverse process's entropy; sigma_ts^2 =
    sigma_t^2 - alpha_ts^2 sigma_s^2, alpha_ts = alpha_t / alpha_s).
    ``eps_form``: the same mean as Algorithm 2 writes it, (x_t - sigma_ts^2 / sigma_t eps_hat) / alpha_ts; on the
    grid T, T-1, ..., 1 either is Algorithm 2 exactly. No noise on a step that lands on the data (line 3, z = 0).

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat. process: the noise process.
        x: (B, ...) start, usually ``process.prior_sample``; not modified.
        ts: decreasing times; e.g. ``grid_discrete(process, T)`` or ``grid_t(process, n)``.
        beta_variance: see above. eps_form: see above (divides by alpha_t: refused where it is 0).
        final_denoise: return x0_hat at ts[-1] (``samplers._common``). generator: the only source of noise.
        callback: called with {"i", "t", "x", "x0_hat", "nfe"} after each step.
    Returns:
        samples shaped like x. NFE = len(ts) - 1, plus 1 for the final denoising step.
    """
    if not isinstance(beta_variance, bool):
        raise TypeError(f"beta_variance must be True (Ho's beta_t) or False (the posterior's), got {beta_variance!r}")
    if not isinstance(eps_form, bool):
        raise TypeError(
            f"eps_form must be True (Algorithm 2's eps form) or False (seed 003's x0 form), got {eps_form!r}"
        )
    x, g = _common.setup(process, x, ts)
    t, s = g.ts[:-1], g.ts[1:]
    if eps_form and min(g.alpha[:-1], default=1.0) <= 0:
        raise ValueError("eps_form divides by alpha(t), which is 0 on this grid (e.g. Flow at t = 1); use the default")
    c_x, c_0, var = process.posterior_coeffs(s, t)
    var_ts = process.transition_var(s, t)  # sigma_ts^2
    if beta_variance:  # no noise on a step that lands on the data
        var = torch.where(process.sigma(s) > 0, var_ts, 0.0)
    c_x, c_0, std, var_ts = (v.tolist() for v in (c_x, c_0, var.sqrt(), var_ts))
    for i in range(g.n):
        x0_hat = denoiser(x, g.time(i, x), **cond)
        if eps_form:  # Algorithm 2, line 4
            a_ts = g.alpha[i] / g.alpha[i + 1]
            eps_hat = (x - g.alpha[i] * x0_hat) / g.sigma[i]
            mean = (x - var_ts[i] / g.sigma[i] * eps_hat) / a_ts
        else:  # seed 003: mu_q(x_t, x0_hat)
            mean = torch.add(c_x[i] * x, x0_hat, alpha=c_0[i])
        x = torch.add(mean, _common.noise_like(x, generator), alpha=std[i]) if std[i] > 0 else mean
        _common.report(callback, i, g, x, x0_hat, i + 1)
    return _common.finish(denoiser, g, x, final_denoise, cond)
