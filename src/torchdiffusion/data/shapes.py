"""Coloured shapes: a built-in RGB image set, drawn from a seed (nothing downloaded).

Each image holds one shape (:data:`SHAPES`) filled with one saturated colour (:data:`COLOURS`) on a dark
neutral background (:data:`BACKGROUND`), at a random position and size, entirely inside the image. Labels:
the shape index s, the colour index c, and the class ``s * len(COLOURS) + c`` (24 classes). A small U-Net
learns it in minutes on a CPU (``configs/shapes.yaml``); the colours make it a test bed for colorization.

Geometry, in pixel units with pixel (i, j) centred at (j + 1/2, i + 1/2) and a half-size r:

    circle    radius r                                          area pi r^2
    square    side 2r, axis-aligned                             area 4 r^2
    triangle  base 2r (bottom), apex 2r above it (top centre)   area 2 r^2
    plus      two 2r x 2a bars crossing at the centre, a = 2r/5   area 4 (2 r a - a^2)

Antialiasing: a pixel at signed distance d from the edge (negative inside) is covered by
``clamp(1/2 - d, 0, 1)``, the box filter of a straight edge along a pixel axis. d is the Euclidean distance for
the circle, the largest signed distance to the edge lines for the square and the triangle, and the smaller of the
two bars' for the plus, so the set {d < t} is the shape with every edge moved outwards by t (inwards for t < 0),
a grown copy of it of area area(t). Since
``clamp(1/2 - d, 0, 1) = integral over t in [-1/2, 1/2] of 1[d < t]``, an image's total coverage is the average
over t of the number of pixel centres in the grown shape; the centre's sub-pixel offset is uniform, so that
number's mean is the grown shape's area (the mean lattice-point count of a randomly translated set), and

    E[total coverage] = integral_{-1/2}^{1/2} area(t) dt = area + 1/3 (square, plus)
                        = area (1 + 1 / (12 rho^2))   (circle, triangle; rho the inradius, r for the circle)

which ``tests/test_shapes.py`` checks. Only integer draws decide the labels, and a ``torch.Generator`` on the
CPU makes them, so one seed gives the same labels on every machine.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

__all__ = ["SHAPES", "COLOURS", "BACKGROUND", "make_shapes", "load_shapes", "shape_params", "draw_shapes"]

SHAPES = ("circle", "square", "triangle", "plus")
# name -> RGB in [0, 1]; the primaries and secondaries, so the channel mean (gray) is 1/3 or 2/3 for all
COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
BACKGROUND = 0.1  # dark gray, in [0, 1]; in the images (values in [-1, 1]) it is 2 * 0.1 - 1 = -0.8
PLUS_ARM = 0.4  # the plus's bars are 2a = 2 * PLUS_ARM * r wide
SIZE_RANGE = (0.2, 0.34)  # r / image side, uniform in this range
MARGIN = 1.25  # pixels between the shape's box and the image border: the triangle's apex grows by 1.12 px at d = 1/2
LABEL_KINDS = ("shape", "colour", "class")


def _signed_distance(shape: Tensor, r: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """d (pixels, negative inside) at offsets (dx, dy) (n, H, W) from each shape's centre; shape, r: (n, 1, 1)."""
    ax, ay = dx.abs(), dy.abs()
    circle = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(ax, ay) - r
    # triangle with base y = +r (image y grows downwards) and apex (0, -r): the legs' outward normals
    # are (+-2, -1) / sqrt 5 through the apex
    leg = (2 * ax - (dy + r)) / math.sqrt(5)
    triangle = torch.maximum(dy - r, leg)
    a = PLUS_ARM * r
    plus = torch.minimum(torch.maximum(ax - r, ay - a), torch.maximum(ax - a, ay - r))
    d = torch.where(shape == 0, circle, square)
    d = torch.where(shape == 2, triangle, d)
    return torch.where(shape == 3, plus, d)


