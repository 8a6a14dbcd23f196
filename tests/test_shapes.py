"""The coloured-shapes image set (``data.shapes``): its labels must describe its images.

Every image is background + coverage * (colour - background), so the coverage w of each pixel can be read back
from the image through the labelled colour, and the shape's area is the total coverage. The expected area has a
closed form (module docstring of ``data.shapes``): with pixel coverage clamp(1/2 - d, 0, 1) and a signed distance
d whose sublevel sets {d < t} are the shape grown by t,

    total coverage = integral_{-1/2}^{1/2} N(t) dt,   N(t) = number of pixel centres in the grown shape K_t,

and a centre with a uniform sub-pixel offset gives E N(t) = area(K_t), exactly. The areas of the grown shapes
(r the half-size; a = 2r/5 the plus's half-arm; rho = 2r / (1 + sqrt 5) the triangle's inradius):

    circle   pi (r + t)^2                  -> integral = pi r^2 + pi / 12
    square   4 (r + t)^2                   -> 4 r^2 + 1/3
    triangle 2 r^2 (1 + t / rho)^2         -> 2 r^2 (1 + 1 / (12 rho^2))
    plus     4 (a + t)(2r - a + t)         -> 4 a (2r - a) + 1/3

For one convex image the lattice-point count obeys Nosarzewska's and Bokowski-Hadwiger-Wills' inequalities,
area - P/2 < N < area + P/2 + 1 (P the perimeter), so the total coverage is within (-P/2, P/2 + 1) of the
integral above: the "edge length times half a pixel" tolerance. The mean over many images is unbiased and is
held to Z standard errors; a circle drawn as a square (or any swap of the shape table) misses by ~(4 - pi) r^2,
tens of standard errors.
"""

import math

import pytest
import torch

from conftest import Z
from torchdiffusion.data import IMAGE_DATASETS, load_images
from torchdiffusion.data.shapes import (
    BACKGROUND,
    COLOURS,
    PLUS_ARM,
    SHAPES,
    draw_shapes,
    load_shapes,
    make_shapes,
    shape_params,
)

BG = 2 * BACKGROUND - 1
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float64) * 2 - 1  # (k, 3) in [-1, 1]
K = len(SHAPES) * len(COLOURS)
EPS = torch.finfo(torch.float32).eps


