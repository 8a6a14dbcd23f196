"""Built-in 2-D toy distributions.

The shapes follow the toy sets popularised by Grathwohl et al. (2019), "FFJORD: Free-form
Continuous Dynamics for Scalable Reversible Generative Models" (ICLR), and scikit-learn's
``make_moons`` / ``make_circles`` / ``make_swiss_roll``, with two changes:

* every sample is i.i.d. (class labels are drawn at random rather than split n // k per class),
  so a batch of size n is exactly n draws from one fixed density;
* all randomness comes from a ``torch.Generator`` and the raw points are standardised with
  *closed-form* constants: ``x = (x_raw - mu) / s`` where ``mu = E[x_raw]`` and
  ``s = sqrt(E||x_raw - mu||^2 / 2)``. The result has mean exactly 0 and total variance exactly
  2 (as for N(0, I_2)). One isotropic scale keeps each shape undistorted; for the rotationally
  symmetric sets the per-coordinate std is then exactly 1.

Points are computed in float64 on the generator's device and cast to ``dtype`` at the end.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "LABELED_TOY_DATASETS",
    "TOY_DATASETS",
    "checkerboard",
    "circles",
    "eight_gaussians",
    "eight_gaussians_mixture_params",
    "make_2d",
    "moons",
    "pinwheel",
    "swiss_roll",
]

_F64 = torch.float64


def _setup(n: int, generator: torch.Generator | None) -> tuple[int, dict]:
    """Validate ``n`` and return it with the keyword arguments every draw uses."""
    n = operator.index(n)  # rejects floats such as 1e3 instead of silently truncating
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    device = generator.device if generator is not None else torch.device("cpu")
    return n, {"generator": generator, "dtype": _F64, "device": device}


def _uniform(n: int, low: float, high: float, kw: dict) -> Tensor:
    return low + (high - low) * torch.rand(n, **kw)


def _coin(n: int, k: int, kw: dict) -> Tensor:
    """Uniform integer labels in {0, ..., k-1}."""
    return torch.randint(0, k, (n,), generator=kw["generator"], device=kw["device"])


def _out(x: Tensor, labels: Tensor, dtype: torch.dtype, return_labels: bool) -> Tensor | tuple[Tensor, Tensor]:
    """``x`` cast to ``dtype``, with the (n,) int64 component labels when asked for. The labels are the draw
    the points are built from anyway, so asking for them changes no random number and no point."""
    x = x.to(dtype)
    return (x, labels) if return_labels else x


def _no_gen(kw: dict) -> dict:
    """Tensor-factory kwargs (``torch.tensor`` takes no generator)."""
    return {"dtype": kw["dtype"], "device": kw["device"]}


# --- swiss roll -------------------------------------------------------------------------------------
_SR_A, _SR_B = 1.5 * math.pi, 4.5 * math.pi  # t = 1.5 pi (1 + 2u), as in sklearn.make_swiss_roll
_SR_NOISE = 1.0  # FFJORD uses make_swiss_roll(noise=1.0)


def _sr_mean(antiderivative: Callable[[float], float]) -> float:
    """E[f(t)] for t ~ U[a, b], given an antiderivative of f."""
    return (antiderivative(_SR_B) - antiderivative(_SR_A)) / (_SR_B - _SR_A)


_SR_MU = (
    _sr_mean(lambda t: t * math.sin(t) + math.cos(t)),  # E[t cos t]
    _sr_mean(lambda t: math.sin(t) - t * math.cos(t)),  # E[t sin t]
)
# E||x - mu||^2 = E[t^2] + 2 noise^2 - |mu|^2
_SR_SCALE = math.sqrt((_sr_mean(lambda t: t**3 / 3) + 2 * _SR_NOISE**2 - _SR_MU[0] ** 2 - _SR_MU[1] ** 2) / 2)


def swiss_roll(n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """2-D Swiss roll ``(t cos t, t sin t) + N(0, 1)``, ``t ~ U[1.5 pi, 4.5 pi]`` (sklearn / FFJORD).

    Centred by mu = (2, 2 / (3 pi)) and divided by s ~= 6.86 (``_SR_SCALE``, closed form).
    """
    n, kw = _setup(n, generator)
    t = _uniform(n, _SR_A, _SR_B, kw)
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + _SR_NOISE * torch.randn(n, 2, **kw)
    return ((x - torch.tensor(_SR_MU, **_no_gen(kw))) / _SR_SCALE).to(dtype)


# --- two moons --------------------------------------------------------------------------------------
_MOONS_NOISE = 0.1  # FFJORD uses make_moons(noise=0.1)
# Upper moon (cos t, sin t), lower moon (1 - cos t, 0.5 - sin t), t ~ U[0, pi], each with prob 1/2:
# E = (1/2, 1/4), Var_x = 3/4, Var_y = 9/16 - 1/pi, plus noise variance on each coordinate.
_MOONS_MU = (0.5, 0.25)
_MOONS_SCALE = math.sqrt((0.75 + 0.5625 - 1 / math.pi + 2 * _MOONS_NOISE**2) / 2)


def moons(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Two interleaving half circles (sklearn ``make_moons``) with N(0, 0.1^2) noise.

    Centred by mu = (1/2, 1/4), divided by s ~= 0.712 (``_MOONS_SCALE``); std is ~1.22 in x, ~0.71 in y.
    ``return_labels=True``: ``(x, labels)``, label 0 for the upper moon, 1 for the lower one.
    """
    n, kw = _setup(n, generator)
    t = _uniform(n, 0.0, math.pi, kw)
    labels = _coin(n, 2, kw)
    lower = labels.to(_F64)  # 1 for the lower moon
    x = torch.stack([lower + (1 - 2 * lower) * torch.cos(t), 0.5 * lower + (1 - 2 * lower) * torch.sin(t)], 1)
    x = x + _MOONS_NOISE * torch.randn(n, 2, **kw)
    return _out((x - torch.tensor(_MOONS_MU, **_no_gen(kw))) / _MOONS_SCALE, labels, dtype, return_labels)


