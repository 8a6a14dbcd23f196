"""Exact ground truth: a Gaussian mixture stays a Gaussian mixture under every process.

If p_0 = sum_k w_k N(m_k, diag(v_k)), then under x_t = alpha x0 + sigma eps

    p_t = sum_k w_k N(alpha m_k, diag(alpha^2 v_k + sigma^2)),

so its log-density, its score and the posterior mean E[x0 | x_t] (Tweedie's denoiser) are
exact in closed form. Every sampler, likelihood and guidance routine can therefore be run
against the truth without training anything.

A mixture also stays a mixture under a linear measurement y = A x0 + sigma_y n (core/measurements.py):
``posterior(measurement)`` is the exact p(x0 | y), a ``FullCovarianceMixture`` (the sibling class with
full covariances), and ``conditional_denoiser`` / ``measurement_likelihood`` are the exact E[x0 | x_t, y]
and log p_t(y | x_t) that guidance methods approximate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .measurements import Measurement
from .process import NoiseProcess

__all__ = ["GaussianMixture", "FullCovarianceMixture"]

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
LOG_2PI = math.log(2 * math.pi)


class GaussianMixture:
    """A mixture of Gaussians with diagonal covariances, in float64.

    Args:
        weights: (K,) positive, normalised here.
        means: (K, D).
        variances: (K, D) diagonal variances, or (K,) isotropic, or a scalar. Zero variance
            is allowed (point masses, e.g. an empirical distribution), then only quantities
            at sigma > 0 are defined.
        shape: the event shape of a sample, default (D,); use (C, H, W) for image tensors.
    """

    def __init__(self, weights, means, variances, shape: tuple[int, ...] | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        K, D = self.means.shape
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.shape != (K,) or bool((w <= 0).any()):
            raise ValueError(f"weights must be {K} positive numbers, got {w.tolist()}")
        self.weights = w / w.sum()
        v = torch.as_tensor(variances, dtype=torch.float64)
        v = v.reshape(K, 1) if v.ndim == 1 else v
        self.variances = v.expand(K, D).clone()
        if bool((self.variances < 0).any()):
            raise ValueError("variances must be non-negative")
        self.shape = tuple(shape) if shape is not None else (D,)
        if math.prod(self.shape) != D:
            raise ValueError(f"shape {self.shape} does not hold D = {D} numbers")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # -- moments of the data distribution --------------------------------------------
    def mean(self) -> Tensor:
        """E[x0] (D,)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x0] (D, D) = sum w_k (diag v_k + m_k m_k^T) - mean mean^T."""
        m = self.mean()
        second = torch.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        return second + torch.diag(self.weights @ self.variances) - torch.outer(m, m)

    # -- sampling ----------------------------------------------------------------------
    def sample(
        self, n: int, *, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """n exact samples (n, *shape) in float64, and their component labels if asked."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[k] + self.variances[k].sqrt() * z).reshape(n, *self.shape)
        return (x, k) if return_labels else x

    # -- the marginal p_t ------------------------------------------------------------
    def _marginal(self, process: NoiseProcess | None, t, x: Tensor):
        """Per-example alpha, sigma (B, 1) and flattened x (B, D), all float64."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        if xf.shape[1] != self.dim:
            raise ValueError(f"x has {xf.shape[1]} numbers per example, the mixture has D = {self.dim}")
        if process is None:  # the data distribution itself
            one = torch.ones(xf.shape[0], 1, dtype=torch.float64, device=xf.device)
            return one, torch.zeros_like(one), xf
        alpha, sigma = process.at(t, xf)
        return alpha, sigma, xf  # float64, like xf

    def _component_terms(self, process, t, x):
        """log w_k + log N_k(x) (B, K), and per-component mean and variance of p_t."""
        alpha, sigma, xf = self._marginal(process, t, x)
        means = alpha[:, None, :] * self.means.to(xf.device)  # (B, K, D)
        var = alpha[:, None, :] ** 2 * self.variances.to(xf.device) + sigma[:, None, :] ** 2
        diff = xf[:, None, :] - means
        logn = -0.5 * ((diff**2 / var) + torch.log(2 * math.pi * var)).sum(-1)
        return torch.log(self.weights.to(xf.device)) + logn, diff, var, alpha, xf

    def log_prob(self, x: Tensor, process: NoiseProcess | None = None, t=None) -> Tensor:
        """log p_t(x) (B,), or log p_0(x) when no process is given."""
        terms, *_ = self._component_terms(process, t, x)
        return torch.logsumexp(terms, dim=1)

    def responsibilities(self, x: Tensor, process: NoiseProcess | None = None, t=None) -> Tensor:
        """p(component k | x_t) (B, K): the exact classifier for guidance tests."""
        terms, *_ = self._component_terms(process, t, x)
        return torch.softmax(terms, dim=1)

    def score(self, x: Tensor, process: NoiseProcess | None = None, t=None) -> Tensor:
        """grad_x log p_t(x), shaped like x (float64)."""
        terms, diff, var, _, _ = self._component_terms(process, t, x)
        r = torch.softmax(terms, dim=1)[..., None]
        return (r * (-diff / var)).sum(1).reshape(x.shape)

    def x0_mean(self, x: Tensor, process: NoiseProcess, t) -> Tensor:
        """E[x0 | x_t = x], shaped like x (float64): per component, the Gaussian posterior mean
        m_k + v_k alpha (x - alpha m_k) / (alpha^2 v_k + sigma^2), weighted by responsibility."""
        terms, diff, var, alpha, _ = self._component_terms(process, t, x)
        r = torch.softmax(terms, dim=1)[..., None]
        post = self.means.to(x.device) + self.variances.to(x.device) * alpha[:, None, :] * diff / var
        return (r * post).sum(1).reshape(x.shape)

    def denoiser(self, process: NoiseProcess):
        """The exact denoiser D(x, t) = E[x0 | x_t], returned in x's dtype."""

        def denoise(x: Tensor, t: Tensor, **cond) -> Tensor:
            return self.x0_mean(x, process, t).to(x.dtype)

        return denoise

    # -- the probability-flow map, exactly ----------------------------------------------------------
    def flow_map(self, x: Tensor, process: NoiseProcess, t, s) -> Tensor:
        """The exact probability-flow ODE map x_t -> x_s (Song et al. 2021, Eq. 13), shaped like x (float64).

        t, s: scalars or (B,) per example, either order. Two cases have it in closed form:

        - one component N(m, diag(v)), any D: the ODE's velocity is affine in x, and per coordinate
              x_s = alpha_s m + sqrt(alpha_s^2 v + sigma_s^2) / sqrt(alpha_t^2 v + sigma_t^2) (x_t - alpha_t m),
          the increasing affine map that carries p_t = N(alpha_t m, alpha_t^2 v + sigma_t^2) to p_s;
        - D = 1, any K: the quantile map x_s = F_s^{-1}(F_t(x_t)), F_t the CDF of p_t. In 1-D the flow of a
          smooth velocity field is strictly increasing (two trajectories cannot cross) and it carries p_t to p_s
          (the probability-flow ODE keeps the marginals), so it preserves mass to the left of each point:
          F_s(x_s) = F_t(x_t). The inverse is a safeguarded Newton iteration on log F_s (or log(1 - F_s) above
          the median, so tails keep their relative accuracy), converged to about 1e-13 relative.

        Raises ValueError for K > 1 components in D > 1 (no closed form), and where p_t (or, in 1-D, p_s) has no
        density (a zero-variance component at sigma = 0).
        """
        K, D = self.means.shape
        if K > 1 and D > 1:
            raise ValueError(
                f"the exact flow map is known for one Gaussian component (any D) or in 1-D (any K, the quantile "
                f"map); this mixture has K = {K} components in D = {D}"
            )
        a_t, g_t, xf = self._marginal(process, t, x)  # (B, 1), (B, 1), (B, D)
        a_s, g_s = process.at(s, xf)
        m, v = self.means.to(xf.device), self.variances.to(xf.device)  # (K, D)
        if K == 1:
            sd_t, sd_s = torch.sqrt(a_t**2 * v + g_t**2), torch.sqrt(a_s**2 * v + g_s**2)  # (B, D)
            if bool((sd_t == 0).any()):
                raise ValueError("the flow map starts from a density: alpha_t^2 v + sigma_t^2 must be > 0")
            return (a_s * m + sd_s / sd_t * (xf - a_t * m)).reshape(x.shape)
        return self._quantile_map(xf, a_t, g_t, a_s, g_s).reshape(x.shape)

    def _quantile_map(self, xf: Tensor, a_t: Tensor, g_t: Tensor, a_s: Tensor, g_s: Tensor) -> Tensor:
        """F_s^{-1}(F_t(x)) for 1-D x (B, 1), per-example alpha, sigma (B, 1) at both times (see ``flow_map``)."""
        ndtr = torch.special.log_ndtr
        m, v = self.means[:, 0].to(xf.device), self.variances[:, 0].to(xf.device)  # (K,)
        logw = torch.log(self.weights.to(xf.device))
        mu_t, sd_t = a_t * m, torch.sqrt(a_t**2 * v + g_t**2)  # (B, K)
        mu_s, sd_s = a_s * m, torch.sqrt(a_s**2 * v + g_s**2)
        if bool((sd_t == 0).any()) or bool((sd_s == 0).any()):
            raise ValueError("the quantile map needs densities at both times: alpha^2 v_k + sigma^2 > 0 for every k")
        z = (xf - mu_t) / sd_t
        log_lo, log_up = torch.logsumexp(logw + ndtr(z), 1), torch.logsumexp(logw + ndtr(-z), 1)
        lower = log_lo <= log_up  # solve on the side whose probability is <= 1/2
        target = torch.where(lower, log_lo, log_up)
        sign = torch.where(lower, 1.0, -1.0).to(xf.dtype)
        # Bracket: F_t(x) lies in [Phi(min_k z_k), Phi(max_k z_k)], so Phi^{-1}(F_t(x)) = q in [zlo, zhi]; where
        # y <= mu_s,k + sd_s,k zlo for every k, F_s(y) <= Phi(zlo) <= F_t(x) (and symmetrically at hi).
        lo = (mu_s + sd_s * z.amin(1, keepdim=True)).amin(1)
        hi = (mu_s + sd_s * z.amax(1, keepdim=True)).amax(1)
        scale = sd_s.amin(1)
        logn = logw - torch.log(sd_s) - 0.5 * LOG_2PI
        y = (lo + hi) / 2
        for _ in range(200):
            zs = (y[:, None] - mu_s) / sd_s
            side = torch.logsumexp(logw + ndtr(sign[:, None] * zs), 1)  # log F_s(y), or log(1 - F_s(y))
            g = sign * (side - target)  # increasing in y, zero at the answer
            slope = torch.exp(torch.logsumexp(logn - 0.5 * zs**2, 1) - side)  # d g / dy = p_s / F_s (or / (1 - F_s))
            hi, lo = torch.where(g >= 0, y, hi), torch.where(g <= 0, y, lo)
            y_new = y - g / slope
            bad = ~((y_new > lo) & (y_new < hi))  # Newton left the bracket (or is not finite): bisect
            y_new = torch.where(bad & (hi > lo), (lo + hi) / 2, torch.where(bad, y, y_new))
            done = (y_new - y).abs() <= 1e-13 * (y.abs() + scale)
            y = y_new
            if bool(done.all()):
                break
        return y[:, None]

    def consistency_function(self, process: NoiseProcess, t_min: float | None = None):
        """The exact consistency function of this data: f(x, t) = x_{t_min} / alpha(t_min), where x_{t_min} is the
        end at t_min of the probability-flow trajectory through (x, t) (``flow_map``).

        Song et al. 2023 (Sec. 3) define f(x_t, t) = x_{t_min} on every trajectory; it is self-consistent,
        f(x_t, t) = f(x_u, u) for any two points of one trajectory, and f(x, t_min) = x (the boundary
        condition). Dividing by alpha(t_min) gives the output of ``core.consistency.ConsistencyModel`` (scaled
        coordinates; alpha = 1 for EDM and VE). Exact where ``flow_map`` is: one component in any D, or any
        1-D mixture.

        Returns:
            f(x, t, **cond) -> like x, in x's dtype; t a scalar or (B,). Its attribute ``t_min`` is what
            ``samplers.consistency.sample_consistency`` reads as the boundary.
        """
        t_min = float(process.t_min if t_min is None else t_min)
        a_min = float(process.alpha(torch.tensor(t_min, dtype=torch.float64)))
        if not a_min > 0:
            raise ValueError(f"the consistency function divides by alpha(t_min) > 0; alpha({t_min}) = {a_min}")

        def consistency(x: Tensor, t, **cond) -> Tensor:
            return (self.flow_map(x, process, t, t_min) / a_min).to(x.dtype)

        consistency.t_min = t_min
        return consistency

    # -- measurements (delegated to the full-covariance form) --------------------------------------
    def to_full(self) -> FullCovarianceMixture:
        """The same mixture as a ``FullCovarianceMixture`` (covariances diag(v_k))."""
        return FullCovarianceMixture(self.weights, self.means, torch.diag_embed(self.variances), self.shape)

    def affine(self, A, b=None, *, shape=None, support=None) -> GaussianMixture | FullCovarianceMixture:
        """The exact push-forward under z = A x + b (see ``FullCovarianceMixture.affine``). A diagonal map, A given
        as its (D,) diagonal a, keeps the covariances diagonal: a ``GaussianMixture`` with means a m_k + b and
        variances a^2 v_k; a matrix A goes through ``to_full``."""
        if torch.as_tensor(A).ndim == 1 and support is None:
            a, b = _affine_args(A, b, self.dim)
            return GaussianMixture(self.weights, self.means * a + b, self.variances * a**2, shape or self.shape)
        return self.to_full().affine(A, b, shape=shape, support=support)

    def posterior(self, measurement: Measurement) -> FullCovarianceMixture:
        """The exact p(x0 | y), see ``FullCovarianceMixture.posterior``."""
        return self.to_full().posterior(measurement)

    def log_evidence(self, measurement: Measurement) -> Tensor:
        """log p(y), see ``FullCovarianceMixture.log_evidence``."""
        return self.to_full().log_evidence(measurement)

    def conditional_denoiser(self, process: NoiseProcess, measurement: Measurement):
        """The exact D(x, t) = E[x0 | x_t, y], see ``FullCovarianceMixture.conditional_denoiser``."""
        return self.to_full().conditional_denoiser(process, measurement)

    def measurement_likelihood(self, x: Tensor, process: NoiseProcess, t, measurement: Measurement) -> Tensor:
        """The exact log p_t(y | x_t = x), see ``FullCovarianceMixture.measurement_likelihood``."""
        return self.to_full().measurement_likelihood(x, process, t, measurement)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={len(self.weights)}, D={self.dim}, shape={self.shape})"


