"""Sample-quality metrics that need no trained feature network."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.mixture import GaussianMixture

__all__ = ["sliced_wasserstein", "sw_against", "mixture_weight_error", "noise_floor"]


def _quantiles(p: Tensor, n: int) -> Tensor:
    """Empirical quantile function of each column of p (N, P) at n mid-point levels (n, P)."""
    p = p.sort(dim=0).values
    if p.shape[0] == n:
        return p
    levels = (torch.arange(n, dtype=p.dtype, device=p.device) + 0.5) / n
    return torch.quantile(p, levels, dim=0)


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, n_projections: int = 512, p: int = 2, generator: torch.Generator | None = None
) -> float:
    """Sliced p-Wasserstein distance between two samples (Rabin et al. 2011; Bonneel et al. 2015).

    SW_p(x, y)^p = E_theta W_p^p(theta.x, theta.y) over uniform directions theta on the sphere;
    each 1-d W_p is computed exactly from sorted projections (or matched quantiles when the two
    sample sizes differ). Args: x (N, ...), y (M, ...). Returns SW_p as a float.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples have different dimensions: {x.shape[1]} and {y.shape[1]}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)  # fixed directions: the metric is repeatable
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    n = min(x.shape[0], y.shape[0])
    qx, qy = _quantiles(x @ theta, n), _quantiles(y @ theta, n)
    return float(((qx - qy).abs() ** p).mean() ** (1 / p))


def sw_against(samples: Tensor, references: list[Tensor], **kwargs) -> float:
    """Mean sliced Wasserstein distance of ``samples`` to several independent reference sets.

    One distance between finite samples fluctuates a lot (on 8 Gaussians with n = 2000 it
    varies by 2x between seeds, from the multinomial counts per mode); the mean over several
    reference sets is a steadier figure.
    """
    return sum(sliced_wasserstein(samples, r, **kwargs) for r in references) / len(references)


def noise_floor(references: list[Tensor], **kwargs) -> float:
    """Mean distance between independent exact sets (consecutive pairs): what a perfect sampler scores."""
    if len(references) < 2:
        raise ValueError("the noise floor needs at least two independent reference sets")
    pairs = list(zip(references[:-1], references[1:]))
    return sum(sliced_wasserstein(a, b, **kwargs) for a, b in pairs) / len(pairs)


def mixture_weight_error(samples: Tensor, mixture: GaussianMixture) -> float:
    """Total-variation error of the component frequencies: 1/2 sum_k |freq_k - w_k|.

    Each sample is assigned to its most probable component under the exact mixture.
    """
    k = mixture.responsibilities(samples).argmax(dim=1)
    freq = torch.bincount(k, minlength=len(mixture.weights)).to(torch.float64) / len(k)
    return float(0.5 * (freq - mixture.weights.to(freq)).abs().sum())
