"""The variational bounds: DDPM's discrete VLB and the continuous ELBO (conventions: ``likelihood``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.process import NoiseProcess, as_time
from ._common import F64, gauss_logp, index_cond
from .dequantize import discretized_gaussian_logp

__all__ = ["vlb_terms", "vlb", "elbo"]

LAM_FLOOR = -15.0  # where lam(t_max) = -inf (Flow), the continuous bound starts at t_from_lam(LAM_FLOOR)


def _kl_prior(process: NoiseProcess, x0: Tensor, t_end: float) -> Tensor:
    """KL(q(x_T | x0) || N(0, sigma(T)^2 I)) for x0 (B, D): the prior term L_T (Ho et al. 2020, Eq. 5)."""
    a, s = (float(c) for c in process.alpha_sigma(as_time(t_end)))
    return 0.5 * (a**2 * x0**2 / s**2).sum(1)  # the variances match: only the mean term is left


def _sq_err_rows(denoiser, process, x0, idx, t, generator, chunk, cond) -> Tensor:
    """||x0 - x0_hat(x_t, t)||^2 (float64) for rows (example idx[i], time t[i]), x_t ~ q(x_t | x0)."""
    out = []
    for lo in range(0, len(idx), chunk):
        i, tc = idx[lo : lo + chunk], t[lo : lo + chunk]
        xs = x0[i]
        xt = process.perturb(xs, tc, torch.randn(xs.shape, generator=generator, device=xs.device, dtype=xs.dtype))
        x0_hat = denoiser(xt, tc.to(xs.dtype), **index_cond(cond, x0.shape[0], i))
        out.append(((xs - x0_hat).flatten(1).to(F64) ** 2).sum(1))
    return torch.cat(out)


def _per_example(contrib: Tensor, B: int, n: int) -> tuple[Tensor, Tensor]:
    """Mean over the n draws of each example (rows are example-major) and its standard error."""
    c = contrib.view(B, n)
    se = c.std(1) / math.sqrt(n) if n > 1 else torch.full((B,), math.nan, dtype=F64, device=c.device)
    return c.mean(1), se


def vlb_terms(
    denoiser,
    process: NoiseProcess,
    x0: Tensor,
    *,
    n_t: int | None = None,
    importance: bool = True,
    decoder: str = "gaussian",
    bins: int = 256,
    chunk: int = 65536,
    generator: torch.Generator | None = None,
    **cond,
) -> dict[str, Tensor]:
    """The terms of DDPM's variational bound (Ho et al. 2020, Eq. 5; seed 003, "ELBO"), each (B,).

    "prior"     L_T = KL(q(x_T | x0) || N(0, sigma_T^2 I)), closed form.
    "diffusion" sum_{t=2..T} L_{t-1}, L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) with one
                x_t ~ q(x_t | x0) per term. The model step is the posterior with x0_hat in place of
                x0 and Ho's fixed variance sigma_t^2 = beta-tilde_t (the posterior variance), so
                L_{t-1} = c_0^2 ||x0 - x0_hat||^2 / (2 beta-tilde_t) = (snr(t-1) - snr(t))/2 ||.||^2
                (Ho et al. 2020, Eq. 8; c_0 the x0-coefficient of the posterior mean, Eq. 7).
                n_t=None sums all T - 1 terms; else n_t draws of t per example, unbiased: with
                probability proportional to lam(t-1) - lam(t) (``importance``, the discrete form of
                uniform log-SNR sampling, Kingma et al. 2021) or uniform on 2..T.
    "decoder"   L_0 = -log p(x0 | x_1), p centred at x0_hat(x_1, 1) with variance sigma_1^2 = beta_1
                (the weight 1/(2 beta_1) of ``objectives.ELBO``): "gaussian" is N(x0_hat, beta_1 I), a density;
                "discretized" is Ho's Eq. 13 for data on ``bins`` levels in [-1, 1], a probability.
    "total"     the sum: -ELBO >= -log p(x0) (a density for "gaussian", a probability mass for
                "discretized"). With n_t >= 2 also "stderr": that of "diffusion" over its n_t
                draws of (t, x_t), the bulk of the Monte-Carlo error (L_0 uses one x_1).

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat. process: a discrete-time process (``Discrete``).
        x0: data (B, ...). chunk: rows (example, t) per denoiser call. cond: per-example tensors
            are indexed along with x0.
    """
    if not process.discrete:
        raise ValueError("vlb_terms needs a discrete-time process (Discrete); use elbo() in continuous time")
    if decoder not in ("gaussian", "discretized"):
        raise ValueError(f"decoder must be 'gaussian' or 'discretized', got {decoder!r}")
    T, (B, dev) = process.n_steps, (x0.shape[0], x0.device)
    flat = x0.flatten(1).to(F64)
    terms = {"prior": _kl_prior(process, flat, float(T))}
    steps = torch.arange(2, T + 1, dtype=F64, device=dev)
    if n_t is None:  # every t = 2..T once per example
        n, t, scale = T - 1, steps.repeat(B), torch.ones((), dtype=F64)
    else:
        n = int(n_t)
        if importance:
            p = process.lam(steps - 1) - process.lam(steps)
            p = p / p.sum()
            k = torch.multinomial(p.to(dev), B * n, replacement=True, generator=generator)
            t, scale = steps[k], 1 / p[k]
        else:
            t = torch.randint(2, T + 1, (B * n,), generator=generator, device=dev).to(F64)
            scale = torch.full_like(t, float(T - 1))
    idx = torch.arange(B, device=dev).repeat_interleave(n)
    contrib = (
        scale * process.elbo_weight(t, t - 1) * _sq_err_rows(denoiser, process, x0, idx, t, generator, chunk, cond)
    )
    if n_t is None:
        terms["diffusion"] = contrib.view(B, n).sum(1)
    else:
        terms["diffusion"], se = _per_example(contrib, B, n)
    # L_0: decoder at t = 1 with variance sigma_1^2 = 1 - alpha_bar_1 = beta_1.
    one = torch.ones(B, dtype=F64, device=dev)
    x1 = process.perturb(x0, one, torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype))
    x0_hat = denoiser(x1, one.to(x0.dtype), **cond).flatten(1).to(F64)
    var1 = float(process.sigma(as_time(1.0))) ** 2
    if decoder == "gaussian":
        terms["decoder"] = -gauss_logp(flat, x0_hat, var1)
    else:
        terms["decoder"] = -discretized_gaussian_logp(flat, x0_hat, math.sqrt(var1), bins)
    terms["total"] = terms["prior"] + terms["diffusion"] + terms["decoder"]
    if n_t is not None and n > 1:
        terms["stderr"] = se
    return terms


def vlb(denoiser, process: NoiseProcess, x0: Tensor, **kwargs) -> Tensor:
    """The negative ELBO of DDPM, -ELBO >= -log p(x0), in nats (B,): ``vlb_terms(...)["total"]``."""
    return vlb_terms(denoiser, process, x0, **kwargs)["total"]


def elbo(
    denoiser,
    process: NoiseProcess,
    x0: Tensor,
    *,
    n_t: int = 8,
    importance: bool = True,
    t_start: float | None = None,
    t_end: float | None = None,
    chunk: int = 65536,
    generator: torch.Generator | None = None,
    return_terms: bool = False,
    **cond,
):
    """Continuous-time ELBO <= log p(x0) (Kingma et al. 2021, Eq. 17-18, in x0 units), per example.

        -ELBO = KL(q(x_T | x0) || N(0, sigma_T^2 I))                                      prior
                + int_{t_start}^{t_end} -snr'(t)/2 E_eps ||x0 - x0_hat(x_t, t)||^2 dt         diffusion
                + E[-log N(x0; x_{t_start} / alpha, (sigma / alpha)^2 I)]                     reconstruction

    with -snr'(t) = alpha^2 g^2 / sigma^4. The reconstruction term does not depend on the model:
    x_{t_start}/alpha - x0 = (sigma/alpha) eps, so it is D/2 (1 + log 2 pi) - D lam(t_start).
    The diffusion integral is estimated with n_t draws per example. ``importance`` (default) draws
    lam uniformly on [lam(t_end), lam(t_start)]: snr = e^{2 lam} gives -snr'(t) dt = -2 snr dlam, so
    the integral is int snr(lam) E||x0 - x0_hat||^2 dlam = int E||eps - eps_hat||^2 dlam, and each
    draw contributes (lam(t_start) - lam(t_end)) snr ||x0 - x0_hat||^2 at t = t_from_lam(lam). Else t
    is uniform and a draw contributes (t_end - t_start) (-snr'(t)/2) ||x0 - x0_hat||^2. Where
    lam(t_end) = -inf (Flow at t = 1) the bound starts at t_end = t_from_lam(LAM_FLOOR), whose
    prior term alpha^2 ||x0||^2 / (2 sigma^2) is about 1e-13 ||x0||^2: a bound for the model whose
    reverse process starts there.

    Returns:
        (elbo (B,), stderr (B,)): stderr of the diffusion estimate (NaN for n_t = 1); with
        ``return_terms`` also a dict of the three losses "prior", "diffusion", "reconstruction".
    """
    if process.discrete:
        raise ValueError("elbo is the continuous-time bound; use vlb()/vlb_terms() on a discrete-time process")
    t0 = process.t_min if t_start is None else float(t_start)
    t1 = process.t_max if t_end is None else float(t_end)
    lam_hi, lam_lo = float(process.lam(as_time(t0))), float(process.lam(as_time(t1)))
    if not math.isfinite(lam_lo):
        t1, lam_lo = float(process.t_from_lam(as_time(LAM_FLOOR))), LAM_FLOOR
    B, dev, D = x0.shape[0], x0.device, x0[0].numel()
    u = torch.rand(B * n_t, generator=generator, device=dev, dtype=F64)
    if importance:  # the weight -snr'(t)/2 dt = snr dlam over the density 1 / (lam_hi - lam_lo) of lam
        lam = lam_lo + (lam_hi - lam_lo) * u
        t, w = process.t_from_lam(lam), (lam_hi - lam_lo) * torch.exp(2 * lam)
    else:  # the weight over the density 1 / (t1 - t0) of t
        t = t0 + (t1 - t0) * u
        w = (t1 - t0) * process.elbo_weight(t)
    idx = torch.arange(B, device=dev).repeat_interleave(n_t)
    diffusion, se = _per_example(w * _sq_err_rows(denoiser, process, x0, idx, t, generator, chunk, cond), B, n_t)
    terms = {
        "prior": _kl_prior(process, x0.flatten(1).to(F64), t1),
        "diffusion": diffusion,
        "reconstruction": torch.full((B,), D / 2 * (1 + math.log(2 * math.pi)) - D * lam_hi, dtype=F64, device=dev),
    }
    est = -(terms["prior"] + terms["diffusion"] + terms["reconstruction"])
    return (est, se, terms) if return_terms else (est, se)