def _reduce(measurement: Measurement, shape: tuple[int, ...]):
    """The measurement on the range of A = U diag(s) V^T (rank R): A~ = diag(s) V^T (R, D), y~ = U^T y
    (B_y, R), and log N(y_perp; 0, sigma_y^2 I) (B_y,) of y's part outside the range, y_perp = y - U U^T y.

    y_perp = sigma_y (I - U U^T) n does not depend on x0, so p(x0 | y) = p(x0 | y~), and with A~ of full row
    rank, A~ C A~^T + sigma_y^2 I is invertible whenever C is positive definite, even at sigma_y = 0 and for
    a mask, whose full-shape y has zero rows. At sigma_y = 0, y_perp is 0 for every possible y: densities
    of y are then taken on range(A), in the coordinates y~ (R-dimensional Lebesgue measure), and a y off
    the range is read as its projection U U^T y.
    """
    if not isinstance(measurement, Measurement):
        raise TypeError(f"expected a Measurement, got {type(measurement).__name__}")
    op = measurement.operator
    if op.in_shape != tuple(shape):
        raise ValueError(f"the operator acts on examples of shape {op.in_shape}, the mixture's shape is {shape}")
    svd = op.svd()
    At = svd.s[:, None] * svd.V(torch.eye(svd.rank, dtype=F64))  # V(I) = V^T (R, D)
    y = measurement.y.reshape(measurement.batch, -1).to(device="cpu", dtype=F64)
    yt = svd.Ut(y)
    sy, M, R = measurement.sigma_y, op.out_dim, svd.rank
    if sy > 0 and M > R:
        perp = y - svd.U(yt)
        log_perp = -0.5 * (perp**2).sum(1) / sy**2 - 0.5 * (M - R) * (LOG_2PI + 2 * math.log(sy))
    else:
        log_perp = torch.zeros(measurement.batch, dtype=F64)
    return At, yt, sy, log_perp


