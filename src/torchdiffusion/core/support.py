"""The data's bounding box, and a denoiser kept inside it.

Why (issue #10, item 3). A network trained on eps sees x_t in the prior's tail (|x| around 4 in 2-D)
a few times in a thousand draws at most, and extrapolates its eps_hat there; the denoiser then
divides the error by alpha(t):

    x0_hat = (x - sigma eps_hat) / alpha,     alpha(t_max) = 0.0066 for VP,

so a 2% error in eps_hat at |x| = 4 is an x0_hat of 60. A stochastic sampler (DDPM) weights
x0_hat by a tiny posterior coefficient there and its noise washes the error out; a deterministic
sampler (DDIM, Euler, Heun, DPM-Solver, UniPC) follows x0_hat and carries the sample off the data
(max |x| 37-51 on a trained two-moons model, 0.12-0.14% of the samples).

The fix is exact, not a heuristic. The ideal denoiser E[x0 | x_t] is a mean of data points, so it
lies in the convex hull of the data, which lies in the data's bounding box B. The Euclidean
projection P onto a closed convex set is non-expansive towards every point of that set:
|P(a) - b| <= |a - b| for b in B. Hence clamping a network's x0_hat to B never moves it further
from the ideal denoiser (of the training set, whose hull is inside the box of the training
data), and it removes the tail's runaway predictions. It is the per-coordinate form of what
DDPM's code and diffusers call ``clip_sample`` for images in [-1, 1] (Ho et al. 2020, the
"clip x0 to [-1, 1]" of their sampler code; Saharia et al. 2022, Sec. 2.3, static thresholding).

``train`` records the box of the training data in the checkpoint (``config["data_box"]``: per
coordinate for points, one interval for images) and ``checkpoint.load_denoiser`` applies it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["data_box", "ClippedDenoiser", "clip_denoiser", "ThresholdedDenoiser"]


def data_box(data: Tensor) -> tuple[list[float], list[float]]:
    """``(low, high)`` of the data: per coordinate for points (N, D); one value each for images (N, C, H, W).

    Images share one interval (their pixel range) so a checkpoint's config stays small.
    """
    if data.ndim == 2:
        return data.amin(0).tolist(), data.amax(0).tolist()
    return [float(data.min())], [float(data.max())]


class ClippedDenoiser(nn.Module):
    """``denoiser`` with x0_hat clamped to the box [low, high] (a denoiser -> denoiser map).

    Args:
        denoiser: any ``denoiser(x, t, **cond) -> x0_hat``.
        low, high: the box, as (D,) per-coordinate bounds for points (B, D), or one value each
            (applied to every element, e.g. an image's pixel range).
    """

    def __init__(self, denoiser, low, high):
        super().__init__()
        low, high = torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64)
        if low.shape != high.shape or low.ndim > 1 or not bool((low <= high).all()):
            raise ValueError(f"a box needs low <= high of one shape, got low {low.tolist()} and high {high.tolist()}")
        self.denoiser = denoiser
        self.register_buffer("low", low.flatten(), persistent=False)
        self.register_buffer("high", high.flatten(), persistent=False)

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        x0_hat = self.denoiser(x, t, **cond)
        if self.low.numel() == 1:
            return x0_hat.clamp(float(self.low), float(self.high))
        if x0_hat.ndim != 2 or x0_hat.shape[1] != self.low.numel():
            raise ValueError(
                f"the box has {self.low.numel()} coordinates but the denoiser returned shape {tuple(x0_hat.shape)}"
            )
        return torch.clamp(x0_hat, self.low.to(x0_hat), self.high.to(x0_hat))


def clip_denoiser(denoiser, low, high) -> ClippedDenoiser:
    """``denoiser`` whose x0_hat is projected onto the box [low, high] (see the module docstring)."""
    return ClippedDenoiser(denoiser, low, high)


class ThresholdedDenoiser(nn.Module):
    """``denoiser`` with dynamic thresholding of x0_hat (Saharia et al. 2022, Sec. 2.3, "dynamic thresholding").

    Per example, s = the ``ratio`` quantile of |x0_hat| over its elements, clamped to [1, ``max_value``]; then
    x0_hat <- clamp(x0_hat, -s, s) / s. Where s = 1 this is static clipping to [-1, 1]; above, saturated
    pixels are pushed inwards. It is not a projection (the division by s moves every prediction), so unlike
    ``ClippedDenoiser`` it can move x0_hat away from the ideal denoiser: it is here because diffusers
    schedulers configured with ``thresholding=True`` apply it, and a model loaded from one must sample as
    there (``interop.diffusers``).
    """

    def __init__(self, denoiser, ratio: float = 0.995, max_value: float = 1.0):
        super().__init__()
        if not 0 < ratio <= 1 or not max_value >= 1:
            raise ValueError(f"dynamic thresholding needs 0 < ratio <= 1 and max_value >= 1, got {ratio}, {max_value}")
        self.denoiser, self.ratio, self.max_value = denoiser, float(ratio), float(max_value)

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        x0_hat = self.denoiser(x, t, **cond)
        flat = x0_hat.reshape(len(x0_hat), -1)
        s = torch.quantile(flat.abs().float(), self.ratio, dim=1).clamp(1.0, self.max_value).to(x0_hat.dtype)
        s = s.view(-1, *([1] * (x0_hat.ndim - 1)))
        return torch.maximum(torch.minimum(x0_hat, s), -s) / s
