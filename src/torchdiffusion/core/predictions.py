"""What a network can predict, as small objects: ``EPS``, ``X0``, ``V``, ``SCORE``, ``FLOW``.

With x = alpha x0 + sigma eps (seed 003; Tweedie's formula for the score):

    eps   = (x - alpha x0) / sigma
    score = grad log p_t(x) = (alpha x0_hat - x) / sigma^2 = -eps_hat / sigma
    v     = alpha eps - sigma x0                (Salimans & Ho 2022, Eq. in Appendix D)
            x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)
    u     = dx/dt = alpha' x0 + sigma' eps      (flow velocity; for Flow, u = eps - x0)
            x0 = (sigma' x - sigma u) / (sigma' alpha - sigma alpha')

Each is a ``Prediction`` with ``from_x0`` (the target given x_t and x0), ``to_x0`` (its inverse, x0_hat from
the network's output), ``x0_error_scale`` and ``output_scalings``. The currency between models and samplers
is the denoiser ``D(x, t, **cond) -> x0_hat`` (``denoiser.as_denoiser``). Tweedie's formula and eps from x0
are written once, as ``tweedie_score`` and ``eps_from``, on values alpha, sigma (floats or broadcast tensors).

Networks train best when their output, like their input, has unit scale whatever the noise level
(Karras et al. 2022, Sec. 5). The raw targets do not: score = -eps / sigma grows without bound as
sigma -> 0, v and the flow velocity grow with sigma on VE and EDM, and x0 has no skip connection at
all (eps, v, score and flow give x0_hat = c(t) x + c'(t) out with c' -> 0 as sigma -> 0, while an x0
network must learn the identity map at low noise, where an error e in x0_hat is a score error
e alpha / sigma^2). ``Preconditioned(..., predicts=...)`` therefore also scales the output
(``output_scalings``: EDM's c_skip and c_out for x0, the target's standard deviation for the
others), and ``objectives.SIMPLE`` weights its raw output F as EDM does (Eq. 8).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .process import NoiseProcess, as_time

__all__ = ["Prediction", "EPS", "X0", "V", "SCORE", "FLOW", "ALL_PREDICTIONS", "tweedie_score", "eps_from", "x0_shift"]
__all__ += ["gaussian_x0_variance"]


def eps_from(x, x0_hat, alpha, sigma):
    """eps_hat = (x - alpha x0_hat) / sigma: the noise that x = alpha x0 + sigma eps implies."""
    return (x - alpha * x0_hat) / sigma


def tweedie_score(x, x0_hat, alpha, sigma):
    """Tweedie's formula: grad log p_t(x) = (alpha E[x0 | x] - x) / sigma^2 = -eps_hat / sigma (seed 003,
    "Tweedie's formula"; Efron 2011). alpha, sigma: floats or tensors broadcast against x."""
    return (alpha * x0_hat - x) / sigma**2


def gaussian_x0_variance(alpha, sigma, sigma_data: float = 1.0):
    """Var[x0 | x_t] = sigma_data^2 sigma^2 / (alpha^2 sigma_data^2 + sigma^2) under a N(0, sigma_data^2 I) prior:
    the width PiGDM (Song et al. 2023) and the twisted diffusion sampler give p(x0 | x_t)."""
    return sigma_data**2 * sigma**2 / (alpha**2 * sigma_data**2 + sigma**2)


def x0_shift(score_shift, alpha, sigma):
    """The change of x0_hat that adds ``score_shift`` to the score: Tweedie's formula solved for x0_hat,
    x0_hat = (x + sigma^2 score) / alpha, so a shift g of the score moves x0_hat by sigma^2 / alpha g."""
    return sigma**2 / alpha * score_shift


class Prediction:
    """A network's prediction target. Subclasses write their conversion and its inverse once."""

    name: str = ""

    def from_x0(self, process: NoiseProcess, x: Tensor, t, x0: Tensor, eps: Tensor | None = None) -> Tensor:
        """The target given x_t, x0 (and eps, else inferred as (x - alpha x0) / sigma)."""
        raise NotImplementedError

    def to_x0(self, process: NoiseProcess, x: Tensor, t, out: Tensor, alpha_sigma=None) -> Tensor:
        """x0_hat from a prediction ``out`` at (x, t); the inverse of ``from_x0``. ``alpha_sigma``: the pair
        (alpha, sigma) already broadcast against x (``process.at``), when the caller has it."""
        raise NotImplementedError

    def x0_error_scale(self, process: NoiseProcess, t: Tensor) -> Tensor:
        """(d x0 / d out)^2: |x0_hat - x0|^2 = scale |out - target|^2 at time t (float64, shape of t). Used to
        express every loss weighting in x0 units (seed 003, "Final objective function")."""
        raise NotImplementedError

    def output_scalings(self, process, t, x: Tensor, sigma_data: float, alpha_sigma=None) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out), broadcast against x: the target = c_skip x + c_out F for a raw network F whose target
        has unit variance when x0 has variance sigma_data^2 (Karras et al. 2022, Eq. 7 and Sec. 5). The targets
        other than x0 already have a skip (their conversion to x0): c_skip = 0, c_out = the target's standard
        deviation for independent x0 (variance sigma_data^2) and eps."""
        raise NotImplementedError

    def _ab(self, process, t, x, alpha_sigma):
        return alpha_sigma if alpha_sigma is not None else process.at(t, x)

    def __repr__(self) -> str:
        return self.name.upper()

    def __reduce__(self):  # one instance per target, also after pickling (DataLoader workers, DDP)
        return self.name.upper()


class _Eps(Prediction):
    """eps = (x - alpha x0) / sigma (Ho et al. 2020)."""

    name = "eps"

    def from_x0(self, process, x, t, x0, eps=None):
        return eps if eps is not None else eps_from(x, x0, *process.at(t, x))

    def to_x0(self, process, x, t, out, alpha_sigma=None):
        alpha, sigma = self._ab(process, t, x, alpha_sigma)
        return (x - sigma * out) / alpha

    def x0_error_scale(self, process, t):
        t = as_time(t)
        return (process.sigma(t) / process.alpha(t)) ** 2

    def output_scalings(self, process, t, x, sigma_data, alpha_sigma=None):
        alpha, _ = self._ab(process, t, x, alpha_sigma)
        return torch.zeros_like(alpha), torch.ones_like(alpha)  # eps has unit variance already


class _X0(Prediction):
    """x0 itself."""

    name = "x0"

    def from_x0(self, process, x, t, x0, eps=None):
        return x0

    def to_x0(self, process, x, t, out, alpha_sigma=None):
        return out

    def x0_error_scale(self, process, t):
        return torch.ones_like(as_time(t))

    def output_scalings(self, process, t, x, sigma_data, alpha_sigma=None):
        """EDM's preconditioning (Karras et al. 2022, Table 1), for alpha = 1: c_skip = sigma_data^2 / (sigma^2 +
        sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2), the skip that amplifies F's error
        least (their Appendix B.6). For alpha != 1 the same holds for x / alpha = x0 + (sigma / alpha) eps (their
        Eq. 4, s(t) = alpha): put sigma / alpha for sigma and x / alpha for x, and

            c_skip = alpha sigma_data^2 / (alpha^2 sigma_data^2 + sigma^2),
            c_out  = sigma sigma_data / sqrt(alpha^2 sigma_data^2 + sigma^2);

        F's target (x0 - c_skip x_t) / c_out is -eps as sigma -> 0, x0 / sigma_data as alpha -> 0 and -v on VP
        with sigma_data = 1. Unit weight on F is EDM's lambda = 1 / c_out^2 (their Eq. 8)."""
        alpha, sigma = self._ab(process, t, x, alpha_sigma)
        denom = alpha**2 * sigma_data**2 + sigma**2
        return alpha * sigma_data**2 / denom, sigma * sigma_data * torch.rsqrt(denom)


