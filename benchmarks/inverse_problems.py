"""The inverse problems of ``bench_inverse.py``: Gaussian-mixture priors whose posteriors are known exactly.

Each ``Problem`` holds a prior (float64, ``FullCovarianceMixture``), one observation ``Measurement(A, y, sigma_y)``
with y of batch 1, and the exact posterior ``prior.posterior(measurement)``. The observation is chosen (seeded) so
that the posterior keeps several components (``_observe``): a problem whose answer is one Gaussian would not test
whether a sampler finds every mode with its weight.

Every component lies well inside [-1, 1] (means and 4 standard deviations): the anchors' image defaults (clipping
x0 to [-1, 1], clamping) must not bind, or they would be measured against a problem they were not built for.

Cases (issue #12, item 4):
    ring2d-s0, ring2d-s05   8 Gaussians on a ring of radius 0.6 (std 0.04); the first coordinate observed
                            (a 2-D inpainting mask) at y = 0.6 cos(pi/4), sigma_y = 0 and 0.05: two modes
    mix8d-r1, -r2, -r4      8-D mixture of 6 full-covariance components; 1, 2, 4 random Gaussian rows (unit norm),
                            sigma_y = 0.05
    img8-pixels             64-D (1, 8, 8) mixture of 4 smooth-image components: half the pixels kept at random
    img8-box                the centre 4x4 box hidden (inpainting)
    img8-outpaint           only the centre 4x4 box kept (outpainting)
    img8-sr2                2x super-resolution (2x2 average pooling to 4x4), sigma_y = 0.05
The masks are noiseless (sigma_y = 0), as inpainting is usually posed (RePaint, projection and DDNM assume it).

``exact_x0(problem, x, alpha, sigma)`` is the exact denoiser E[x0 | x_t = x] under x_t = alpha x0 + sigma eps for
any alpha, sigma (scalars or per-example (B,) tensors): every library's process is of that form, so each anchor
gets the exact denoiser in its own parameterisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchdiffusion import EDM
from torchdiffusion.core.measurements import Dense, Downsample, LinearOperator, Mask, Measurement, Outpaint
from torchdiffusion.core.mixture import FullCovarianceMixture

F64 = torch.float64
_EDM = EDM()

__all__ = ["Problem", "make_problems", "exact_x0", "CASES"]


@dataclass
class Problem:
    """One benchmark case: the prior, one observation and its exact posterior."""

    name: str
    prior: FullCovarianceMixture
    measurement: Measurement
    posterior: FullCovarianceMixture = field(init=False)

    def __post_init__(self):
        self.posterior = self.prior.posterior(self.measurement)

    @property
    def shape(self) -> tuple[int, ...]:
        """The event shape of one example: (2,), (8,) or (1, 8, 8)."""
        return self.prior.shape

    @property
    def operator(self) -> LinearOperator:
        return self.measurement.operator

    @property
    def y(self) -> Tensor:
        """The observation, batch 1: (1, *out_shape), float64."""
        return self.measurement.y

    @property
    def sigma_y(self) -> float:
        return float(self.measurement.sigma_y)

    @property
    def is_mask(self) -> bool:
        """A (possibly outpainting) mask: what RePaint and inpainting pipelines accept."""
        return isinstance(self.operator, Mask)

    def mask(self) -> Tensor:
        """The 0/1 keep-mask, shaped like one example (float64); only for ``is_mask``."""
        if not self.is_mask:
            raise ValueError(f"{self.name}: the operator is {type(self.operator).__name__}, not a mask")
        return self.operator.mask.to(F64).reshape(self.shape)


def exact_x0(problem: Problem, x: Tensor, alpha, sigma) -> Tensor:
    """E[x0 | x_t = x] for x_t = alpha x0 + sigma eps (the prior's, not the posterior's), in x's dtype.

    x_t / alpha = x0 + (sigma / alpha) eps is the EDM state at t = sigma / alpha, so the EDM denoiser there is
    the denoiser of every (alpha, sigma) process. alpha, sigma: floats or tensors of shape (B,) or broadcastable.
    """
    B = x.shape[0]
    a = torch.as_tensor(alpha, dtype=F64).reshape(-1)
    s = torch.as_tensor(sigma, dtype=F64).reshape(-1)
    a, s = a.expand(B) if a.numel() == 1 else a, s.expand(B) if s.numel() == 1 else s
    xe = x.to(F64) / a.reshape(B, *[1] * (x.ndim - 1)).to(x.device)
    return problem.prior.x0_mean(xe, _EDM, (s / a).to(x.device)).to(x.dtype)


def _observe(prior: FullCovarianceMixture, op: LinearOperator, sigma_y: float, seed: int) -> Measurement:
    """The observation of the candidate with the most uncertain posterior component among 32 seeded ones.

    A typical draw of a separated mixture is identified by its measurement (one posterior weight near 1), and
    the weight error would then measure nothing. Each candidate x0 is the midpoint of draws of two distinct
    components, so its measurement can fit both; the one whose posterior weights have the largest entropy is kept.
    """
    g = torch.Generator().manual_seed(seed)
    best, best_h = None, -1.0
    for _ in range(32):
        xs, ks = prior.sample(2, generator=g, return_labels=True)
        if ks[0] == ks[1]:
            continue
        y = op(0.5 * (xs[:1] + xs[1:]))
        if sigma_y > 0:
            y = y + sigma_y * torch.randn(y.shape, generator=g, dtype=F64)
        m = Measurement(op, y, sigma_y)
        w = prior.posterior(m).weights
        h = float(-(w * w.clamp_min(1e-300).log()).sum())
        if h > best_h:
            best, best_h = m, h
    return best


def ring2d() -> FullCovarianceMixture:
    ang = torch.arange(8, dtype=F64) * (2 * math.pi / 8)
    means = 0.6 * torch.stack([ang.cos(), ang.sin()], 1)
    return FullCovarianceMixture(torch.ones(8), means, 0.04**2 * torch.eye(2, dtype=F64).expand(8, 2, 2))


def mix8d() -> FullCovarianceMixture:
    g = torch.Generator().manual_seed(8)
    K, D = 6, 8
    means = torch.rand(K, D, generator=g, dtype=F64) - 0.5
    Q, _ = torch.linalg.qr(torch.randn(K, D, D, generator=g, dtype=F64))
    std = 0.02 + 0.06 * torch.rand(K, D, generator=g, dtype=F64)
    covs = Q @ torch.diag_embed(std**2) @ Q.mT
    w = 0.5 + torch.rand(K, generator=g, dtype=F64)
    return FullCovarianceMixture(w, means, covs)


def img8() -> FullCovarianceMixture:
    """4 components on 8x8: smooth random mean images (amplitude 0.3) and a squared-exponential covariance
    (length 1.5 pixels, std 0.08) plus a small white part (std 0.01), so neighbouring pixels inform each other."""
    g = torch.Generator().manual_seed(64)
    K, H = 4, 8
    ij = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij"), -1).reshape(-1, 2).to(F64)
    d2 = ((ij[:, None] - ij[None]) ** 2).sum(-1)
    kern = torch.exp(-d2 / (2 * 1.5**2))
    L = torch.linalg.cholesky(kern + 1e-9 * torch.eye(H * H, dtype=F64))
    raw = torch.randn(K, H * H, generator=g, dtype=F64) @ L.T  # smooth random fields
    means = 0.3 * raw / raw.abs().amax(1, keepdim=True)
    scale = 0.5 + torch.rand(K, generator=g, dtype=F64)  # per-component texture strength
    covs = (0.08 * scale[:, None, None]) ** 2 * kern + 0.01**2 * torch.eye(H * H, dtype=F64)
    return FullCovarianceMixture(torch.ones(K), means, covs, shape=(1, H, H))


def _rows(m: int, seed: int) -> Dense:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, 8, generator=g, dtype=F64)
    return Dense(A / A.norm(dim=1, keepdim=True))


def _pixels(seed: int) -> Mask:
    g = torch.Generator().manual_seed(seed)
    keep = (torch.randperm(64, generator=g) < 32).to(F64).reshape(1, 8, 8)
    return Mask(keep, shape=(1, 8, 8))


def _box() -> Mask:
    keep = torch.ones(1, 8, 8, dtype=F64)
    keep[:, 2:6, 2:6] = 0
    return Mask(keep, shape=(1, 8, 8))


# name -> (prior builder, operator builder, sigma_y, seed of the observation)
CASES = {
    "ring2d-s0": (ring2d, lambda: Mask(torch.tensor([1.0, 0.0], dtype=F64)), 0.0, 1),  # y: see make_problems
    "ring2d-s05": (ring2d, lambda: Mask(torch.tensor([1.0, 0.0], dtype=F64)), 0.05, 1),
    "mix8d-r1": (mix8d, lambda: _rows(1, 11), 0.05, 2),
    "mix8d-r2": (mix8d, lambda: _rows(2, 12), 0.05, 3),
    "mix8d-r4": (mix8d, lambda: _rows(4, 14), 0.05, 4),
    "img8-pixels": (img8, lambda: _pixels(21), 0.0, 5),
    "img8-box": (img8, _box, 0.0, 6),
    "img8-outpaint": (img8, lambda: Outpaint((1, 8, 8), (4, 4)), 0.0, 7),
    "img8-sr2": (img8, lambda: Downsample(2, shape=(1, 8, 8)), 0.05, 8),
}


def make_problems(names=None) -> dict[str, Problem]:
    """The benchmark's problems (all, or the named ones), built deterministically."""
    names = list(CASES) if names is None else list(names)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown cases {unknown}; choose from {list(CASES)}")
    out = {}
    for n in names:
        prior_fn, op_fn, sy, seed = CASES[n]
        prior, op = prior_fn(), op_fn()
        if n.startswith("ring2d"):  # x = 0.6 cos(pi / 4): the two modes at +-45 degrees fit it equally
            y = torch.tensor([[0.6 * math.cos(math.pi / 4), 0.0]], dtype=F64)
            out[n] = Problem(n, prior, Measurement(op, y, sy))
        else:
            out[n] = Problem(n, prior, _observe(prior, op, sy, seed))
    return out
