"""Discrete data under a continuous density: dequantization and bits per dimension.

Units and signs are those of ``likelihood`` (nats per example, summed over D numbers). For 8-bit
data x in {0, ..., 255}^D the model density p_z lives on

    y = (x + u) / 256 in [0, 1)^D,     z = 2 y - 1 = (x + u) / 128 - 1 in [-1, 1)^D,

with u in [0, 1)^D. The probability of the cell of x is P(x) = int_cell p_z(z) dz, and
changing variables from u to z (dz/du = 1/128 per dim) gives, for any density q(u | x) on the
unit cube (Theis et al. 2016; Ho et al. 2019, Flow++, Eq. 11-12):

    log P(x) = log E_q[p_z(z) 128^{-D} / q(u | x)] >= E_q[log p_z(z) - D log 128 - log q(u | x)].

Uniform dequantization (q = 1) gives -log P(x) <= -E_u[log p_z(z)] + D log 128, i.e. in bits per
dimension bpd = -E_u[log p_z(z)] / (D ln 2) + 7; equivalently log p_y(y) = log p_z(z) + D log 2 and
-log P(x) <= -E_u[log p_y(y)] + D log 256. Since P(x) <= 1, the true -log P(x) is >= 0, so bpd of
8-bit data cannot go negative under this convention, however sharp p_z is; a continuous density
evaluated at the data without dequantization can exceed 1 and give a meaningless negative bpd.

Ho et al. 2020 instead score pixels k / 127.5 - 1 with a discretized decoder (``discretized_gaussian_logp``,
used by ``likelihood.vlb_terms``), which returns a probability already: no dequantization there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["bits_per_dim", "dequantize", "nll_8bit", "discretized_gaussian_logp"]

F64 = torch.float64


def bits_per_dim(nll_nats: Tensor | float, dim: int, *, scale: float = 1.0) -> Tensor | float:
    """Bits per dimension of a negative log-likelihood in nats: nll / (D ln 2).

    Args:
        nll_nats: -log p per example (nats), of the data z the model sees.
        dim: D, the number of data dimensions of an example.
        scale: where the model sees z = scale * y + shift of the data y the bpd is reported for,
            -log p_y(y) = -log p_z(z) - D log|scale| (the change of variables, applied here).
    """
    return (nll_nats - dim * math.log(abs(scale))) / (dim * math.log(2))


def dequantize(
    x: Tensor, generator: torch.Generator | None = None, *, variational=None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Dequantize 8-bit data: z = (x + u) / 128 - 1 and the per-example log correction (B,).

    ``log P(x) >= E[log p_z(z) + correction]`` (module docstring), with correction =
    -D log 128 - log q(u | x). Uniform u ~ U[0, 1)^D by default; ``variational(x, generator) ->
    (u, log_q)`` (u in [0, 1) shaped like x, log_q (B,) its log-density) plugs in a learned q
    (variational dequantization, Ho et al. 2019, Sec. 3.1).

    Args:
        x: integers in 0..255 (any dtype), (B, ...).
    """
    x = x.to(torch.float64)
    if bool(((x < 0) | (x > 255) | (x != x.round())).any()):
        raise ValueError("dequantize expects integer pixel values in 0..255")
    D = x[0].numel()
    if variational is None:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        log_q = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    else:
        u, log_q = variational(x, generator)
        u, log_q = u.to(torch.float64), log_q.to(torch.float64)
    z = (x + u) / 128 - 1
    return z.to(dtype), -D * math.log(128) - log_q


def nll_8bit(
    logp_fn,
    x: Tensor,
    *,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    variational=None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Upper bound on -log P(x) for 8-bit data x (B, ...) in nats: -E_q[log p_z(z) + correction].

    Args:
        logp_fn: z (B, ...) -> log p_z(z) (B,), e.g. ``lambda z: log_likelihood(den, process, z)``;
            a function returning a tuple (``elbo``) is read by its first element. A lower bound
            or an unbiased estimate of log p_z keeps the result an upper bound in expectation.
        n_samples: dequantization draws per example.
        variational: see ``dequantize``.
    Returns:
        (nll (B,), stderr (B,)) over the draws (stderr NaN for one draw). Bits per dim:
        ``bits_per_dim(nll, D)``.
    """
    draws = []
    for _ in range(n_samples):
        z, corr = dequantize(x, generator, variational=variational, dtype=dtype)
        logp = logp_fn(z)
        logp = logp[0] if isinstance(logp, tuple) else logp
        draws.append(-(logp.to(torch.float64) + corr))
    d = torch.stack(draws, 1)
    se = d.std(1) / math.sqrt(n_samples) if n_samples > 1 else torch.full_like(d[:, 0], math.nan)
    return d.mean(1), se


def discretized_gaussian_logp(x0: Tensor, mean: Tensor, std, bins: int = 256) -> Tensor:
    """log P(x0) of Ho et al. 2020's discretized Gaussian decoder (Eq. 13), summed over dims (B,).

    x0 holds bin centres -1 + 2k / (bins - 1), k = 0..bins-1 (8-bit pixels k / 127.5 - 1). Each
    bin is [x0 - 1/(bins-1), x0 + 1/(bins-1)], the outermost extended to -inf and +inf, so the
    probabilities of all bins sum to 1. Computed as Phi differences in log space (no clamping).
    """
    x0, mean = x0.flatten(1).to(F64), mean.flatten(1).to(F64)
    half = 1.0 / (bins - 1)
    # Reflect so that z = -|x0 - mean| <= 0: Phi((z -+ half)/std) are then lower-tail values, which log_ndtr
    # gives accurately, and their difference never cancels between two numbers near 1.
    flip = x0 - mean > 0
    z = torch.where(flip, mean - x0, x0 - mean)
    lo_inf = torch.where(flip, x0 > 1 - half, x0 < -1 + half)  # the edge bin's open side
    hi_inf = torch.where(flip, x0 < -1 + half, x0 > 1 - half)
    log_hi = torch.where(hi_inf, 0.0, torch.special.log_ndtr((z + half) / std))
    log_lo = torch.where(lo_inf, -math.inf, torch.special.log_ndtr((z - half) / std))
    return (log_hi + torch.log1p(-torch.exp(log_lo - log_hi))).sum(1)