class _V(Prediction):
    """v = alpha eps - sigma x0 (Salimans & Ho 2022, Appendix D); x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)."""

    name = "v"

    def from_x0(self, process, x, t, x0, eps=None):
        alpha, sigma = process.at(t, x)
        eps = eps if eps is not None else eps_from(x, x0, alpha, sigma)
        return alpha * eps - sigma * x0

    def to_x0(self, process, x, t, out, alpha_sigma=None):
        alpha, sigma = self._ab(process, t, x, alpha_sigma)
        return (alpha * x - sigma * out) / (alpha**2 + sigma**2)

    def x0_error_scale(self, process, t):
        t = as_time(t)
        alpha, sigma = process.alpha(t), process.sigma(t)
        return (sigma / (alpha**2 + sigma**2)) ** 2

    def output_scalings(self, process, t, x, sigma_data, alpha_sigma=None):
        alpha, sigma = self._ab(process, t, x, alpha_sigma)
        return torch.zeros_like(alpha), torch.sqrt(alpha**2 + sigma**2 * sigma_data**2)


class _Score(Prediction):
    """score = grad log p_t(x) = -eps / sigma (Tweedie); x0 = (x + sigma^2 score) / alpha."""

    name = "score"

    def from_x0(self, process, x, t, x0, eps=None):
        alpha, sigma = process.at(t, x)
        return -eps / sigma if eps is not None else tweedie_score(x, x0, alpha, sigma)

    def to_x0(self, process, x, t, out, alpha_sigma=None):
        alpha, sigma = self._ab(process, t, x, alpha_sigma)
        return (x + sigma**2 * out) / alpha  # Tweedie's formula solved for x0_hat

    def x0_error_scale(self, process, t):
        t = as_time(t)
        return (process.sigma(t) ** 2 / process.alpha(t)) ** 2

    def output_scalings(self, process, t, x, sigma_data, alpha_sigma=None):
        """c_out = 1 / sigma: NCSN's s(x, sigma) = F(x) / sigma (Song & Ermon 2020, Technique 3)."""
        alpha, sigma = self._ab(process, t, x, alpha_sigma)
        return torch.zeros_like(alpha), 1 / sigma


