"""The processes of the notes, each a pair of curves alpha(t), sigma(t).

Each class gives closed forms of what it can (f, g2, t_from_lam); the rest comes from
``NoiseProcess``. Defaults are the papers' values.

    VP       Song et al. 2021, Eq. 11 (linear beta(t)); DDPM's continuous limit
    SubVP    Song et al. 2021, Eq. 12
    VE       Song et al. 2021, Eq. 9 (NCSN's geometric sigmas, Song & Ermon 2019)
    Cosine   Nichol & Dhariwal 2021, Eq. 17
    EDM      Karras et al. 2022, Table 1 (alpha = 1, sigma = t)
    Flow     rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022)
    Discrete Ho et al. 2020: betas on an integer grid t = 0..T, alpha_bar_t = prod(1 - beta)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .process import NoiseProcess, as_time

__all__ = ["VP", "SubVP", "VE", "Cosine", "EDM", "Flow", "Discrete", "make_betas"]
__all__ += ["beta_linear", "beta_cosine", "beta_sigmoid", "beta_quadratic"]


class _VariancePreserving(NoiseProcess):
    """alpha^2 + sigma^2 = 1, given by log alpha(t) (VP, Cosine, Discrete): the curves once, from log alpha.

    sigma = sqrt(-expm1(2 log alpha)) is accurate for alpha near 1 (small t); lam = log alpha - log sigma;
    g2 = d sigma^2/dt - 2 f sigma^2 = -2 f alpha^2 - 2 f sigma^2 = -2 f.
    """

    def log_alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def alpha_sigma(self, t):
        la = self.log_alpha(t)
        return torch.exp(la), torch.sqrt(-torch.expm1(2 * la))

    def lam(self, t):
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def g2(self, t):
        return -2 * self.f(t)


@dataclass(frozen=True, repr=True)
class VP(_VariancePreserving):
    """Variance-preserving SDE with beta(t) = beta_min + t (beta_max - beta_min).

    log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2,  sigma^2 = 1 - alpha^2.
    f = -beta(t)/2, g^2 = beta(t)  (Song et al. 2021, Eq. 11).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def log_alpha(self, t: Tensor) -> Tensor:
        t = as_time(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def f(self, t):
        return -0.5 * self.beta(t)

    def t_from_lam(self, lam):
        # alpha^2 = sigmoid(2 lam), so -log alpha^2 = softplus(-2 lam) =: S and t solves
        # (beta_max - beta_min) t^2 / 2 + beta_min t = S; the root below avoids cancellation.
        S = torch.nn.functional.softplus(-2 * as_time(lam))
        d = self.beta_max - self.beta_min
        return 2 * S / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * S))


@dataclass(frozen=True, repr=True)
class SubVP(VP):
    """Sub-VP SDE: alpha as in VP, sigma = 1 - alpha^2 (Song et al. 2021, Eq. 12).

    g^2 = beta(t) (1 - alpha^4); t_from_lam falls back to bisection.
    """

    def sigma(self, t):
        return -torch.expm1(2 * self.log_alpha(t))

    def alpha_sigma(self, t):
        la = self.log_alpha(t)
        return torch.exp(la), -torch.expm1(2 * la)

    def lam(self, t):
        la = self.log_alpha(t)
        return la - torch.log(-torch.expm1(2 * la))

    def g2(self, t):
        return self.beta(t) * -torch.expm1(4 * self.log_alpha(t))

    t_from_lam = NoiseProcess.t_from_lam


@dataclass(frozen=True, repr=True)
class VE(NoiseProcess):
    """Variance-exploding SDE: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t.

    f = 0, g^2 = 2 sigma^2 log(sigma_max / sigma_min)  (Song et al. 2021, Eq. 9).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** as_time(t)

    def lam(self, t):
        return -math.log(self.sigma_min) - as_time(t) * math.log(self.sigma_max / self.sigma_min)

    def f(self, t):
        return torch.zeros_like(as_time(t))

    def g2(self, t):
        return 2 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min)

    def t_from_lam(self, lam):
        t = (-as_time(lam) - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)
        return t.clamp(self.t_min, self.t_max)


@dataclass(frozen=True, repr=True)
class Cosine(_VariancePreserving):
    """Cosine schedule: alpha^2(t) = cos^2(theta(t)) / cos^2(theta(0)), theta = (t + s)/(1 + s) pi/2.

    Nichol & Dhariwal 2021, Eq. 17, in continuous time. t_max < 1 keeps alpha > 0 (as in
    DPM-Solver's implementation, 0.9946 keeps lam above about -5).
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946

    def _theta(self, t):
        return (as_time(t) + self.s) / (1 + self.s) * (math.pi / 2)

    def log_alpha(self, t):
        la = torch.log(torch.cos(self._theta(t))) - math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))
        return la.clamp(max=0.0)  # at t = 0 rounding can give +1e-17, and sigma = sqrt(-expm1(2 la)) NaN

    def f(self, t):
        return -torch.tan(self._theta(t)) * (math.pi / 2) / (1 + self.s)

    def t_from_lam(self, lam):
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * as_time(lam))
        cos_theta = torch.exp(log_alpha) * math.cos(self.s / (1 + self.s) * math.pi / 2)
        return torch.arccos(cos_theta) * 2 * (1 + self.s) / math.pi - self.s