def expected_area(shape: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """integral_{-1/2}^{1/2} area(K_t) dt for each image (module docstring), float64."""
    a, rho = PLUS_ARM * r, 2 * r / (1 + math.sqrt(5))
    table = torch.stack(
        [
            math.pi * r**2 + math.pi / 12,
            4 * r**2 + 1 / 3,
            2 * r**2 * (1 + 1 / (12 * rho**2)),
            4 * a * (2 * r - a) + 1 / 3,
        ]
    )  # (4, n)
    return table.gather(0, shape[None])[0]


def perimeter(shape: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.stack([2 * math.pi * r, 8 * r, (2 + 2 * math.sqrt(5)) * r, 8 * r]).gather(0, shape[None])[0]


def coverage(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """w (n, H, W) read back through the labelled colour's channel at 1 (each colour has one): x = bg + w (1 - bg)."""
    col = PALETTE[colour]  # (n, 3)
    ch = col.argmax(1)
    x = x.double()
    w = (x[torch.arange(len(x)), ch] - BG) / (1 - BG)
    # every channel must be the same mix of background and the labelled colour
    again = (1 - w[:, None]) * BG + w[:, None] * col[:, :, None, None]
    assert (x - again).abs().max() <= 4 * EPS
    return w


@pytest.fixture(scope="module", params=[16, 32])
def drawn(request):
    size = request.param
    p = shape_params(3000, size, seed=1)
    x, c = make_shapes(3000, size, seed=1, return_labels="class")
    return size, p, x, c


def test_shape_dtype_range_and_label_kinds(drawn):
    size, p, x, c = drawn
    assert x.shape == (3000, 3, size, size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() == 1  # a fully covered pixel is exactly its colour
    assert c.dtype == torch.int64 and c.shape == (3000,) and 0 <= c.min() and c.max() < K
    _, s = make_shapes(3000, size, seed=1, return_labels="shape")
    _, col = make_shapes(3000, size, seed=1, return_labels="colour")
    _, default = make_shapes(3000, size, seed=1, return_labels=True)
    assert torch.equal(c, s * len(COLOURS) + col) and torch.equal(default, c)
    assert torch.equal(s, p["shape"]) and torch.equal(col, p["colour"])
    assert torch.equal(x, draw_shapes(p["shape"], p["colour"], p["r"], p["centre"], size))


def test_a_seed_fixes_the_images_and_another_changes_them():
    a, b = make_shapes(64, 16, seed=3), make_shapes(64, 16, seed=3)
    assert torch.equal(a, b)
    other = make_shapes(64, 16, seed=4)
    assert (a != other).flatten(1).any(1).all()  # every image differs


def test_the_mean_colour_of_the_shape_is_its_labelled_colour(drawn):
    """Pixels that differ from the background are mixes of it and one colour; their mean is nearest that colour
    (a swapped palette row or colour index would make it another one)."""
    _, p, x, _ = drawn
    fg = (x != torch.tensor(BG, dtype=x.dtype)).any(1, keepdim=True)  # (n, 1, H, W); BG rounded as the image is
    mean = (x.double() * fg).sum((2, 3)) / fg.sum((2, 3))  # (n, 3)
    nearest = torch.cdist(mean, PALETTE).argmin(1)
    assert torch.equal(nearest, p["colour"])


def test_each_shape_covers_its_area(drawn):
    """Total coverage vs the closed form of the module docstring: within (-P/2, P/2 + 1) per convex image
    (Nosarzewska 1948; Bokowski, Hadwiger & Wills 1972), and unbiased on average for every shape kind."""
    _, p, x, _ = drawn
    total = coverage(x, p["colour"]).sum((1, 2))
    err = total - expected_area(p["shape"], p["r"])
    per = perimeter(p["shape"], p["r"])
    convex = p["shape"] != SHAPES.index("plus")
    float_slack = 1e-3  # float32 distances: a few eps per pixel, summed over at most 32^2 pixels
    assert (err[convex] > -per[convex] / 2 - float_slack).all() and (err[convex] < per[convex] / 2 + 1).all()
    for k, name in enumerate(SHAPES):
        e = err[p["shape"] == k]
        assert len(e) > 100
        se = e.std() / math.sqrt(len(e))
        assert abs(e.mean()) < Z * se + float_slack, (name, float(e.mean()), float(se))


def test_shapes_lie_inside_the_image(drawn):
    """The shape itself (d < 0, coverage > 1/2) never reaches the outermost pixels; only its antialiased rim may."""
    _, p, x, _ = drawn
    w = coverage(x, p["colour"])
    ring = torch.ones_like(w[0], dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    assert (w[:, ring] < 0.5).all()


def test_classes_are_balanced():
    """Class, shape and colour counts are binomial(n, 1/m): within Z standard errors of n / m."""
    n = 20000
    p = shape_params(n, 16, seed=2)  # make_shapes's labels are these (test_shape_dtype_range_and_label_kinds)
    labels = {"class": p["shape"] * len(COLOURS) + p["colour"], "shape": p["shape"], "colour": p["colour"]}
    for kind, m in (("class", K), ("shape", len(SHAPES)), ("colour", len(COLOURS))):
        y = labels[kind]
        counts = torch.bincount(y, minlength=m).double()
        assert len(counts) == m
        se = math.sqrt(n * (1 / m) * (1 - 1 / m))
        assert ((counts - n / m).abs() < Z * se).all(), (kind, counts.tolist())


def test_the_built_in_sets_load_by_name():
    assert {"shapes16", "shapes32"} <= set(IMAGE_DATASETS)
    x, y = load_images("shapes16")
    assert x.shape == (8192, 3, 16, 16) and y.shape == (8192,)
    ref, ref_y = make_shapes(8192, 16, seed=0, return_labels="class")
    assert torch.equal(x, ref) and torch.equal(y, ref_y)
    x, y = load_images("shapes32", n=10, seed=5)
    assert torch.equal(x, make_shapes(10, 32, seed=5)) and torch.equal(y, load_shapes(32, 10, seed=5)[1])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="valid choices"):
        make_shapes(4, return_labels="color")
    with pytest.raises(ValueError, match="size must be >= 16"):
        make_shapes(4, 8)
    with pytest.raises(ValueError, match="n must be"):
        make_shapes(-1)
    with pytest.raises(TypeError):
        make_shapes(4, 16.0)


def test_the_config_trains_a_class_conditional_model_that_samples_with_guidance(tmp_path):
    """configs/shapes.yaml (2 steps) gives a class-conditional U-Net with a null class: `sample --class 3
    --guidance 2` runs on it (classifier-free guidance, Ho & Salimans 2022) and writes RGB images."""
    from pathlib import Path

    import numpy as np
    from click.testing import CliRunner

    from torchdiffusion.app.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"
    runner, out = CliRunner(), tmp_path / "run"
    r = runner.invoke(main, ["train", "--config", str(config), "--steps", "2", "--set", "sample_every=0",
                             "--out", str(out), "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    s = tmp_path / "s.npy"
    r = runner.invoke(main, ["sample", "--checkpoint", str(out), "--class", "3", "--guidance", "2", "--sampler",
                             "dpmpp_2m", "--steps", "3", "--n", "4", "--out", str(s), "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert np.load(s).shape == (4, 3, 16, 16) and np.isfinite(np.load(s)).all()