class _Flow(Prediction):
    """The flow velocity u = dx_t/dt = alpha' x0 + sigma' eps (for Flow, u = eps - x0): the probability-flow
    velocity of the process (``NoiseProcess.ode_velocity_coeffs``); x0 = (sigma' x - sigma u) / (sigma' alpha -
    sigma alpha')."""

    name = "flow"

    def from_x0(self, process, x, t, x0, eps=None):
        if eps is None:
            return process.ode_velocity(x, t, x0)
        d_alpha, d_sigma = process.at(t, x, "d_alpha", "d_sigma")
        return d_alpha * x0 + d_sigma * eps  # the same velocity, finite where sigma = 0

    def to_x0(self, process, x, t, out, alpha_sigma=None):
        alpha, sigma = self._ab(process, t, x, alpha_sigma)
        d_alpha, d_sigma = process.at(t, x, "d_alpha", "d_sigma")
        return (d_sigma * x - sigma * out) / (d_sigma * alpha - sigma * d_alpha)

    def x0_error_scale(self, process, t):
        t = as_time(t)
        sigma = process.sigma(t)
        return (sigma / (process.d_sigma(t) * process.alpha(t) - sigma * process.d_alpha(t))) ** 2

    def output_scalings(self, process, t, x, sigma_data, alpha_sigma=None):
        alpha, _ = self._ab(process, t, x, alpha_sigma)
        d_alpha, d_sigma = process.at(t, x, "d_alpha", "d_sigma")
        return torch.zeros_like(alpha), torch.sqrt(d_alpha**2 * sigma_data**2 + d_sigma**2)


EPS, X0, V, SCORE, FLOW = _Eps(), _X0(), _V(), _Score(), _Flow()
ALL_PREDICTIONS = (EPS, X0, V, SCORE, FLOW)