# --- eight gaussians --------------------------------------------------------------------------------
_EG_RADIUS = 2.0
_EG_STD = 0.2  # 0.1 x radius: modes are well separated but not point-like
# Means on a circle average to 0; per-coordinate variance is radius^2 / 2 + std^2 (mean of cos^2 is 1/2).
_EG_SCALE = math.sqrt(_EG_RADIUS**2 / 2 + _EG_STD**2)


def eight_gaussians_mixture_params() -> tuple[Tensor, Tensor, Tensor]:
    """Exact parameters of the ``"8gaussians"`` mixture, already rescaled, in float64.

    Returns ``(weights (8,), means (8, 2), variances (8, 2))``: equal weights 1/8, means at radius
    2 / s and angles k pi / 4, isotropic per-coordinate variances (0.2 / s)^2, s = sqrt(2.04)
    (``_EG_SCALE``), so the mixture has mean 0 and covariance exactly I_2.
    """
    angles = torch.arange(8, dtype=_F64) * (math.pi / 4)
    means = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * (_EG_RADIUS / _EG_SCALE)
    weights = torch.full((8,), 1 / 8, dtype=_F64)
    variances = torch.full((8, 2), (_EG_STD / _EG_SCALE) ** 2, dtype=_F64)
    return weights, means, variances


