"""Tests of the time grids (timesteps.py): sizes, ends, monotonicity and the defining spacing of each.

grid_t: uniform in t (Song et al. 2021); grid_quadratic: uniform in sqrt(t - t_end) (Song et al.
2021a, DDIM "quadratic"); grid_lam: uniform in lam = log(alpha/sigma) (Lu et al. 2022, DPM-Solver
"logSNR"); grid_karras: uniform in (sigma/alpha)^(1/rho) = exp(-lam)^(1/rho) (Karras et al. 2022,
Eq. 5); grid_discrete: DDPM codebases' integer spacings (Ho et al. 2020, Algorithm 2 for n = T).
"""

import math

import pytest
import torch

from torchdiffusion import EDM, VE, VP, Discrete, Flow
from torchdiffusion.core.processes import beta_cosine, beta_linear
from torchdiffusion.core.timesteps import (
    LAM_MIN,
    check_grid,
    grid_discrete,
    grid_karras,
    grid_lam,
    grid_quadratic,
    grid_t,
)

F64 = torch.float64
GRIDS = {"t": grid_t, "lam": grid_lam, "karras": grid_karras, "quadratic": grid_quadratic}


def _lam_start(process):
    """The documented start of lam-uniform grids: lam(t_max), or LAM_MIN where alpha(t_max) = 0 (Flow)."""
    lam = float(process.lam(torch.tensor(process.t_max, dtype=F64)))
    return lam if math.isfinite(lam) else LAM_MIN


@pytest.mark.parametrize("name", GRIDS)
@pytest.mark.parametrize("n", [1, 7, 50])
def test_grid_size_ends_monotone(request, process, name, n):
    """Every grid has n + 1 points, starts at t_max, ends at t_min and strictly decreases (timesteps.py)."""
    ts = GRIDS[name](process, n)
    assert ts.dtype == F64 and ts.shape == (n + 1,)
    assert float(ts[0]) == process.t_max and float(ts[-1]) == process.t_min
    assert bool(torch.isfinite(ts).all())
    assert bool((ts[1:] < ts[:-1]).all())
    torch.testing.assert_close(check_grid(ts), ts)


@pytest.mark.parametrize("name", GRIDS)
def test_grid_custom_ends(process, name):
    """t_start / t_end replace t_max / t_min."""
    lo, hi = process.t_min, process.t_max
    a, b = lo + 0.8 * (hi - lo), lo + 0.1 * (hi - lo)
    ts = GRIDS[name](process, 9, t_start=a, t_end=b)
    assert ts.shape == (10,)
    assert float(ts[0]) == a and float(ts[-1]) == b
    assert bool((ts[1:] < ts[:-1]).all())


def test_grid_t_uniform_in_t(process):
    """grid_t: equal steps in t."""
    ts = grid_t(process, 20)
    torch.testing.assert_close(ts, torch.linspace(process.t_max, process.t_min, 21, dtype=F64), rtol=1e-14, atol=0)


def test_grid_quadratic_uniform_in_sqrt_t(process):
    """grid_quadratic: equal steps in sqrt(t - t_min), denser near the data."""
    ts = grid_quadratic(process, 20)
    u = (ts - process.t_min).sqrt()
    ref = torch.linspace(float(u[0]), 0.0, 21, dtype=F64)
    torch.testing.assert_close(u, ref, rtol=1e-12, atol=1e-12 * float(u[0]))
    assert float(u[0]) ** 2 == pytest.approx(process.t_max - process.t_min, rel=1e-14)


def test_grid_lam_uniform_in_lam(request, process):
    """grid_lam: equal steps in half log-SNR lam (DPM-Solver's logSNR grid; geometric sigmas on VE)."""
    n = 25
    ts = grid_lam(process, n)
    lam = process.lam(ts)
    ref = torch.linspace(_lam_start(process), float(lam[-1]), n + 1, dtype=F64)
    span = float(lam[-1] - ref[0])
    # the first point is t_max itself (lam = -inf on Flow; the policy in timesteps.py)
    torch.testing.assert_close(lam[1:], ref[1:], rtol=0, atol=1e-10 * span)
    assert float(ts[0]) == process.t_max


