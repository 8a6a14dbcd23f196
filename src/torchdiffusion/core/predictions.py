"""Conversions among the things a network can predict, and the denoiser they all become.

With x = alpha x0 + sigma eps (seed 003; Tweedie's formula for the score):

    eps   = (x - alpha x0) / sigma
    score = grad log p_t(x) = (alpha x0_hat - x) / sigma^2 = -eps_hat / sigma
    v     = alpha eps - sigma x0                (Salimans & Ho 2022, Eq. in Appendix D)
            x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)
    u     = dx/dt = alpha' x0 + sigma' eps      (flow velocity; for Flow, u = eps - x0)
            x0 = (sigma' x - sigma u) / (sigma' alpha - sigma alpha')

The currency between models and samplers is the denoiser ``D(x, t, **cond) -> x0_hat``;
``as_denoiser`` turns a network predicting any of the above into one, once.

Networks train best when their output, like their input, has unit scale whatever the noise level
(Karras et al. 2022, Sec. 5). The raw targets do not: score = -eps / sigma grows without bound as
sigma -> 0, v and the flow velocity grow with sigma on VE and EDM, and x0 has no skip connection at
all (eps, v, score and flow give x0_hat = c(t) x + c'(t) out with c' -> 0 as sigma -> 0, while an x0
network must learn the identity map at low noise, where an error e in x0_hat is a score error
e alpha / sigma^2). ``Preconditioned(..., predicts=...)`` therefore also scales the output
(``output_scalings``: EDM's c_skip and c_out for x0, the target's standard deviation for the
others), and ``losses`` weight its raw output F as EDM does (Eq. 8).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .process import NoiseProcess, _as_t, append_dims

__all__ = [
    "PREDICTIONS",
    "x0_to",
    "to_x0",
    "score_from_x0",
    "eps_from_x0",
    "x0_error_scale",
    "output_scalings",
]

PREDICTIONS = ("eps", "x0", "v", "score", "flow")


def _check(predicts: str) -> None:
    if predicts not in PREDICTIONS:
        raise ValueError(f"unknown prediction target {predicts!r}; choose one of {list(PREDICTIONS)}")


def _coeffs(process: NoiseProcess, t: Tensor, x: Tensor, *names: str) -> list[Tensor]:
    """Process coefficients at t (float64), broadcast against x and cast to its dtype."""
    t = _as_t(t)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return [append_dims(getattr(process, n)(t), x.ndim).to(x) for n in names]


def _alpha_sigma(process: NoiseProcess, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """alpha(t), sigma(t) in one call, broadcast against x and cast to its dtype."""
    t = _as_t(t)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    a, s = process.alpha_sigma(t)
    return append_dims(a, x.ndim).to(x), append_dims(s, x.ndim).to(x)


def _batch(t, x: Tensor) -> Tensor:
    """Times as a float64 (B,) tensor on x's device."""
    t = _as_t(t).to(x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def x0_to(predicts: str, process: NoiseProcess, x: Tensor, t: Tensor, x0: Tensor, eps: Tensor | None = None):
    """The target of ``predicts`` given x_t, x0 (and eps, else inferred as (x - alpha x0)/sigma)."""
    _check(predicts)
    if predicts == "x0":
        return x0
    alpha, sigma = _alpha_sigma(process, t, x)
    if eps is None:
        eps = (x - alpha * x0) / sigma
    if predicts == "eps":
        return eps
    if predicts == "score":
        return -eps / sigma
    if predicts == "v":
        return alpha * eps - sigma * x0
    d_alpha, d_sigma = _coeffs(process, t, x, "d_alpha", "d_sigma")
    return d_alpha * x0 + d_sigma * eps  # flow velocity u = dx_t/dt


def to_x0(predicts: str, process: NoiseProcess, x: Tensor, t: Tensor, out: Tensor, alpha_sigma=None) -> Tensor:
    """x0_hat from a prediction ``out`` of kind ``predicts`` at (x, t); the inverse of ``x0_to``.

    ``alpha_sigma``: the pair (alpha, sigma) already broadcast against x, when the caller has it.
    """
    _check(predicts)
    if predicts == "x0":
        return out
    alpha, sigma = alpha_sigma if alpha_sigma is not None else _alpha_sigma(process, t, x)
    if predicts == "eps":
        return (x - sigma * out) / alpha
    if predicts == "score":
        return (x + sigma**2 * out) / alpha  # Tweedie's formula
    if predicts == "v":
        return (alpha * x - sigma * out) / (alpha**2 + sigma**2)
    d_alpha, d_sigma = _coeffs(process, t, x, "d_alpha", "d_sigma")
    return (d_sigma * x - sigma * out) / (d_sigma * alpha - sigma * d_alpha)


def eps_from_x0(process: NoiseProcess, x: Tensor, t: Tensor, x0_hat: Tensor) -> Tensor:
    """eps_hat = (x - alpha x0_hat) / sigma."""
    return x0_to("eps", process, x, t, x0_hat)


def score_from_x0(process: NoiseProcess, x: Tensor, t: Tensor, x0_hat: Tensor) -> Tensor:
    """Tweedie: grad log p_t(x) = (alpha x0_hat - x) / sigma^2 (seed 003, "Tweedie's formula")."""
    return x0_to("score", process, x, t, x0_hat)


def x0_error_scale(predicts: str, process: NoiseProcess, t: Tensor) -> Tensor:
    """(d x0 / d out)^2: |x0_hat - x0|^2 = scale * |out - target|^2 at time t (float64, shape of t).

    Used to express every loss weighting in x0 units (seed 003, "Final objective function").
    """
    _check(predicts)
    t = _as_t(t)
    alpha, sigma = process.alpha(t), process.sigma(t)
    if predicts == "x0":
        return torch.ones_like(t)
    if predicts == "eps":
        return (sigma / alpha) ** 2
    if predicts == "score":
        return (sigma**2 / alpha) ** 2
    if predicts == "v":
        return (sigma / (alpha**2 + sigma**2)) ** 2
    return (sigma / (process.d_sigma(t) * alpha - sigma * process.d_alpha(t))) ** 2


def output_scalings(
    predicts: str, process: NoiseProcess, t: Tensor, x: Tensor, sigma_data: float, alpha_sigma=None
) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out), broadcast against x, of ``predicts`` = c_skip x + c_out F for a raw network F whose
    target has unit variance when x0 has variance sigma_data^2 (Karras et al. 2022, Eq. 7 and Sec. 5).

    x0 (EDM's preconditioning, Table 1): for alpha = 1, c_skip = sigma_data^2 / (sigma^2 + sigma_data^2) and
    c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2), the skip that amplifies F's error least (their
    Appendix B.6). For alpha != 1 the same holds for x / alpha = x0 + (sigma / alpha) eps (their Eq. 4,
    s(t) = alpha): put sigma / alpha for sigma and x / alpha for x, and

        c_skip = alpha sigma_data^2 / (alpha^2 sigma_data^2 + sigma^2),
        c_out  = sigma sigma_data / sqrt(alpha^2 sigma_data^2 + sigma^2);

    F's target (x0 - c_skip x_t) / c_out = (sigma x0 - alpha sigma_data^2 eps) / (sigma_data sqrt(alpha^2
    sigma_data^2 + sigma^2)): -eps as sigma -> 0, x0 / sigma_data as alpha -> 0, -v on VP with sigma_data = 1.

    The other targets already have a skip (their conversion to x0); c_skip = 0 and c_out is the target's
    standard deviation for independent x0 (variance sigma_data^2) and eps: eps 1; score = -eps / sigma,
    1 / sigma (Song & Ermon 2020, Technique 3: s(x, sigma) = F(x) / sigma); v = alpha eps - sigma x0,
    sqrt(alpha^2 + sigma^2 sigma_data^2); flow u = alpha' x0 + sigma' eps, sqrt(alpha'^2 sigma_data^2 + sigma'^2).

    Unit weight on F, as ``losses`` "simple" puts on a preconditioned output, is EDM's lambda = 1 / c_out^2
    (their Eq. 8) on |prediction - target|^2; for score it is NCSN's lambda = sigma^2 (Song & Ermon 2019, Eq. 6).
    ``alpha_sigma``: (alpha, sigma) already broadcast against x, when the caller has them.
    """
    _check(predicts)
    alpha, sigma = alpha_sigma if alpha_sigma is not None else _alpha_sigma(process, t, x)
    zero = torch.zeros_like(alpha)
    if predicts == "eps":
        return zero, torch.ones_like(alpha)
    if predicts == "x0":
        denom = alpha**2 * sigma_data**2 + sigma**2
        return alpha * sigma_data**2 / denom, sigma * sigma_data * torch.rsqrt(denom)
    if predicts == "score":
        return zero, 1 / sigma
    if predicts == "v":
        return zero, torch.sqrt(alpha**2 + sigma**2 * sigma_data**2)
    d_alpha, d_sigma = _coeffs(process, t, x, "d_alpha", "d_sigma")
    return zero, torch.sqrt(d_alpha**2 * sigma_data**2 + d_sigma**2)