def shape_params(n: int, size: int = 16, *, seed: int = 0) -> dict[str, Tensor]:
    """The random geometry of :func:`make_shapes`: a CPU ``torch.Generator`` seeded with ``seed`` draws the classes
    (uniform over the ``len(SHAPES) * len(COLOURS)`` classes), then the half-sizes r (uniform on
    ``SIZE_RANGE * size``), then the centres.

    Returns:
        ``{"shape": (n,) int64, "colour": (n,) int64, "r": (n,) float64, "centre": (n, 2) float64 (x, y)}``.
    """
    n, size = operator.index(n), operator.index(size)  # rejects 16.0 instead of silently truncating
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 16:
        raise ValueError(f"size must be >= 16 (smaller shapes alias away), got {size}")
    g = torch.Generator().manual_seed(seed)
    k = len(COLOURS)
    cls = torch.randint(0, len(SHAPES) * k, (n,), generator=g)
    r = size * (SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * torch.rand(n, generator=g, dtype=torch.float64))
    # The centre is uniform on [lo, lo + floor(hi - lo)): an interval of whole pixels, so its sub-pixel offset is
    # exactly uniform (what makes the mean coverage equal the area, module docstring); hi - lo >= 1 for r <= 0.34
    # size at size >= 16.
    lo = r + MARGIN
    span = torch.floor(size - 2 * lo)
    centre = lo[:, None] + span[:, None] * torch.rand(n, 2, generator=g, dtype=torch.float64)
    return {"shape": cls // k, "colour": cls % k, "r": r, "centre": centre}


def draw_shapes(shape: Tensor, colour: Tensor, r: Tensor, centre: Tensor, size: int) -> Tensor:
    """Antialiased images (n, 3, size, size) in [-1, 1] of the given shapes (n,), colours (n,), half-sizes r (n,)
    and centres (n, 2) (x, y in pixels), with the coverage ``clamp(1/2 - d, 0, 1)`` of the module docstring."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    dx = grid[None, None, :] - centre[:, 0, None, None].float()  # (n, 1, W)
    dy = grid[None, :, None] - centre[:, 1, None, None].float()  # (n, H, 1)
    dx, dy = torch.broadcast_tensors(dx, dy)
    d = _signed_distance(shape[:, None, None], r.float()[:, None, None], dx, dy)
    coverage = (0.5 - d).clamp_(0.0, 1.0)[:, None]  # (n, 1, H, W)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) * 2 - 1  # (k, 3) in [-1, 1]
    # (1 - w) bg + w colour, not bg + w (colour - bg): exact colours where w = 1, so the maximum is 1.0 exactly
    return (1 - coverage) * (2 * BACKGROUND - 1) + coverage * palette[colour][:, :, None, None]


def make_shapes(
    n: int,
    size: int = 16,
    *,
    seed: int = 0,
    return_labels: bool | str = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``n`` images of one coloured shape each (see the module docstring), drawn from ``seed``.

    Args:
        n: number of images.
        size: side in pixels (16 and 32 are the built-in sets; any size >= 16 works).
        seed: the geometry's seed (:func:`shape_params`).
        return_labels: False for the images alone; ``"class"`` (or True) for ``s * len(COLOURS) + c``,
            ``"shape"`` for s (index into :data:`SHAPES`), ``"colour"`` for c (index into :data:`COLOURS`).

    Returns:
        images (n, 3, size, size) float32 in [-1, 1], and labels (n,) int64 if asked.
    """
    kind = "class" if return_labels is True else return_labels
    if kind is not False and kind not in LABEL_KINDS:
        raise ValueError(f"return_labels={return_labels!r}; valid choices: False, True, {', '.join(LABEL_KINDS)}")
    p = shape_params(n, size, seed=seed)
    images = draw_shapes(p["shape"], p["colour"], p["r"], p["centre"], size)
    if kind is False:
        return images
    labels = {"class": p["shape"] * len(COLOURS) + p["colour"], "shape": p["shape"], "colour": p["colour"]}
    return images, labels[kind]


def load_shapes(size: int = 16, n: int = 8192, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The built-in sets ``shapes16`` / ``shapes32``: ``(images (n, 3, size, size), class labels (n,))``."""
    return make_shapes(n, size, seed=seed, return_labels="class")
