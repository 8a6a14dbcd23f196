"""Exact ground truth: a Gaussian mixture stays a Gaussian mixture under every process.

If p_0 = sum_k w_k N(m_k, diag(v_k)), then under x_t = alpha x0 + sigma eps

    p_t = sum_k w_k N(alpha m_k, diag(alpha^2 v_k + sigma^2)),

so its log-density, its score and the posterior mean E[x0 | x_t] (Tweedie's denoiser) are
exact in closed form. Every sampler, likelihood and guidance routine can therefore be run
against the truth without training anything.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .process import NoiseProcess

__all__ = ["GaussianMixture"]


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

    def __repr__(self) -> str:
        return f"GaussianMixture(K={len(self.weights)}, D={self.dim}, shape={self.shape})"
