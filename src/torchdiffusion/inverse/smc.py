"""TDS: the twisted diffusion sampler, sequential Monte Carlo for the exact posterior (Wu et al. 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.measurements import Measurement
from ..core.predictions import gaussian_x0_variance
from ..core.process import NoiseProcess
from ..samplers import _common
from ..samplers.ddim import ddim_step
from ._common import observation
from .mmps import mmps_update

__all__ = ["sample_smc", "smc_budget"]

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)
RESAMPLING = ("systematic", "multinomial")
PROPOSALS = ("twist", "mmps")


def smc_budget(nfe: int) -> dict:
    """``{"particles": P, "steps": s}`` for a budget of ``nfe`` denoiser calls per sample, P (s + 1) <= nfe.

    More particles shrink the weights' Monte Carlo error, more steps the discretization bias of the model's chain;
    s is about 2 sqrt(nfe) (at least 12) and the rest buys particles; a budget that buys only one particle goes to
    steps. On the benchmark's 2-D ring and 8-D mixture (``benchmarks/bench_inverse.py``) this split came within
    about 20% of the best s in 12..48 at NFE 50, 100 and 250.
    """
    if not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"smc_budget: nfe must be an int >= 2 (a step and the last one), got {nfe!r}")
    steps = min(nfe - 1, max(12, round(2 * math.sqrt(nfe))))
    P = max(1, nfe // (steps + 1))
    return {"particles": 1, "steps": nfe - 1} if P == 1 else {"particles": P, "steps": steps}


def sample_smc(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    measurement: Measurement,
    *,
    particles: int | None = None,
    eta: float = 1.0,
    sigma_data: float = 1.0,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    proposal: str = "twist",
    cg_iterations: int = 1,
    return_particles: bool = False,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor | tuple[Tensor, Tensor]:
    """The twisted diffusion sampler (TDS; Wu, Trippe, Naesseth, Blei & Cunningham 2023, Algorithm 1): P weighted
    particles per observation whose weighted law converges to the model's posterior p(x0 | y) as P -> infinity.

    The target. The model is the reverse chain of ``sample_ddim`` with ``eta`` (eta = 1: DDPM's ancestral step),
    p(x_{t'} | x_t) = N(a_t x_t + b_t x0_hat(x_t), c_t^2 I) (``ddim_step``), walked over the noisy times of ``ts``
    from the start x ~ p(x_T), and a Gaussian last step to the data from the last noisy time t_min,

        p(x0 | x_tmin) = N(x0_hat(x_tmin), r_tmin^2 I),   r_t^2 = s_d^2 sigma_t^2 / (alpha_t^2 s_d^2 + sigma_t^2),

    s_d = ``sigma_data`` (r_t^2 is Var[x0 | x_t] under a N(0, s_d^2 I) prior; where sigma(ts[-1]) = 0, t_min is
    ts[-2] and this is the step that lands). The sampler targets the model's prior times p(y | x0) = N(y; A x0,
    sigma_y^2 I): the model's exact posterior. Nothing else is approximated in the limit P -> infinity; the twists
    below only set the variance of the weights. For the exact denoiser of a mixture, the model's prior differs from
    the mixture by the time discretization alone: (1) the first-order ancestral step, whose variances on a Gaussian
    are low by about 0.9 h relative, h the lam step (closed-form variance recursion on VP's grid_lam: 9% at 100
    steps, 4.6% at 200, 2.3% at 400, 0.95% at 1000; about half that as eta -> 0), and (2) the Gaussian last step,
    whose variance misses that of p(x0 | x_tmin, component) by a relative (r_tmin^2 / lambda)^2 on a component of
    variance lambda (r_tmin = 0.0105 at VP's t_min).

    The twist is Wu et al.'s p(y | x0 = x0_hat(x_t)) widened by PiGDM's Var[x0 | x_t] = r_t^2 I (Song et al. 2023,
    Eq. 7), so that it is a density also at sigma_y = 0:

        log p~_t(y | x_t) = log N(y; A x0_hat(x_t), r_t^2 A A^T + sigma_y^2 I),

    computed through A's SVD A = U diag(s) V^T (on range(A), in the coordinates y~ = U^T y, plus the constant
    density of y's part outside the range, as ``GaussianMixture.log_evidence``). Each step t -> t' moves a particle
    with Wu et al.'s twisted proposal q: the model's transition with its mean moved by its variance times the
    twist's score (one backward pass through the denoiser),

        x_{t'} = a_t x_t + b_t x0_hat + c_t^2 g + c_t z,   g = grad_{x_t} log p~_t(y | x_t),   z ~ N(0, I),

    and multiplies the particle's weight by the incremental importance weight of the twisted targets,

        w <- w p(x_{t'} | x_t) p~_{t'}(y | x_{t'}) / (q(x_{t'} | x_t) p~_t(y | x_t)),
        log p(x_{t'} | x_t) - log q(x_{t'} | x_t) = -c_t g.z - c_t^2 |g|^2 / 2,

    from w = p~_T(y | x_T) at the start. Before each move, a group whose effective sample size (sum w)^2 / sum w^2
    is below ``ess_threshold`` P is resampled (systematic by default, Kitagawa 1996; or multinomial) and its weights
    are set to their mean. The last step draws x0 from p(x0 | x_tmin, y), the Gaussian N(x0_hat, r_tmin^2 I)
    conditioned on y = A x0 + sigma_y n (Matheron's rule through the SVD); its incremental weight,
    int p(y | x0) N(x0; x0_hat, r_tmin^2 I) dx0 / p~_tmin(y | x_tmin) = N(y; A x0_hat, r_tmin^2 A A^T + sigma_y^2 I)
    / p~_tmin(y | x_tmin), is exactly 1, so the final weights hold p(y | x0) exactly (integrated over the last
    step). At sigma_y = 0 the same step is exact conditioning on A x0 = y (A x0 is y's projection onto range(A),
    to rounding) and the twists are densities on range(A): noise-free measurements are exact too, the posterior
    living on {A x0 = y}, where the model's Gaussian last step has a density.

    Why TDS rather than MCGdiff (Cardoso et al. 2024): both are exact as P grows; TDS needs only x0_hat and one
    backward pass, works for any linear A, sigma_y >= 0, process and grid, and reuses ``ddim_step``, while
    MCGdiff ties each singular value's sigma_y / s_i to a time of the DDPM grid.

    Args: as ``samplers.sample_ddim``; measurement: ``Measurement(A, y, sigma_y)``, any sigma_y >= 0.
        x: (N, *shape) starts, e.g. ``process.prior_sample``: G groups of P consecutive particles (N = G P), one
            independent SMC run per group; y has a batch of 1 (shared) or G (one per group). cond: batched like x,
            the same for every particle of a group (resampling moves particles within their group).
        particles: P; default N // y's batch (all of x for one y).
        eta: 0 < eta <= 1, the model's reverse step (the moves need its noise: eta = 0 has no density).
        sigma_data: the data's scale in r_t (the twist's and the last step's width); the data's standard deviation
            per coordinate makes the weights less variable (the ring of the tests, std 1.4: at P = 32 its dominant
            weight's 1/P bias falls from 0.026 at 1.0 to 0.017), and the last step's width hardly depends on it.
        ess_threshold: in [0, 1]: resample when ESS < ess_threshold P (0: never, 1: at every step); default 0.5,
            the usual rule (Doucet & Johansen 2009).
        resampling: "systematic" or "multinomial".
        proposal: "twist" (Wu et al.'s: the model's mean moved by c_t^2 g) or "mmps": the model's step taken from
            MMPS's E[x0 | x_t, y] (``mmps.mmps_x0``, the covariance of p(x0 | x_t) from the denoiser's Jacobian,
            ``cg_iterations`` conjugate-gradient steps) instead of x0_hat. Either way the weights carry
            p(x_t' | x_t) / q(x_t' | x_t) for the proposal used, (|u - d|^2 - |u|^2) / (2 c_t^2) with d the shift of
            the mean and u = x_t' - (model's mean), so the target is the same; only the weights' variance changes
            (``bench_inverse.py``: mmps helps on the 64-D image-like cases and hurts on the 8-D one, where the moved
            particles disagree with the isotropic twist).
        return_particles: return (particles (G, P, *shape), log_weights (G, P) float64) instead of one sample per
            group. The log weights are unnormalized: logsumexp over P minus log P is the SMC estimate of the
            model's log p(y) (its exp is unbiased), on range(A) at sigma_y = 0 as ``GaussianMixture.log_evidence``.
        callback: called after each move with {"i", "t", "x", "x0_hat", "nfe", "log_weights", "ess", "resampled"}.
    Returns:
        (G, *shape): per group one particle drawn with probability proportional to its weight.
        NFE: one denoiser evaluation with a backward pass per noisy time of ``ts``, for each of the N particles.
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1]: the moves need the model step's noise to have a density, got {eta}")
    if not (sigma_data > 0 and math.isfinite(sigma_data)):
        raise ValueError(f"sigma_data must be a positive number, got {sigma_data}")
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1] (a fraction of the particles), got {ess_threshold}")
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling must be one of {RESAMPLING}, got {resampling!r}")
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    if not isinstance(measurement, Measurement):
        raise TypeError(f"measurement must be a Measurement(operator, y, sigma_y), got {type(measurement).__name__}")
    x, g = _common.setup(process, x, ts)
    N = x.shape[0]
    P = N // measurement.batch if particles is None else particles
    if not (isinstance(P, int) and P >= 1 and N % P == 0):
        raise ValueError(f"particles must be a positive int dividing x's batch {N}, got {particles!r}")
    G = N // P
    y = observation(measurement, x[::P], noiseless=None)  # (G, *out_shape); checks y's batch is 1 or G
    A, sigma_y = measurement.operator, measurement.sigma_y
    svd = A.svd()
    last = g.n - 1 if g.n and g.lands[-1] else g.n  # the last noisy time (a step landing on sigma = 0 is the last step)
    if g.sigma[last] == 0:
        raise ValueError("ts must hold a time with sigma > 0 (the last step starts from one)")

    s = svd.s.to(x)
    yt = svd.Ut(y.reshape(G, -1)).repeat_interleave(P, 0)  # (N, R): y~ = U^T y per particle
    y_all = y.repeat_interleave(P, 0)
    log_perp = _log_perp(y.reshape(G, -1), svd, sigma_y, A.out_dim).repeat_interleave(P, 0)

    def r2(i: int) -> float:
        return gaussian_x0_variance(g.alpha[i], g.sigma[i], sigma_data)

    def twist(i: int, xi: Tensor):
        """x0_hat, log p~_t(y | x_t) (N,) float64, and the proposal's x0: x0_hat + sigma^2 / alpha times the
        twist's gradient in x_t (Tweedie), or MMPS's E[x0 | x_t, y] (``mmps.mmps_x0``), at time i."""
        var = r2(i) * s**2 + sigma_y**2  # (R,): the twist's variance along each singular direction
        with torch.enable_grad():
            xg = xi.detach().requires_grad_(True)
            x0_hat = denoiser(xg, g.time(i, xg), **cond)
            e = yt - s * svd.Vt(x0_hat.reshape(N, -1))
            lt = -0.5 * ((e**2 / var).sum(1) + torch.log(var).sum() + len(var) * LOG_2PI)
            if proposal == "twist":  # Wu et al.: the mean moves by its variance c^2 times the twist's score
                (v,) = torch.autograd.grad(lt.sum(), xg)
            elif g.alpha[i] > 0:  # the step from MMPS's x0 instead of x0_hat: the mean moves by b (x0_q - x0_hat)
                v = mmps_update(x0_hat, xg, g.alpha[i], g.sigma[i], measurement, y_all, cg_iterations) - x0_hat
            else:  # alpha = 0 (Flow's start): x_t holds nothing of x0, no covariance to match
                v = torch.zeros_like(x0_hat)
        return x0_hat.detach(), lt.detach().to(F64) + log_perp, v.detach()

    x = x.detach()
    lw = torch.zeros(G, P, dtype=F64, device=x.device)
    prev, ratio = 0.0, 0.0
    for i in range(last + 1):
        x0_hat, lt, v = twist(i, x)
        lw = lw + (lt - prev + ratio).reshape(G, P)
        if i == last:
            break
        ess = torch.exp(2 * torch.logsumexp(lw, 1) - torch.logsumexp(2 * lw, 1))  # (G,)
        resampled = ess < ess_threshold * P
        if bool(resampled.any()):
            idx = _resample(lw, resampling, generator)
            keep = torch.arange(P, device=x.device).expand(G, P)
            idx = torch.where(resampled[:, None], idx, keep) + P * torch.arange(G, device=x.device)[:, None]
            idx = idx.flatten()
            x, x0_hat, lt, v = x[idx], x0_hat[idx], lt[idx], v[idx]
            mean = torch.logsumexp(lw, 1, keepdim=True) - math.log(P)  # keeps the running estimate of p(y)
            lw = torch.where(resampled[:, None], mean.expand(G, P), lw)
        a, b, c = _ancestral(g, i, eta)
        d = c**2 * v if proposal == "twist" else b * v  # the proposal's shift of the model's mean a x + b x0_hat
        x_new = ddim_step(g, i, x, x0_hat, eta, generator) + d
        u = x_new - (a * x + b * x0_hat)  # c z + d
        # log p(x_new | x) - log q(x_new | x) = (|u - d|^2 - |u|^2) / (2 c^2)
        ratio = ((-(u * d).flatten(1).sum(1) + 0.5 * (d**2).flatten(1).sum(1)) / c**2).to(F64)
        prev, x = lt, x_new
        if callback is not None:
            info = {"i": i, "t": float(g.ts[i]), "x": x, "x0_hat": x0_hat, "nfe": i + 1}
            callback({**info, "log_weights": lw, "ess": ess, "resampled": resampled})

    x0 = _last_step(x0_hat, r2(last), svd, yt, sigma_y, generator)  # incremental weight 1 (see the docstring)
    if return_particles:
        return x0.reshape(G, P, *x0.shape[1:]), lw
    pick = torch.multinomial(torch.softmax(lw, 1), 1, generator=generator).flatten()
    return x0.reshape(G, P, *x0.shape[1:])[torch.arange(G, device=x0.device), pick]


def _ancestral(g: _common.Grid, i: int, eta: float) -> tuple[float, float, float]:
    """(a, b, c) of ``ddim_step``'s transition N(a x_t + b x0_hat, c^2 I) from ts[i], with its formulas."""
    s, em, omh = i + 1, g.em[i], g.one_minus_em[i]
    one_m_q2 = eta**2 * omh * (1 + em)
    q = math.sqrt(1 - one_m_q2)
    return q * g.sigma[s] / g.sigma[i], g.alpha[s] * (omh + em * one_m_q2 / (1 + q)), g.sigma[s] * math.sqrt(one_m_q2)


def _resample(lw: Tensor, scheme: str, generator) -> Tensor:
    """Per group (row of lw, (G, P)), P ancestor indices drawn with probability proportional to exp(lw)."""
    G, P = lw.shape
    w = torch.softmax(lw, 1)
    if scheme == "multinomial":
        return torch.multinomial(w, P, replacement=True, generator=generator)
    # systematic: one uniform per group, the P points (u + j) / P against the cumulative weights
    u = (torch.rand(G, 1, generator=generator, dtype=F64, device=lw.device) + torch.arange(P, device=lw.device)) / P
    cdf = w.cumsum(1)
    cdf[:, -1] = 1.0  # the sum is 1 up to rounding: no point may fall past the last particle
    return torch.searchsorted(cdf, u, right=True).clamp_max(P - 1)


def _log_perp(y: Tensor, svd, sigma_y: float, M: int) -> Tensor:
    """log N(y_perp; 0, sigma_y^2 I) (G,) of y's part outside range(A) (0 at sigma_y = 0: densities on the range)."""
    R = svd.rank
    if sigma_y == 0 or M == R:
        return torch.zeros(y.shape[0], dtype=F64, device=y.device)
    y = y.to(F64)
    perp = y - svd.U(svd.Ut(y))
    return -0.5 * (perp**2).sum(1) / sigma_y**2 - 0.5 * (M - R) * (LOG_2PI + 2 * math.log(sigma_y))


def _last_step(x0_hat: Tensor, r2: float, svd, yt: Tensor, sigma_y: float, generator) -> Tensor:
    """A draw of N(x0_hat, r2 I) conditioned on y~ = s V^T x0 + sigma_y n (Matheron's rule): u = x0_hat + r z, then
    x0 = u + V diag(k) (y~ - s V^T u - sigma_y n), k = r2 s / (r2 s^2 + sigma_y^2); at sigma_y = 0, V^T x0 = y~ / s."""
    N = x0_hat.shape[0]
    u = x0_hat + math.sqrt(r2) * _common.noise_like(x0_hat, generator)
    if svd.rank == 0:
        return u
    s = svd.s.to(u)
    innovation = yt - s * svd.Vt(u.reshape(N, -1))
    if sigma_y > 0:
        n = torch.randn(innovation.shape, generator=generator, device=u.device, dtype=u.dtype)
        innovation = innovation - sigma_y * n
    k = r2 * s / (r2 * s**2 + sigma_y**2)
    return u + svd.V(k * innovation).reshape(u.shape)