def test_grid_lam_on_ve_is_geometric_sigmas():
    """On VE, uniform lam = geometric sigma_max .. sigma_min (Song & Ermon 2019, NCSN noise levels)."""
    p = VE()
    ts = grid_lam(p, 10)
    ref = torch.tensor([50.0 * (0.01 / 50.0) ** (i / 10) for i in range(11)], dtype=F64)
    torch.testing.assert_close(p.sigma(ts), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_grid_karras_uniform_in_sigma_pow(request, process, rho):
    """grid_karras: equal steps in (sigma/alpha)^(1/rho) = exp(-lam)^(1/rho) (Karras et al. 2022, Eq. 5)."""
    n = 25
    ts = grid_karras(process, n, rho=rho)
    w = torch.exp(-process.lam(ts)) ** (1 / rho)
    ref = torch.linspace(math.exp(-_lam_start(process)) ** (1 / rho), float(w[-1]), n + 1, dtype=F64)
    torch.testing.assert_close(w[1:], ref[1:], rtol=0, atol=1e-10 * float((ref[0] - ref[-1]).abs()))
    assert float(ts[0]) == process.t_max


def test_grid_karras_on_edm_is_eq5():
    """EDM (alpha = 1, sigma = t): t_i = (t_max^(1/rho) + i/n (t_min^(1/rho) - t_max^(1/rho)))^rho (Karras Eq. 5)."""
    p, n, rho = EDM(), 18, 7.0
    ref = torch.tensor(
        [(80.0 ** (1 / rho) + i / n * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho for i in range(n + 1)], dtype=F64
    )
    torch.testing.assert_close(grid_karras(p, n, rho=rho), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["lam", "karras"])
def test_flow_lam_grids_below_t_max(name):
    """On Flow, grids uniform in lam work from any t_start < 1 (where lam is finite)."""
    p = Flow()
    ts = GRIDS[name](p, 12, t_start=0.999)
    assert bool(torch.isfinite(ts).all()) and bool((ts[1:] < ts[:-1]).all())
    assert float(ts[0]) == 0.999 and float(ts[-1]) == p.t_min


@pytest.mark.parametrize("name", GRIDS)
def test_grid_errors(name):
    p = VP()
    for n in (0, -3):
        with pytest.raises(ValueError):
            GRIDS[name](p, n)
    with pytest.raises(ValueError):
        GRIDS[name](p, 5, t_start=0.2, t_end=0.5)
    with pytest.raises(ValueError):
        GRIDS[name](p, 5, t_start=0.3, t_end=0.3)


# --- discrete grids -----------------------------------------------------------------------------------

SPACINGS = ["leading", "linspace", "trailing"]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_grid_discrete_full_is_ho_algorithm2(spacing):
    """With n = T every spacing gives t = T, T-1, ..., 1 (Ho et al. 2020, Algorithm 2): T points, one
    ancestral step per pair plus the final denoising step at t = 1."""
    p = Discrete.from_schedule(beta_linear, 1000)
    ts = grid_discrete(p, 1000, spacing=spacing)
    assert ts.dtype == F64
    torch.testing.assert_close(ts, torch.arange(1000, 0, -1, dtype=F64), rtol=0, atol=0)


EXPECTED = {
    # T = 1000; values worked out by hand from the documented formulas
    ("linspace", 10): [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1],  # 1000 - 111 k
    ("leading", 10): [901, 801, 701, 601, 501, 401, 301, 201, 101, 1],  # 1 + 100 k
    ("trailing", 10): [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100],  # 1000 - 100 k
    ("linspace", 4): [1000, 667, 334, 1],  # 1000 - 333 k
    ("leading", 3): [667, 334, 1],  # 1 + 333 k
    ("trailing", 3): [1000, 667, 333],  # round(1000 - 333.33 k)
    ("leading", 1): [1],
    ("trailing", 1): [1000],
    ("linspace", 1): [1000],
}


@pytest.mark.parametrize("spacing, n", list(EXPECTED), ids=[f"{s}-{n}" for s, n in EXPECTED])
def test_grid_discrete_documented_formulas(spacing, n):
    """linspace: round(linspace(T, 1, n)); leading: 1 + k (T // n), k = n-1..0; trailing: round(T - k T/n)."""
    p = Discrete.from_schedule(beta_linear, 1000)
    ts = grid_discrete(p, n, spacing=spacing)
    torch.testing.assert_close(ts, torch.tensor(EXPECTED[spacing, n], dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [2, 7, 13, 333, 999])
def test_grid_discrete_properties(spacing, n):
    """n integer times in 1..T, strictly decreasing."""
    p = Discrete.from_schedule(beta_cosine, 1000)
    ts = grid_discrete(p, n, spacing=spacing)
    assert ts.shape == (n,)
    assert bool((ts == ts.round()).all())
    assert float(ts.min()) >= 1 and float(ts.max()) <= 1000
    assert bool((ts[1:] < ts[:-1]).all())


def test_grid_discrete_errors(continuous_process):
    p = Discrete.from_schedule(beta_linear, 50)
    for n in (0, 51):
        with pytest.raises(ValueError):
            grid_discrete(p, n)
    with pytest.raises(ValueError) as err:
        grid_discrete(p, 10, spacing="uniform")
    for s in SPACINGS:
        assert repr(s) in str(err.value)
    with pytest.raises(ValueError):
        grid_discrete(continuous_process, 10)


def test_check_grid_rejects_bad_grids():
    with pytest.raises(ValueError):
        check_grid(torch.tensor([0.1, 0.5]))
    with pytest.raises(ValueError):
        check_grid(torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError):
        check_grid(torch.tensor([[0.5, 0.1]]))
    with pytest.raises(ValueError):
        check_grid(torch.tensor([float("inf"), 0.1]))
    ts = check_grid([0.9, 0.4, 0.1])
    assert ts.dtype == F64
