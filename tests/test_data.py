"""Tests for torchdiffusion.data: toy 2-D distributions and array loaders.

Statistical checks use Z standard errors (conftest.Z: two-sided p ~ 2e-9 per check), with the standard
error taken from theory or, for fourth moments, estimated from the same sample.
"""

import math

import numpy as np
import pytest
import torch

from conftest import Z, gen
from torchdiffusion.data import (
    TOY_DATASETS,
    eight_gaussians,
    eight_gaussians_mixture_params,
    load_array,
    load_dataset,
    make_2d,
)

N_STAT = 20_000
NAMES = sorted(TOY_DATASETS)


# --- toy datasets ----------------------------------------------------------------------------------


def test_registry_keys():
    assert set(TOY_DATASETS) == {"swiss_roll", "moons", "8gaussians", "checkerboard", "circles", "pinwheel"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_finite(name, dtype):
    x = make_2d(name, 1000, generator=gen(0), dtype=dtype)
    assert x.shape == (1000, 2) and x.dtype == dtype
    assert torch.isfinite(x).all()
    assert make_2d(name, 0).shape == (0, 2)


@pytest.mark.parametrize("name", NAMES)
def test_bad_n(name):
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_2d(name, -1)
    with pytest.raises(TypeError):
        make_2d(name, 10.0)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_determinism(name):
    a = make_2d(name, 500, generator=gen(7))
    b = make_2d(name, 500, generator=gen(7))
    c = make_2d(name, 500, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(a, TOY_DATASETS[name](500, generator=gen(7)))


@pytest.mark.parametrize("name", NAMES)
def test_standardised_moments(name):
    x = make_2d(name, N_STAT, generator=gen(1), dtype=torch.float64)
    # Each set is built with total variance E||x||^2 = 2, so no coordinate variance exceeds 2.
    assert (x.mean(0).abs() < Z * math.sqrt(2.0 / N_STAT)).all(), x.mean(0)
    std = x.std(0)
    assert ((std >= 0.5) & (std <= 2.0)).all(), std
    sq = (x**2).sum(1)
    assert abs(sq.mean().item() - 2.0) < Z * sq.std().item() / math.sqrt(N_STAT)


def test_make_2d_unknown_name_lists_choices():
    with pytest.raises(ValueError) as info:
        make_2d("spiral", 10)
    msg = str(info.value)
    assert "'spiral'" in msg
    assert all(name in msg for name in TOY_DATASETS)


# --- eight gaussians: exact mixture ----------------------------------------------------------------


def _mixture_moments(weights, means, variances):
    """Closed-form mean and covariance of a diagonal Gaussian mixture."""
    mean = weights @ means
    second = torch.einsum("k,ki,kj->ij", weights, means, means) + torch.diag(weights @ variances)
    return mean, second - torch.outer(mean, mean)


def test_mixture_params_closed_form():
    weights, means, variances = eight_gaussians_mixture_params()
    assert all(p.dtype == torch.float64 for p in (weights, means, variances))
    assert weights.shape == (8,) and means.shape == (8, 2) and variances.shape == (8, 2)
    assert torch.allclose(weights, torch.full((8,), 1 / 8, dtype=torch.float64))
    assert torch.all(variances == variances[0, 0])  # equal and isotropic
    radii = means.norm(dim=1)
    assert torch.allclose(radii, radii[0].expand(8))
    mean, cov = _mixture_moments(weights, means, variances)
    # Scaled so the mixture is standardised: mean 0, covariance I_2.
    assert torch.allclose(mean, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(cov, torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_eight_gaussians_matches_mixture_moments():
    weights, means, variances = eight_gaussians_mixture_params()
    mean, cov = _mixture_moments(weights, means, variances)
    x = eight_gaussians(N_STAT, generator=gen(2), dtype=torch.float64)
    se_mean = (torch.diag(cov) / N_STAT).sqrt()
    assert ((x.mean(0) - mean).abs() < Z * se_mean).all()
    xc = x - mean
    products = xc[:, :, None] * xc[:, None, :]  # (n, 2, 2); their mean estimates cov
    se_cov = products.std(0) / math.sqrt(N_STAT)
    assert ((products.mean(0) - cov).abs() < Z * se_cov).all(), (products.mean(0), cov)


def test_eight_gaussians_components():
    weights, means, variances = eight_gaussians_mixture_params()
    x = eight_gaussians(N_STAT, generator=gen(3), dtype=torch.float64)
    # Modes are > 7 component stds apart, so nearest-mean assignment recovers the component.
    k = torch.cdist(x, means).argmin(1)
    freq = torch.bincount(k, minlength=8).double() / N_STAT
    assert ((freq - weights).abs() < Z * (weights * (1 - weights) / N_STAT).sqrt()).all(), freq
    resid = x - means[k]
    v = variances[0, 0].item()
    # Var of a Gaussian sample variance is 2 v^2 / n.
    assert ((resid.var(0) - v).abs() < Z * v * math.sqrt(2 / N_STAT)).all(), (resid.var(0), v)


# --- load_array --------------------------------------------------------------------------------------


def _data(n=40, d=3, seed=0):
    return torch.randn(n, d, generator=gen(seed), dtype=torch.float64).numpy()


def _write_csv(path, rows, header=None):
    lines = ([header] if header else []) + [",".join(repr(float(v)) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_npy_round_trip(tmp_path):
    a = _data()
    np.save(tmp_path / "a.npy", a)
    x = load_array(tmp_path / "a.npy")
    assert x.dtype == torch.float32 and x.shape == a.shape
    assert torch.equal(x, torch.from_numpy(a.astype(np.float32)))
    np.save(tmp_path / "i.npy", np.arange(6).reshape(3, 2))
    assert torch.equal(load_array(str(tmp_path / "i.npy")), torch.arange(6.0).reshape(3, 2))


@pytest.mark.parametrize("header", [None, "x,y,z", "# x,y,z"])
def test_csv_round_trip(tmp_path, header):
    a = _data()
    x = load_array(_write_csv(tmp_path / "a.csv", a, header))
    assert x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(a.astype(np.float32)))


def test_csv_single_column_and_blank_lines(tmp_path):
    (tmp_path / "c.csv").write_text("value\n1.5\n\n-2\n3e2\n\n")
    assert torch.equal(load_array(tmp_path / "c.csv"), torch.tensor([[1.5], [-2.0], [300.0]]))


def test_unknown_suffix(tmp_path):
    (tmp_path / "a.txt").write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match=r"\.npy, \.csv"):
        load_array(tmp_path / "a.txt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_array(tmp_path / "nope.npy")


@pytest.mark.parametrize(
    ("array", "fragments"),
    [
        (np.arange(5.0), ["(5,)", "(N, D)"]),
        (np.zeros((1, 3)), ["(1, 3)", "N >= 2"]),
        (np.zeros((2, 2, 2)), ["(2, 2, 2)", "(N, D)"]),
        (np.zeros((4, 2), dtype=complex), ["complex"]),
    ],
)
def test_npy_bad_shape_or_dtype(tmp_path, array, fragments):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(ValueError) as info:
        load_array(tmp_path / "a.npy")
    assert all(f in str(info.value) for f in fragments), str(info.value)


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_npy_non_finite_names_row(tmp_path, value, word):
    a = _data(n=30)
    a[17, 1] = value
    a[23, 0] = np.nan  # a later bad row must not be the one reported
    np.save(tmp_path / "a.npy", a)
    with pytest.raises(ValueError, match=f"row 17 contains {word}"):
        load_array(tmp_path / "a.npy")


def test_npy_float32_overflow(tmp_path):
    a = _data()
    a[5, 2] = 1e39
    np.save(tmp_path / "a.npy", a)
    with pytest.raises(ValueError, match="row 5 contains inf.*float32"):
        load_array(tmp_path / "a.npy")


def test_csv_nan_names_file_line(tmp_path):
    rows = [[1.0, 2.0]] * 5
    path = _write_csv(tmp_path / "a.csv", rows, header="x,y")
    text = path.read_text().splitlines()
    text[3] = "1.0,nan"  # line 4 of the file (header is line 1)
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"row 4 contains NaN \(column 2\)"):
        load_array(path)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("x,y\n1,2\n3,4\n5,abc\n", ["row 4", "column 2", "'y'", "'abc'"]),
        ("1,2\n3,\n", ["row 2", "column 2", "''"]),
        ("1,oops\n3,4\n", ["row 1", "column 2", "'oops'"]),
        ("1,2\n3,4,5\n", ["row 2", "3 columns", "expected 2"]),
        ("x,y\n", ["no data rows"]),
        ("1,2\n", ["(1, 2)", "N >= 2"]),
    ],
)
def test_csv_errors(tmp_path, text, fragments):
    (tmp_path / "a.csv").write_text(text)
    with pytest.raises(ValueError) as info:
        load_array(tmp_path / "a.csv")
    assert all(f in str(info.value) for f in fragments), str(info.value)


# --- load_dataset ------------------------------------------------------------------------------------


def test_load_dataset_builtin_and_file(tmp_path):
    assert torch.equal(load_dataset("moons", 64, generator=gen(4)), make_2d("moons", 64, generator=gen(4)))
    a = _data(n=40)
    np.save(tmp_path / "a.npy", a)
    # Files are returned whole: n does not truncate.
    assert load_dataset(str(tmp_path / "a.npy"), 10).shape == (40, 3)
    assert load_dataset(tmp_path / "a.npy", 10).shape == (40, 3)


@pytest.mark.parametrize("spec", ["no_such_dataset", "missing.npy", "data.txt"])
def test_load_dataset_unknown(tmp_path, spec):
    if spec == "data.txt":
        (tmp_path / spec).write_text("1,2\n3,4\n")
    with pytest.raises(ValueError) as info:
        load_dataset(str(tmp_path / spec) if spec != "no_such_dataset" else spec, 10)
    msg = str(info.value)
    assert all(name in msg for name in TOY_DATASETS)
    assert ".npy or .csv" in msg