_TRAIN_VP = VP()  # EDM's training noise levels: those of VP's uniform t (see EDM)


@dataclass(frozen=True, repr=True)
class EDM(NoiseProcess):
    """alpha = 1, sigma = t (Karras et al. 2022, Table 1): the probability-flow ODE is dx/dt = (x - x0_hat)/t.

    Training draws the noise levels VP's uniform t visits: sigma = sigma_VP(tau) / alpha_VP(tau) =
    sqrt(exp(beta_d tau^2 / 2 + beta_min tau) - 1) for tau uniform on the interval that maps onto
    [t_min, t_max] (Karras et al. 2022, Table 1, training of "VP": t ~ U(eps_t, 1), beta_d = 19.9,
    beta_min = 0.1), about 28% of it at sigma > 10 and 1% at sigma < 0.05. Uniform t = sigma would put 99%
    at sigma > 1, where x0_hat is little more than the data mean, so that an x0 network learns nothing
    else (issue #10: loss 0.97, NLL 1559 nats); EDM's own ln sigma ~ N(-1.2, 1.2^2) serves its x0 network
    but leaves sigma > 10 untrained (0.2%), where an eps or score network's error is amplified by sigma
    (Karras et al. 2022, Sec. 5; two moons: sliced W2 0.60 against 0.05 on VP).
    """

    t_min: float = 0.002
    t_max: float = 80.0

    def _vp_times(self) -> tuple[float, float]:
        """The VP times whose noise level sigma_VP / alpha_VP = exp(-lam_VP) is t_min and t_max."""
        lam = -torch.tensor([self.t_min, self.t_max], dtype=torch.float64).log()
        lo, hi = _TRAIN_VP.t_from_lam(lam).tolist()
        return lo, hi

    def train_t(self, u):
        lo, hi = self._vp_times()
        return torch.exp(-_TRAIN_VP.lam(lo + (hi - lo) * as_time(u))).clamp(self.t_min, self.t_max)

    def train_t_density(self, t):
        # 1 / ((hi - lo) d sigma / d tau), with d sigma / d tau = -sigma lam_VP'(tau) = sigma beta / (2 sigma_VP^2)
        lo, hi = self._vp_times()
        t = as_time(t)
        tau = _TRAIN_VP.t_from_lam(-torch.log(t))
        return 2 * _TRAIN_VP.sigma(tau) ** 2 / (t * _TRAIN_VP.beta(tau) * (hi - lo))

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return as_time(t)

    def lam(self, t):
        return -torch.log(as_time(t))

    def f(self, t):
        return torch.zeros_like(as_time(t))

    def g2(self, t):
        return 2 * as_time(t)

    def t_from_lam(self, lam):
        return torch.exp(-as_time(lam))


@dataclass(frozen=True, repr=True)
class Flow(NoiseProcess):
    """Linear interpolation alpha = 1 - t, sigma = t (rectified flow; Liu et al. 2022).

    The flow velocity is dx/dt = eps - x0. At t = 1, alpha = 0 and the prior N(0, I) is exact;
    f = -1/(1-t) is infinite there, so ODE/SDE samplers must not evaluate f at t = 1.
    """

    t_min: float = 1e-3
    t_max: float = 1.0

    def alpha(self, t):
        return 1 - as_time(t)

    def sigma(self, t):
        return as_time(t)

    def f(self, t):
        return -1 / (1 - as_time(t))

    def g2(self, t):
        t = as_time(t)
        return 2 * t + 2 * t**2 / (1 - t)

    def t_from_lam(self, lam):
        return torch.sigmoid(-as_time(lam))  # alpha/sigma = e^lam  =>  t = 1 / (1 + e^lam)


# -- discrete time (DDPM) ---------------------------------------------------------------


def beta_linear(T: int) -> Tensor:
    """Ho et al. 2020: 1e-4 .. 0.02 for T = 1000, rescaled so other T keep the same alpha_bar_T."""
    scale = 1000 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


def beta_quadratic(T: int) -> Tensor:
    """sqrt(beta) linear between the linear schedule's ends (Ho et al.'s code; Nichol & Dhariwal 2021)."""
    scale = 1000 / T
    return torch.linspace(math.sqrt(scale * 1e-4), math.sqrt(scale * 0.02), T, dtype=torch.float64) ** 2


