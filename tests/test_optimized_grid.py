"""The stored few-step grids (core/optimized_grid.py, issue #15 item 2) and the defaults that use them.

* ``grid_optimized(process, n)`` is a grid like the others: n + 1 strictly decreasing float64 times from t_max,
  inside [t_min, t_max], on every process; for a stored n its lam values are the stored ones (up to the
  round trip t_from_lam -> lam, bounded below); other n resample the next larger stored grid in the step index
  (Align Your Steps' extension, Sabour et al. 2024); a process that does not reach a stored level gets the stored
  interior mapped onto its range.
* The defaults: ``Pipeline.sample`` with no sampler and no grid is UniPC-3 on this grid without the final
  denoise (exactly ``steps`` network calls), and ``sample --steps N`` on the command line draws the same samples.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import torchdiffusion as td
from torchdiffusion import VE, VP, count_nfe
from torchdiffusion.app.cli import main
from torchdiffusion.core.optimized_grid import FINAL_DENOISE, OPTIMIZED_LAM, ROUNDING, grid_optimized
from torchdiffusion.names import GRID_FUNCTIONS
from torchdiffusion.samplers import sample_optimized
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train

F64 = torch.float64
EPS = torch.finfo(F64).eps
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 9, 10, 11, 20, 100])
def test_a_grid_like_the_others(process, n):
    ts = grid_optimized(process, n)
    assert ts.dtype == F64 and ts.shape == (n + 1,)
    assert float(ts[0]) == process.t_max and bool(torch.isfinite(ts).all())
    assert bool((ts[1:] < ts[:-1]).all()), ts
    assert float(ts[-1]) >= process.t_min
    assert GRID_FUNCTIONS["optimized"] is grid_optimized


def _round_trip_bound(process, lam: torch.Tensor) -> torch.Tensor:
    """|lam(t_from_lam(lam)) - lam| <= (few ulps of t) x |d lam / d t| + few ulps of lam: the float64 round trip."""
    t = process.t_from_lam(lam).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(process.lam(t).sum(), t)
    return 16 * EPS * (t.detach().abs() * grad.abs() + lam.abs() + 1)


def _on_vp(lams) -> torch.Tensor:
    """The stored values as VP takes them: those past its end (by less than ROUNDING) become its end."""
    end = float(VP().lam(torch.tensor(VP().t_min, dtype=F64)))
    lams = torch.as_tensor(np.asarray(lams, dtype=np.float64))
    assert float(lams.max()) <= end + ROUNDING
    return lams.clamp(max=end)


@pytest.mark.parametrize("n", sorted(OPTIMIZED_LAM))
def test_stored_levels_on_vp(n):
    """On VP (where they were optimized) the grid's lam are the stored values (a value past VP's end by less than
    the table's rounding is that end); its start is t_max itself."""
    p = VP()
    lam = p.lam(grid_optimized(p, n))
    stored = _on_vp(OPTIMIZED_LAM[n])
    err = (lam[1:] - stored[1:]).abs()
    assert bool((err <= _round_trip_bound(p, stored[1:])).all()), (err, _round_trip_bound(p, stored[1:]))
    assert abs(float(lam[0]) - float(stored[0])) <= ROUNDING / 2  # the stored start: VP's lam(t_max), rounded


def test_other_step_counts_resample_the_next_larger_grid():
    """n = 4: the 5-step grid at positions i / 4; n = 20: the 10-step grid, every other point its own (the table
    is resampled first, then taken on VP as ``_on_vp`` says)."""
    p = VP()
    five, ten = np.asarray(OPTIMIZED_LAM[5]), np.asarray(OPTIMIZED_LAM[10])
    four = _on_vp(np.interp(np.linspace(0, 1, 5), np.linspace(0, 1, 6), five)).numpy()
    twenty = p.lam(grid_optimized(p, 20))
    got4 = p.lam(grid_optimized(p, 4))
    bound4 = _round_trip_bound(p, torch.tensor(four[1:], dtype=F64))
    assert bool(((got4[1:] - torch.tensor(four[1:])).abs() <= bound4).all())
    even = _on_vp(ten[1:])
    assert bool(((twenty[2::2] - even).abs() <= _round_trip_bound(p, even)).all())
    # the odd points are midpoints of the 10-step grid's lam steps
    mid = _on_vp((ten[1:-1] + ten[2:]) / 2)
    assert bool(((twenty[3::2] - mid).abs() <= _round_trip_bound(p, mid)).all())


def test_a_narrower_process_gets_the_levels_mapped_onto_its_range():
    """VE with sigma_max = 2 starts at lam = -log 2 > the stored -2.0: the interior is mapped affinely onto
    [lam(t_max), the stored end], so the steps keep their proportions."""
    p = VE(sigma_max=2.0)
    lam = p.lam(grid_optimized(p, 5))
    stored = np.asarray(OPTIMIZED_LAM[5])
    lam_a = -math.log(2.0)
    expected = lam_a + (stored[1:] - stored[0]) * (stored[-1] - lam_a) / (stored[-1] - stored[0])
    exp_t = torch.tensor(expected, dtype=F64)
    assert bool(((lam[1:] - exp_t).abs() <= _round_trip_bound(p, exp_t)).all())


@pytest.mark.parametrize("n", [0, -3])
def test_bad_step_counts_are_named(n):
    with pytest.raises(ValueError, match="at least 1 step"):
        grid_optimized(VP(), n)


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons") / "run"
    train(TrainConfig(data="moons", net={"name": "mlp", "width": 16, "depth": 1}, steps=3, batch_size=64), out,
          progress=False)  # fmt: skip
    return out


@pytest.mark.parametrize("steps", [5, 10, 7])
def test_the_default_is_the_optimized_solver_on_its_grid_without_final_denoise(moons, steps):
    pipe = td.load(moons)
    ts = grid_optimized(pipe.process, steps)
    gen = torch.Generator().manual_seed(3)
    x = pipe.process.prior_sample((11, 2), generator=gen)
    counted = count_nfe(pipe.denoiser)
    with torch.no_grad():
        expected = sample_optimized(counted, pipe.process, x, ts, generator=gen, final_denoise=FINAL_DENOISE)
    assert counted.nfe == steps  # FINAL_DENOISE is False: the budget is the steps, no extra call
    got = pipe.sample(11, steps=steps, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)
    # naming the grid gives the same; an explicit final_denoise=True is honoured (one more call, other samples)
    assert torch.equal(pipe.sample(11, steps=steps, grid="optimized", generator=torch.Generator().manual_seed(3)), got)
    # naming the sampler too: its usual grid is the optimized one, also without the final denoise
    by_name = pipe.sample(11, sampler="optimized", steps=steps, generator=torch.Generator().manual_seed(3))
    assert torch.equal(by_name, got)
    other = pipe.sample(11, steps=steps, final_denoise=True, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(other, got)


def test_the_command_line_default_for_steps_is_the_same(moons, tmp_path):
    out = tmp_path / "s.npy"
    args = ["sample", "--checkpoint", moons, "--steps", 5, "--n", 20, "--seed", 6, "--out", out, "--no-progress"]
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "optimized (UniPC-3, with stored weights where they exist) on the optimized 5-step grid" in r.output
    got = td.load(moons).sample(20, steps=5, generator=torch.Generator().manual_seed(6))
    assert np.array_equal(np.load(out), got.numpy())
