"""The noise process: one class, two curves, everything else derived.

Every diffusion model of the lecture notes (seed 003) corrupts data the same way,

    x_t = alpha(t) * x0 + sigma(t) * eps,      eps ~ N(0, I),

so a process is defined by ``alpha(t)`` and ``sigma(t)`` alone. From them, once, here:

    lam(t)  = log(alpha / sigma)                   half log-SNR, strictly decreasing
    snr(t)  = alpha^2 / sigma^2
    f(t)    = d log alpha / dt                     drift of dx = f x dt + g dW
    g2(t)   = d sigma^2 / dt - 2 f sigma^2         squared diffusion (Song et al. 2021, Eq. 5/11)
    q(x_s | x_t, x0) = N(mean, var)                Gaussian posterior for any s < t
    reverse SDE drift  f x - g2 score              (Anderson 1982; Song et al. 2021, Eq. 6)
    probability-flow velocity  f x - g2/2 score    (Song et al. 2021, Eq. 13)

with the score written through the denoiser by Tweedie's formula (``predictions.tweedie_score``), so both
are linear in x and x0_hat: ``reverse_drift_coeffs`` and ``ode_velocity_coeffs`` give the two coefficients.
``batch_time`` and ``NoiseProcess.at`` are the one place where times meet tensors (a scalar or (B,) time,
broadcast against x and cast to its dtype).

Subclasses (``processes.py``) may override ``f``, ``g2``, ``lam`` and ``t_from_lam`` with
closed forms; the base-class versions (autograd and bisection) stay callable as
``NoiseProcess.f(process, t)`` so tests can check the closed forms against them.

No code outside this file and ``processes.py`` asks which process it holds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NoiseProcess", "append_dims", "as_time", "batch_time"]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-example tensor (B,) broadcasts against (B, ...)."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor to {ndim} dims")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def as_time(t: Tensor | float) -> Tensor:
    """Times as a float64 tensor: coefficients are computed in float64 (DESIGN.md, numerics)."""
    if isinstance(t, Tensor):
        return t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


def batch_time(t: Tensor | float, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Times as the (B,) tensor a denoiser takes: a scalar expanded to x's batch, on x's device, in ``dtype``
    (float64 for coefficients; x's dtype for a network's input)."""
    if isinstance(t, Tensor):
        t = t.to(device=x.device, dtype=dtype)
    else:
        t = torch.tensor(float(t), dtype=dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class NoiseProcess:
    """Base class: a forward process x_t = alpha(t) x0 + sigma(t) eps on t in [t_min, t_max].

    Subclasses implement ``alpha`` and ``sigma`` (float64 in, float64 out) and set
    ``t_min``, ``t_max``. ``discrete`` says whether time is DDPM's integer step t = 0..T (``n_steps`` = T:
    training draws integer t in 1..T and the ELBO is a sum over steps) or continuous (``n_steps`` None).
    """

    t_min: float = 0.0
    t_max: float = 1.0
    n_steps: int | None = None
    discrete: bool = False

    # -- the two curves -------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Both curves at once (subclasses share work between them; networks call this per step)."""
        t = as_time(t)
        return self.alpha(t), self.sigma(t)

    # -- derived quantities ---------------------------------------------------------
    def lam(self, t: Tensor) -> Tensor:
        """Half log-SNR lam(t) = log alpha(t) - log sigma(t); strictly decreasing in t."""
        t = as_time(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha^2 / sigma^2 = exp(2 lam)."""
        t = as_time(t)
        return (self.alpha(t) / self.sigma(t)) ** 2

    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient f(t) = d log alpha / dt (autograd default)."""
        return _derivative(lambda u: torch.log(self.alpha(u)), t)

    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2 (autograd default)."""
        t = as_time(t)
        return _derivative(lambda u: self.sigma(u) ** 2, t) - 2 * self.f(t) * self.sigma(t) ** 2

    def d_alpha(self, t: Tensor) -> Tensor:
        """alpha'(t) (autograd of alpha itself: finite where f = alpha'/alpha is not, e.g. Flow at t = 1)."""
        return _derivative(self.alpha, t)

    def d_sigma(self, t: Tensor) -> Tensor:
        """sigma'(t) (autograd of sigma)."""
        return _derivative(self.sigma, t)

    def t_from_lam(self, lam: Tensor) -> Tensor:
        """Inverse of ``lam``: the time t in [t_min, t_max] with lam(t) = lam (bisection default).

        Here values of lam outside [lam(t_max), lam(t_min)] give the nearer end; closed forms in
        subclasses may extrapolate instead.
        """
        lam = as_time(lam)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        # lam decreases in t: where lam(mid) > target, the root lies to the right of mid.
        for _ in range(100):
            mid = (lo + hi) / 2
            right = self.lam(mid) > lam
            lo = torch.where(right, mid, lo)
            hi = torch.where(right, hi, mid)
        return (lo + hi) / 2

    # -- training times -------------------------------------------------------------
    def train_t(self, u: Tensor) -> Tensor:
        """Training times t = F^-1(u) for u uniform on [0, 1): by default uniform on [t_min, t_max].

        ``objectives.sample_t`` draws from it; a process whose t is not a good scale to
        spread training over (EDM's t = sigma) overrides this and ``train_t_density`` together.
        """
        return self.t_min + (self.t_max - self.t_min) * as_time(u)

    def train_t_density(self, t: Tensor) -> Tensor:
        """Density of ``train_t(U)`` at t: the importance weight 1 / p(t) turns a mean over training
        times into the integral over [t_min, t_max] that a continuous-time bound is."""
        return torch.full_like(as_time(t), 1.0 / (self.t_max - self.t_min))

    # -- sampling the forward process -----------------------------------------------
    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise (seed 003, the closed-form forward marginal).

        Args:
            x0: clean data (B, ...). t: times (B,) or scalar. noise: standard normal, like x0.
        """
        a, s = self.at(t, x0)
        return a * x0 + s * noise

    def posterior(self, x0: Tensor, xt: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_s | x_t, x0) for s < t (Gaussian; Ho et al. 2020, Eq. 6-7).

        With alpha_ts = alpha_t / alpha_s and sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2,

            mean = alpha_ts sigma_s^2 / sigma_t^2 * x_t + alpha_s sigma_ts^2 / sigma_t^2 * x0
            var  = sigma_ts^2 sigma_s^2 / sigma_t^2

        On a DDPM grid (s = t - 1) this is mu_q and sigma_q^2(t) of seed 003.
        Returns mean shaped like ``xt`` and var broadcastable to it.
        """
        c_x, c_0, var = self.posterior_coeffs(s, t)
        c_x, c_0, var = (append_dims(c, xt.ndim).to(xt) for c in (c_x, c_0, var))
        return c_x * xt + c_0 * x0, var

    def posterior_coeffs(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Float64 coefficients (c_xt, c_x0, var) of ``posterior`` for times s < t."""
        s, t = as_time(s), as_time(t)
        a_s, sig_s = self.alpha(s), self.sigma(s)
        a_t, sig_t = self.alpha(t), self.sigma(t)
        a_ts = a_t / a_s
        var_ts = self.transition_var(s, t)
        return a_ts * sig_s**2 / sig_t**2, a_s * var_ts / sig_t**2, var_ts * sig_s**2 / sig_t**2

    def transition_var(self, s: Tensor, t: Tensor) -> Tensor:
        """sigma_ts^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2, variance of q(x_t | x_s).

        Written as sigma_t^2 (1 - snr_t / snr_s) ... = sigma_t^2 - alpha_t^2 / snr_s, which is
        exact when sigma_s = 0 and never cancels to a negative number.
        """
        s, t = as_time(s), as_time(t)
        a_t, sig_t = self.alpha(t), self.sigma(t)
        return (sig_t**2 - (a_t**2) * (self.sigma(s) / self.alpha(s)) ** 2).clamp_min(0.0)

    # -- the prior ------------------------------------------------------------------
    @property
    def prior_std(self) -> float:
        """Std of the prior N(0, sigma(t_max)^2 I); assumes alpha(t_max) x0 is negligible."""
        return float(self.sigma(as_time(self.t_max)))

    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw x_T ~ N(0, sigma(t_max)^2 I) of the given shape."""
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.prior_std * z

    def prior_logp(self, x: Tensor) -> Tensor:
        """log N(x; 0, sigma(t_max)^2 I), summed over all but the first dim."""
        s = self.prior_std
        d = x[0].numel()
        return -0.5 * (x.flatten(1) ** 2).sum(1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    # -- the variational bound ------------------------------------------------------
    def elbo_weight(self, t: Tensor, s: Tensor | None = None) -> Tensor:
        """The ELBO's weight on ||x0 - x0_hat(x_t, t)||^2 (seed 003, "Final objective function"), float64.

        For a step t -> s < t: (snr(s) - snr(t)) / 2, the KL between the posteriors q(x_s | x_t, x0) and
        q(x_s | x_t, x0_hat) of equal variance (Ho et al. 2020, Eqs. 5 and 8). In continuous time (s None) its
        density in t, -snr'(t) / 2 = alpha (alpha sigma' - alpha' sigma) / sigma^3 (Kingma et al. 2021, Eq. 17;
        snr = alpha^2 / sigma^2 differentiated), written so that it stays finite where alpha = 0 (Flow at t = 1,
        where alpha^2 g2 / (2 sigma^4), the same weight, is 0 times infinity).
        """
        t = as_time(t)
        if s is not None:
            return 0.5 * (self.snr(s) - self.snr(t))
        a, sig = self.alpha_sigma(t)
        return a * (a * self.d_sigma(t) - self.d_alpha(t) * sig) / sig**3

    # -- the reverse processes (seed 003, "Score-based SDE") -----------------------
    def reverse_drift_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Float64 (c_x, c_0) with the reverse-time SDE's drift f x - g2 score(x) = c_x x + c_0 x0_hat.

        Seed 003: dx = [f(t) x - g(t)^2 score] dt + g(t) dW-bar (Anderson 1982; Song et al. 2021, Eq. 6), with
        Tweedie's score = (alpha x0_hat - x) / sigma^2: c_x = f + g2 / sigma^2, c_0 = -g2 alpha / sigma^2.
        Infinite where f or g2 is (Flow at t = 1): the reverse SDE is singular there.
        """
        t = as_time(t)
        a, s = self.alpha_sigma(t)
        k = self.g2(t) / s**2
        return self.f(t) + k, -k * a

    def ode_velocity_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Float64 (c_x, c_0) with the probability-flow velocity f x - g2/2 score(x) = c_x x + c_0 x0_hat.

        Seed 003: dx = [f(t) x - g(t)^2 score / 2] dt (Song et al. 2021, Eq. 13). With g2 = 2 sigma sigma' -
        2 f sigma^2 and Tweedie's score the velocity is alpha' x0_hat + sigma' eps_hat, i.e.

            c_x = sigma' / sigma,   c_0 = alpha' - sigma' alpha / sigma,

        which never divides by alpha: finite at the noise end of Flow (t = 1, where f is infinite), and on EDM
        (alpha = 1, sigma = t) Karras et al.'s dx/dt = (x - x0_hat) / t (their Eq. 4).
        """
        t = as_time(t)
        a, s = self.alpha_sigma(t)
        ds_s = self.d_sigma(t) / s
        return ds_s, self.d_alpha(t) - ds_s * a

    def ode_velocity(self, x: Tensor, t: Tensor | float, x0_hat: Tensor) -> Tensor:
        """The probability-flow velocity dx/dt at (x, t) given x0_hat (``ode_velocity_coeffs``)."""
        c_x, c_0 = (append_dims(c, x.ndim).to(x) for c in self.ode_velocity_coeffs(batch_time(t, x)))
        return c_x * x + c_0 * x0_hat

    def reverse_drift(self, x: Tensor, t: Tensor | float, x0_hat: Tensor) -> Tensor:
        """The reverse-time SDE's drift at (x, t) given x0_hat (``reverse_drift_coeffs``)."""
        c_x, c_0 = (append_dims(c, x.ndim).to(x) for c in self.reverse_drift_coeffs(batch_time(t, x)))
        return c_x * x + c_0 * x0_hat

    # -- times meet tensors ---------------------------------------------------------
    def at(self, t: Tensor | float, x: Tensor, *curves: str) -> list[Tensor]:
        """The named curves (default alpha, sigma) at t (scalar or (B,)), broadcast against x, in its dtype."""
        t = batch_time(t, x)
        vals = self.alpha_sigma(t) if curves in ((), ("alpha", "sigma")) else [getattr(self, c)(t) for c in curves]
        return [append_dims(v, x.ndim).to(x.dtype) for v in vals]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _derivative(fn, t: Tensor | float) -> Tensor:
    """d fn / dt elementwise by autograd, in float64."""
    with torch.enable_grad():
        u = as_time(t).detach().clone().requires_grad_(True)
        y = fn(u)
        if not y.requires_grad:  # a constant curve (alpha = 1 on VE and EDM)
            return torch.zeros_like(u.detach())
        (grad,) = torch.autograd.grad(y.sum(), u)
    return grad