def _affine_args(A, b, D: int) -> tuple[Tensor, Tensor]:
    """A as a float64 (M, D) matrix or (D,) diagonal, and b as (M,) (zeros when None), checked against D."""
    A = torch.as_tensor(A, dtype=F64)
    if not (A.ndim == 2 and A.shape[1] == D) and not (A.ndim == 1 and A.shape[0] == D):
        raise ValueError(f"A must be an (M, D) matrix or a (D,) diagonal with D = {D}, got shape {tuple(A.shape)}")
    M = A.shape[0]
    b = torch.zeros(M, dtype=F64) if b is None else torch.as_tensor(b, dtype=F64).flatten()
    if b.shape != (M,):
        raise ValueError(f"b must hold M = {M} numbers (A's rows), got {b.numel()}")
    return A, b


def _singular(evals: Tensor) -> Tensor:
    """Per matrix (..., n), whether a symmetric PSD matrix with these eigenvalues is singular to rounding:
    its smallest eigenvalue is within n eps of its largest (the error of a computed eigenvalue)."""
    top = evals.amax(-1).clamp_min(0)
    return evals.amin(-1) <= evals.shape[-1] * EPS64 * top


class FullCovarianceMixture:
    """A mixture of Gaussians with full covariances, in float64: p_0 = sum_k w_k N(m_k, C_k).

    The sibling of ``GaussianMixture`` with the same methods (``sample``, ``log_prob``, ``score``,
    ``responsibilities``, ``x0_mean``, ``denoiser``, ``mean``, ``covariance``), here with
    p_t = sum_k w_k N(alpha m_k, alpha^2 C_k + sigma^2 I) under x_t = alpha x0 + sigma eps. Each C_k is
    diagonalised once, C_k = Q_k diag(lam_k) Q_k^T, so every quantity at time t is a diagonal computation
    in the eigenbasis (alpha^2 C_k + sigma^2 I = Q_k diag(alpha^2 lam_k + sigma^2) Q_k^T). It is what
    ``GaussianMixture.posterior`` returns.

    Args:
        weights: (K,) non-negative, at least one positive; normalised here (a posterior weight may
            underflow to 0).
        means: (K, D).
        covariances: (K, D, D) symmetric positive semi-definite (symmetrised here; rounding-level
            negative eigenvalues are read as 0). Singular ones are allowed: then quantities at sigma > 0
            are defined, and the density of the data (``log_prob`` without a process) only with ``support``.
        shape: the event shape of a sample, default (D,).
        support: optional (D, r) matrix with orthonormal columns: every component lies on the same affine
            subspace {m_k + support z}, of dimension r (e.g. a posterior given A x0 = y exactly). Then
            ``log_prob(x)`` is the density with respect to r-dimensional Lebesgue measure on that subspace,
            at the orthogonal projection of x onto it, and samples are drawn on it.
    """

    def __init__(self, weights, means, covariances, shape: tuple[int, ...] | None = None, *, support=None):
        self.means = torch.as_tensor(means, dtype=F64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        K, D = self.means.shape
        w = torch.as_tensor(weights, dtype=F64).flatten()
        if w.shape != (K,) or bool((w < 0).any()) or not float(w.sum()) > 0 or not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be {K} non-negative numbers, not all 0, got {w.tolist()}")
        self.weights = w / w.sum()
        self.log_weights = torch.log(self.weights)
        C = torch.as_tensor(covariances, dtype=F64)
        if C.shape != (K, D, D):
            raise ValueError(f"covariances must have shape (K, D, D) = {(K, D, D)}, got {tuple(C.shape)}")
        self.covariances = (C + C.mT) / 2
        self.shape = tuple(shape) if shape is not None else (D,)
        if math.prod(self.shape) != D:
            raise ValueError(f"shape {self.shape} does not hold D = {D} numbers")
        off = self.covariances - torch.diag_embed(torch.diagonal(self.covariances, dim1=-2, dim2=-1))
        if bool((off == 0).all()):  # diagonal: the eigenbasis is the identity, exactly
            lam = torch.diagonal(self.covariances, dim1=-2, dim2=-1).clone()
            Q = torch.eye(D, dtype=F64).expand(K, D, D).clone()
        else:
            lam, Q = torch.linalg.eigh(self.covariances)
        scale = lam.abs().amax(-1, keepdim=True)
        # refuse a clearly indefinite matrix; the rounding of a computed PSD one (a posterior covariance
        # C - W^T W) leaves negative eigenvalues of order eps |C| cond(S), far below sqrt(eps) |C|
        if bool((lam < -math.sqrt(EPS64) * scale).any()):
            raise ValueError(f"covariances must be positive semi-definite; smallest eigenvalue {float(lam.min())}")
        self._lam, self._Q = lam.clamp_min(0), Q
        self._singular = _singular(self._lam)
        self.support = None
        if support is not None:
            B = torch.as_tensor(support, dtype=F64)
            if B.ndim != 2 or B.shape[0] != D or B.shape[1] > D:
                raise ValueError(f"support must be a (D, r) matrix with r <= D = {D}, got {tuple(B.shape)}")
            err = float((B.T @ B - torch.eye(B.shape[1], dtype=F64)).abs().max()) if B.shape[1] else 0.0
            if err > 8 * D * EPS64:
                raise ValueError(f"support must have orthonormal columns (|B^T B - I| = {err:.2e})")
            self.support = B
        self._support_eig = None

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # -- moments of the data distribution --------------------------------------------------------
    def mean(self) -> Tensor:
        """E[x0] (D,)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x0] (D, D) = sum w_k (C_k + m_k m_k^T) - mean mean^T."""
        m = self.mean()
        second = torch.einsum("k,kde->de", self.weights, self.covariances)
        second = second + torch.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        return second - torch.outer(m, m)

    def marginal(self, process: NoiseProcess, t) -> FullCovarianceMixture:
        """p_t at one time t: means alpha m_k, covariances alpha^2 C_k + sigma^2 I."""
        alpha, sigma = (float(v) for v in process.at(t, torch.zeros(1, dtype=F64)))
        eye = torch.eye(self.dim, dtype=F64)
        return FullCovarianceMixture(
            self.weights, alpha * self.means, alpha**2 * self.covariances + sigma**2 * eye, self.shape
        )

    def affine(self, A, b=None, *, shape=None, support=None) -> FullCovarianceMixture:
        """The exact push-forward of this mixture under z = A x + b: sum_k w_k N(A m_k + b, A C_k A^T).

        An affine image of a Gaussian is Gaussian with mean A m + b and covariance A C A^T (Bishop 2006, PRML
        eq. 2.115 with zero noise, L^{-1} = 0), and mapping each draw commutes with choosing its component, so the
        weights are unchanged. With a linear encoder z = P^T (x - mu) this is the exact latent distribution of
        latent diffusion (Rombach et al. 2022, Sec. 3), hence its exact latent denoiser (``denoiser``).

        Args:
            A: (M, D) matrix, or (D,) the diagonal of a diagonal one.
            b: M numbers (any shape), default 0.
            shape: the event shape of z, default this mixture's shape when M = D, else (M,).
            support: passed to the result (see the class); give the image's affine subspace when A has rank
                below M (e.g. a projection), whose covariances are then singular. This mixture's own
                ``support`` is not carried over.
        """
        A, b = _affine_args(A, b, self.dim)
        A = torch.diag(A) if A.ndim == 1 else A
        M = A.shape[0]
        shape = shape if shape is not None else (self.shape if M == self.dim else (M,))
        covs = A @ self.covariances @ A.T
        return FullCovarianceMixture(self.weights, self.means @ A.T + b, covs, shape, support=support)

    # -- sampling --------------------------------------------------------------------------------
    def sample(
        self, n: int, *, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """n exact samples (n, *shape), x = m_k + Q_k diag(sqrt(lam_k)) z (on the support if given)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        if self.support is None:
            z = torch.randn(n, self.dim, generator=generator, dtype=F64)
            basis, lam = self._Q, self._lam
        else:
            basis, lam = self._support_basis()
            z = torch.randn(n, lam.shape[1], generator=generator, dtype=F64)
        x = self.means[k].clone()
        for j in torch.unique(k).tolist():  # one matrix product per component, not an (n, D, D) gather
            sel = k == j
            x[sel] += (lam[j].sqrt() * z[sel]) @ basis[j].T
        x = x.reshape(n, *self.shape)
        return (x, k) if return_labels else x

    # -- the marginal p_t ------------------------------------------------------------------------
    def _alpha_sigma(self, process: NoiseProcess | None, t, x: Tensor):
        """Per-example alpha, sigma (B, 1) and flattened x (B, D), float64."""
        xf = x.reshape(x.shape[0], -1).to(F64)
        if xf.shape[1] != self.dim:
            raise ValueError(f"x has {xf.shape[1]} numbers per example, the mixture has D = {self.dim}")
        if process is None:
            one = torch.ones(xf.shape[0], 1, dtype=F64, device=xf.device)
            return one, torch.zeros_like(one), xf
        alpha, sigma = process.at(t, xf)
        return alpha, sigma, xf

    def _support_basis(self):
        """Per component, an eigenbasis on the support: (K, D, r) columns support Q_z and (K, r) variances,
        from support^T C_k support = Q_z diag(lam_z) Q_z^T."""
        if self._support_eig is None:
            B = self.support
            lam, Qz = torch.linalg.eigh(B.T @ self.covariances @ B)
            if bool(_singular(lam).any()) and lam.shape[1] > 0:
                raise ValueError("a covariance is singular even on the support: the density does not exist")
            self._support_eig = (B @ Qz, lam)
        return self._support_eig

    def _terms(self, x: Tensor, process: NoiseProcess | None, t):
        """log w_k + log N_k(x) (B, K), and per component the coordinates z (B, K, d) of x's offset in a
        basis P_k (K, D, d) where the covariance is diag(var) (B, K, d); also alpha (B, 1)."""
        alpha, sigma, xf = self._alpha_sigma(process, t, x)
        dev = xf.device
        means = self.means.to(dev)
        if process is None and self.support is not None:  # the data's density on its support
            basis, lam = (v.to(dev) for v in self._support_basis())
            var = lam.expand(xf.shape[0], *lam.shape)
        elif bool(self._singular.any()) and bool((sigma == 0).any()):
            raise ValueError(
                "a component's covariance is singular, so the density at sigma = 0 does not exist in R^D; "
                "evaluate p_t at sigma > 0, give the mixture a support, or use sigma_y > 0"
            )
        else:
            basis = self._Q.to(dev)
            var = alpha[:, None, :] ** 2 * self._lam.to(dev) + sigma[:, None, :] ** 2
        diff = xf[:, None, :] - alpha[:, None, :] * means  # (B, K, D)
        z = torch.einsum("bkd,kde->bke", diff, basis)
        logn = -0.5 * (z**2 / var + torch.log(var) + LOG_2PI).sum(-1)
        return self.log_weights.to(dev) + logn, z, var, basis, alpha, sigma

    def log_prob(self, x: Tensor, process: NoiseProcess | None = None, t=None) -> Tensor:
        """log p_t(x) (B,), or log p_0(x) when no process is given (on the support, if one is set)."""
        terms, *_ = self._terms(x, process, t)
        return torch.logsumexp(terms, dim=1)

    def responsibilities(self, x: Tensor, process: NoiseProcess | None = None, t=None) -> Tensor:
        """p(component k | x_t) (B, K)."""
        terms, *_ = self._terms(x, process, t)
        return torch.softmax(terms, dim=1)

    def score(self, x: Tensor, process: NoiseProcess | None = None, t=None) -> Tensor:
        """grad_x log p_t(x) = -sum_k r_k (alpha^2 C_k + sigma^2 I)^{-1} (x - alpha m_k), shaped like x."""
        terms, z, var, basis, *_ = self._terms(x, process, t)
        r = torch.softmax(terms, dim=1)[..., None]
        comp = -torch.einsum("bke,kde->bkd", z / var, basis)
        return (r * comp).sum(1).reshape(x.shape)

    def _x0_posterior(self, x: Tensor, process: NoiseProcess, t):
        """Per component, the Gaussian p(x0 | x_t, k) in C_k's eigenbasis: its mean (B, K, D)
        m_k + C_k alpha (alpha^2 C_k + sigma^2 I)^{-1} (x - alpha m_k) and its covariance's eigenvalues
        (B, K, D) lam sigma^2 / (alpha^2 lam + sigma^2); and the log responsibilities (B, K)."""
        if process is None:
            raise ValueError("E[x0 | x_t] needs a process")
        terms, z, var, basis, alpha, sigma = self._terms(x, process, t)
        lam = self._lam.to(z.device)
        mu = self.means.to(z.device) + torch.einsum("bke,kde->bkd", alpha[:, None, :] * lam * z / var, basis)
        post_var = lam * sigma[:, None, :] ** 2 / var
        return mu, post_var, torch.log_softmax(terms, dim=1)

    def x0_mean(self, x: Tensor, process: NoiseProcess, t) -> Tensor:
        """E[x0 | x_t = x], shaped like x: the per-component Gaussian posterior means
        m_k + C_k alpha (alpha^2 C_k + sigma^2 I)^{-1} (x - alpha m_k), weighted by responsibility."""
        mu, _, logr = self._x0_posterior(x, process, t)
        return (logr.exp()[..., None] * mu).sum(1).reshape(x.shape)

    def denoiser(self, process: NoiseProcess):
        """The exact denoiser D(x, t) = E[x0 | x_t], returned in x's dtype."""

        def denoise(x: Tensor, t: Tensor, **cond) -> Tensor:
            return self.x0_mean(x, process, t).to(x.dtype)

        return denoise

    # -- measurements ----------------------------------------------------------------------------
    def _condition(self, measurement: Measurement):
        """Bayes' rule per component for one observation: the posterior mixture and log p(y)."""
        At, yt, sy, log_perp = _reduce(measurement, self.shape)
        if measurement.batch != 1:
            raise ValueError(
                f"the exact posterior is for one observation; y holds a batch of {measurement.batch}: "
                "condition on each y[i] separately"
            )
        K, D = self.means.shape
        R = At.shape[0]
        if R == 0:  # A = 0 observes nothing
            post = FullCovarianceMixture(self.weights, self.means, self.covariances, self.shape, support=self.support)
            return post, log_perp[0]
        C, m = self.covariances, self.means
        AC = At @ C  # (K, R, D)
        S = AC @ At.T + sy**2 * torch.eye(R, dtype=F64)  # cov[y~ | k] = A~ C_k A~^T + sigma_y^2 I
        S = (S + S.mT) / 2
        L, info = torch.linalg.cholesky_ex(S)
        if sy == 0:
            # singular to rounding: below R D eps times the size of A~ C_k A~^T's entries (sums of D^2 products)
            lam = torch.linalg.eigvalsh(S)
            bound = R * D * EPS64 * float(At.abs().max()) ** 2 * self._lam.amax(-1)
            info = info + (lam[:, 0] <= bound).to(info.dtype)
        if bool((info != 0).any()):
            k = int(torch.nonzero(info)[0])
            raise ValueError(
                f"A C_k A^T of component {k} is singular and sigma_y = 0: y is observed along a direction where "
                "the component has no variance, so the weights are undefined; use sigma_y > 0"
            )
        W = torch.linalg.solve_triangular(L, AC, upper=False)  # L^{-1} A~ C_k (K, R, D)
        u = torch.linalg.solve_triangular(L, (yt[0] - m @ At.T)[..., None], upper=False)  # L^{-1} (y~ - A~ m_k)
        means = m + (W.mT @ u)[..., 0]  # m_k + C_k A~^T S_k^{-1} (y~ - A~ m_k)
        covs = C - W.mT @ W  # C_k - C_k A~^T S_k^{-1} A~ C_k, symmetric by construction
        logn = -0.5 * (u**2).sum((-2, -1)) - torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1) - R / 2 * LOG_2PI
        logw = self.log_weights + logn  # log w_k + log N(y~; A~ m_k, S_k)
        log_evidence = torch.logsumexp(logw, 0)
        support = self.support
        if sy == 0:
            # exact conditioning: the posterior lives on {x in the prior's support : A~ x = y~}, spanned by the
            # null space of A~ within the support; project the covariances onto it (removing rounding)
            B = torch.eye(D, dtype=F64) if support is None else support
            _, _, Vh = torch.linalg.svd(At @ B, full_matrices=True)
            support = B @ Vh[R:].T
            P = support @ support.T
            covs = P @ covs @ P
        post = FullCovarianceMixture(torch.softmax(logw, 0), means, covs, self.shape, support=support)
        return post, log_evidence + log_perp[0]

    def posterior(self, measurement: Measurement) -> FullCovarianceMixture:
        """The exact posterior p(x0 | y) for one observation y = A x0 + sigma_y n (a batch of one or an
        unbatched y): again a Gaussian mixture. Per component, Bayes' rule for a linear Gaussian model
        (Bishop 2006, PRML eqs. 2.81-2.82 for the jointly Gaussian (x0, y~); 2.115 for p(y)):

            S_k = A C_k A^T + sigma_y^2 I,  G_k = C_k A^T S_k^{-1}
            m_k' = m_k + G_k (y - A m_k),   C_k' = C_k - G_k A C_k,   w_k' proportional to w_k N(y; A m_k, S_k).

        A is replaced by its range part A~ = diag(s) V^T and y by y~ = U^T y (see ``_reduce``), which leaves
        the posterior unchanged and makes S_k invertible for a mask or any rank-deficient A; C_k' is
        computed as C_k - W^T W with W = L^{-1} A~ C_k, S_k = L L^T, so it is symmetric. At sigma_y = 0 the
        posterior is exact conditioning on A x0 = y: it lives on the affine subspace {A x = y} (its
        ``support``, whose log_prob is a density on that subspace); an S_k singular at sigma_y = 0 (a
        component without variance along A) is refused.
        """
        return self._condition(measurement)[0]

    def log_evidence(self, measurement: Measurement) -> Tensor:
        """log p(y) (B_y,) for each observation of the batch: log sum_k w_k N(y; A m_k, S_k). At sigma_y = 0
        a density on range(A) (see ``_reduce``)."""
        m = measurement
        return torch.stack([self._condition(Measurement(m.operator, y, m.sigma_y))[1] for y in m.y])

    def conditional_denoiser(self, process: NoiseProcess, measurement: Measurement):
        """The exact conditional denoiser D(x, t) = E[x0 | x_t = x, y], in x's dtype.

        It is the denoiser of the posterior mixture: x_t = alpha x0 + sigma eps and y = A x0 + sigma_y n use
        independent noises, so x_t and y are conditionally independent given x0, and
        p(x0 | x_t, y) is proportional to p(x_t | x0) p(x0 | y): Tweedie's posterior mean with the prior
        p(x0 | y) in place of p(x0). The posterior is computed once here. With a batch of observations,
        y[i] goes with x[i] (x's batch must then equal y's).
        """
        m = measurement
        posts = [self.posterior(Measurement(m.operator, y, m.sigma_y)) for y in m.y]

        def denoise(x: Tensor, t: Tensor, **cond) -> Tensor:
            if len(posts) == 1:
                return posts[0].x0_mean(x, process, t).to(x.dtype)
            if x.shape[0] != len(posts):
                raise ValueError(f"x holds {x.shape[0]} examples, the measurement {len(posts)} observations")
            tb = t if isinstance(t, Tensor) and t.ndim == 1 else [t] * len(posts)
            out = [p.x0_mean(x[i : i + 1], process, tb[i]) for i, p in enumerate(posts)]
            return torch.cat(out).to(x.dtype)

        return denoise

    def measurement_likelihood(self, x: Tensor, process: NoiseProcess, t, measurement: Measurement) -> Tensor:
        """The exact log p_t(y | x_t = x) (B,), differentiable in x: the likelihood whose gradient guidance
        adds to the score (grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)), and which DPS
        (Chung et al. 2023: p(y | x0 = E[x0 | x_t])) and PiGDM (Song et al. 2023: p(x0 | x_t) replaced by
        N(E[x0 | x_t], r_t^2 I)) approximate.

            p_t(y | x_t) = int p(y | x0) p(x0 | x_t) dx0
                         = sum_k r_k(x_t) N(y; A mu_k(x_t), A P_k(t) A^T + sigma_y^2 I),

        r_k the responsibilities, mu_k and P_k the mean and covariance of the Gaussian p(x0 | x_t, k)
        (``x0_mean``'s per-component terms; P_k = Q_k diag(lam sigma^2 / (alpha^2 lam + sigma^2)) Q_k^T).
        y's batch is 1 (shared by all x) or x's. At sigma_y = 0 it is a density on range(A) (see ``_reduce``).
        """
        At, yt, sy, log_perp = _reduce(measurement, self.shape)
        B = x.shape[0]
        if measurement.batch not in (1, B):
            raise ValueError(f"y holds {measurement.batch} observations; give 1 (shared) or one per x ({B})")
        mu, post_var, logr = self._x0_posterior(x, process, t)
        dev = mu.device
        At, yt, log_perp = At.to(dev), yt.to(dev), log_perp.to(dev)
        R = At.shape[0]
        if R == 0:
            return torch.logsumexp(logr, 1) + log_perp.expand(B)
        e = yt[:, None, :] - mu @ At.T  # (B, K, R): y~ - A~ mu_k
        AQ = At @ self._Q.to(dev)  # (K, R, D)
        # P_k depends on x only through t: one Cholesky per distinct noise level, not per example
        alpha, sigma = process.at(t, x.reshape(B, -1).to(F64))
        levels, which = torch.unique(torch.cat([alpha, sigma], 1), dim=0, return_inverse=True)
        eye = torch.eye(R, dtype=F64, device=dev)
        parts, order = [], []
        for j in range(levels.shape[0]):
            idx = torch.nonzero(which == j).flatten()
            pv = post_var[idx[0]]  # (K, D), the same for every example at this level
            S = (AQ * pv[:, None, :]) @ AQ.mT + sy**2 * eye
            L, info = torch.linalg.cholesky_ex((S + S.mT) / 2)
            if bool((info != 0).any()):
                raise ValueError("A Cov(x0 | x_t) A^T is singular at sigma_y = 0; use sigma_y > 0 or sigma > 0")
            v = torch.linalg.solve_triangular(L, e[idx].permute(1, 2, 0), upper=False)  # (K, R, n)
            half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (K,)
            parts.append(-0.5 * (v**2).sum(1).T - half_logdet - R / 2 * LOG_2PI)  # (n, K)
            order.append(idx)
        logn = torch.cat(parts)[torch.argsort(torch.cat(order))]
        return torch.logsumexp(logr + logn, 1) + log_perp.expand(B)

    def __repr__(self) -> str:
        sup = "" if self.support is None else f", support of dim {self.support.shape[1]}"
        return f"FullCovarianceMixture(K={len(self.weights)}, D={self.dim}, shape={self.shape}{sup})"