def eight_gaussians(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Samples of the mixture returned by :func:`eight_gaussians_mixture_params` (FFJORD "8gaussians").

    ``return_labels=True``: ``(x, labels)``, label k for the Gaussian at angle k pi / 4 (row k of the means).
    """
    n, kw = _setup(n, generator)
    weights, means, variances = (p.to(kw["device"]) for p in eight_gaussians_mixture_params())
    # randint instead of multinomial: multinomial rejects n == 0, and the weights are equal by design.
    k = _coin(n, weights.numel(), kw)
    return _out(means[k] + variances[k].sqrt() * torch.randn(n, 2, **kw), k, dtype, return_labels)


# --- checkerboard -----------------------------------------------------------------------------------
_CB_SCALE = math.sqrt(4 / 3)  # both coordinates are marginally U[-2, 2): variance 16 / 12


def checkerboard(n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform on the 8 dark squares of a 4 x 4 board on [-2, 2)^2 (FFJORD), divided by s = sqrt(4/3)."""
    n, kw = _setup(n, generator)
    x1 = _uniform(n, -2.0, 2.0, kw)
    # Pick one of the two same-parity rows, then shift by one row on odd columns (FFJORD's construction).
    x2 = torch.rand(n, **kw) - 2 * _coin(n, 2, kw).to(_F64) + torch.remainder(torch.floor(x1), 2)
    return (torch.stack([x1, x2], dim=1) / _CB_SCALE).to(dtype)


# --- concentric circles -----------------------------------------------------------------------------
_CI_RADII = (1.0, 0.5)  # make_circles(factor=0.5)
_CI_NOISE = 0.08  # FFJORD uses make_circles(factor=0.5, noise=0.08)
_CI_SCALE = math.sqrt(((_CI_RADII[0] ** 2 + _CI_RADII[1] ** 2) / 2 + 2 * _CI_NOISE**2) / 2)


def circles(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Concentric circles of radii 1 and 0.5 (prob. 1/2 each) plus N(0, 0.08^2) noise (sklearn / FFJORD).

    Divided by s ~= 0.565 (``_CI_SCALE``). ``return_labels=True``: ``(x, labels)``, label 0 for the outer
    circle (radius 1), 1 for the inner one (radius 0.5).
    """
    n, kw = _setup(n, generator)
    labels = _coin(n, 2, kw)
    radius = torch.tensor(_CI_RADII, **_no_gen(kw))[labels]
    theta = _uniform(n, 0.0, 2 * math.pi, kw)
    x = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    return _out((x + _CI_NOISE * torch.randn(n, 2, **kw)) / _CI_SCALE, labels, dtype, return_labels)


# --- pinwheel ---------------------------------------------------------------------------------------
_PW_ARMS, _PW_RADIAL_STD, _PW_TANGENTIAL_STD, _PW_RATE = 5, 0.3, 0.1, 0.25  # FFJORD's settings
# A rotation keeps the norm: E||x||^2 = E[r^2] + E[tau^2] with r ~ N(1, .3^2), tau ~ N(0, .1^2).
# Five equally likely arms make the mean 0 and the covariance isotropic.
_PW_SCALE = math.sqrt((1 + _PW_RADIAL_STD**2 + _PW_TANGENTIAL_STD**2) / 2)


def pinwheel(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Five spiral arms (FFJORD "pinwheel"): a point (r, tau) rotated by 2 pi k / 5 + 0.25 exp(r).

    Divided by s = sqrt(0.55) (``_PW_SCALE``) instead of FFJORD's factor 2. ``return_labels=True``:
    ``(x, labels)``, label k for the arm k.
    """
    n, kw = _setup(n, generator)
    f = torch.randn(n, 2, **kw) * torch.tensor([_PW_RADIAL_STD, _PW_TANGENTIAL_STD], **_no_gen(kw))
    r, tau = f[:, 0] + 1.0, f[:, 1]
    arm = _coin(n, _PW_ARMS, kw)
    angle = arm.to(_F64) * (2 * math.pi / _PW_ARMS) + _PW_RATE * torch.exp(r)
    c, s = torch.cos(angle), torch.sin(angle)
    # Same orientation as FFJORD's einsum("ti,tij->tj", features, rotations).
    x = torch.stack([r * c + tau * s, tau * c - r * s], dim=1)
    return _out(x / _PW_SCALE, arm, dtype, return_labels)


TOY_DATASETS: dict[str, Callable[..., Tensor]] = {
    "swiss_roll": swiss_roll,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "circles": circles,
    "pinwheel": pinwheel,
}

# The sets drawn as a mixture of components, with their number of classes: ``make_2d(..., return_labels=True)``
# gives each point's component as its class label (for class-conditional training and guidance).
LABELED_TOY_DATASETS: dict[str, int] = {"8gaussians": 8, "moons": 2, "circles": 2, "pinwheel": _PW_ARMS}


def make_2d(
    name: str,
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Draw ``n`` points of the built-in dataset ``name`` (a key of :data:`TOY_DATASETS`).

    ``return_labels=True``: ``(x, labels)`` with each point's component as an int64 label in
    0..K-1, for the sets of :data:`LABELED_TOY_DATASETS` (K classes); the points are the same as without it.
    """
    try:
        fn = TOY_DATASETS[name]
    except (KeyError, TypeError):  # TypeError: unhashable name such as a list
        raise ValueError(f"unknown 2-D dataset {name!r}; valid choices: {', '.join(sorted(TOY_DATASETS))}") from None
    if not return_labels:
        return fn(n, generator=generator, dtype=dtype)
    if name not in LABELED_TOY_DATASETS:
        with_labels = ", ".join(f"{k} ({v} classes)" for k, v in sorted(LABELED_TOY_DATASETS.items()))
        raise ValueError(f"the 2-D dataset {name!r} has no class labels; the sets with labels: {with_labels}")
    return fn(n, generator=generator, dtype=dtype, return_labels=True)