def beta_sigmoid(T: int) -> Tensor:
    """GeoDiff (Xu et al. 2022): a sigmoid between the linear schedule's ends."""
    scale = 1000 / T
    lo, hi = scale * 1e-4, scale * 0.02
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (hi - lo) + lo


def beta_cosine(T: int, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal 2021, Eq. 17, with betas clipped at 0.999 to avoid a singularity at t = T."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    ab = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)


def make_betas(schedule: Callable[[int], Tensor], T: int) -> Tensor:
    """The betas of a DDPM schedule (``beta_linear``, ``beta_cosine``, ``beta_sigmoid``, ``beta_quadratic`` or any
    function T -> (T,) betas) with T steps, float64, clipped at 0.999."""
    if not callable(schedule):
        raise TypeError(
            f"schedule must be a function such as beta_linear, got {schedule!r}; "
            "names become schedules through torchdiffusion.names.SCHEDULES"
        )
    if T < 2:
        raise ValueError(f"T must be at least 2, got {T}")
    # The 1000/T rescaling of the linear-type schedules passes beta = 1 for T <= 20; clip as
    # Nichol & Dhariwal do for the cosine schedule, so every T gives a valid process.
    return schedule(T).clamp(max=0.999)


@dataclass(frozen=True, repr=False)
class Discrete(_VariancePreserving):
    """DDPM (Ho et al. 2020): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t = 0..T.

    Exact on the integer grid (alpha_bar_0 = 1 is the data). Between integers log alpha_bar is
    interpolated linearly, which makes lam, f, g2 and t_from_lam defined for every t and lets
    continuous-time samplers run on a DDPM model. ``alphas_cumprod`` lives only here.

    Build with ``Discrete.from_schedule(beta_linear, T=1000)`` or ``Discrete(betas)``.
    """

    discrete = True  # time is the integer step t = 0..T (``NoiseProcess.discrete``)

    betas: Tensor = field(default_factory=lambda: beta_linear(1000))

    def __post_init__(self):
        betas = torch.as_tensor(self.betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-d sequence of at least 2 values in (0, 1)")
        object.__setattr__(self, "betas", betas)
        log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-betas), 0)])
        object.__setattr__(self, "_log_alphas_cumprod", log_ab)  # index t = 0..T
        object.__setattr__(self, "n_steps", betas.numel())
        object.__setattr__(self, "t_min", 1.0)
        object.__setattr__(self, "t_max", float(betas.numel()))

    @classmethod
    def from_schedule(cls, schedule: Callable[[int], Tensor] = beta_linear, T: int = 1000) -> Discrete:
        return cls(make_betas(schedule, T))

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha_bar_t for t = 0..T (alpha_bar_0 = 1)."""
        return self._log_alphas_cumprod.exp()

    def _index(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = as_time(t).clamp(0, self.n_steps)
        i = torch.floor(t).clamp(max=self.n_steps - 1)
        return i.long(), t - i

    def log_alpha(self, t):
        i, frac = self._index(t)
        table = self._log_alphas_cumprod.to(frac.device)
        return 0.5 * (table[i] * (1 - frac) + table[i + 1] * frac)

    def f(self, t):
        i, _ = self._index(t)
        table = self._log_alphas_cumprod.to(i.device)
        return 0.5 * (table[i + 1] - table[i])  # slope of log alpha on the segment [i, i + 1]

    def train_t(self, u):
        """Uniform integers 1..T (Ho et al. 2020, Algorithm 1): t = floor(u T) + 1."""
        return (torch.floor(as_time(u) * self.n_steps) + 1).clamp(max=self.n_steps)

    def train_t_density(self, t):
        """1/T, the probability of each integer t: dividing by it turns a mean over t into the sum over 1..T."""
        return torch.full_like(as_time(t), 1.0 / self.n_steps)

    def t_from_lam(self, lam):
        # log alpha is piecewise linear in t; invert it by locating the segment.
        target = -0.5 * torch.nn.functional.softplus(-2 * as_time(lam))
        table = 0.5 * self._log_alphas_cumprod.to(target.device)  # decreasing in t
        i = torch.searchsorted(-table, -target.contiguous(), right=True).clamp(1, self.n_steps) - 1
        lo, hi = table[i], table[i + 1]
        return (i + (target - lo) / (hi - lo)).clamp(0, self.n_steps)

    def __repr__(self) -> str:
        return f"Discrete(T={self.n_steps}, beta_1={float(self.betas[0]):.3g}, beta_T={float(self.betas[-1]):.3g})"

    def __eq__(self, other):
        return isinstance(other, Discrete) and torch.equal(self.betas, other.betas)

    def __hash__(self):
        return hash(tuple(self.betas.tolist()))
