"""Budgets of the posterior samplers (issue #12, items 4-5): ``names.INVERSE[...].knobs(nfe)`` turns a number of
denoiser calls per sample into a grid and knobs, and the sampler then makes exactly the calls it promised, never
more than the budget (RePaint's re-done steps and SMC's particles counted)."""

from __future__ import annotations

import pytest
import torch

from conftest import gen
from torchdiffusion import VP, GaussianMixture, count_nfe, grid_lam
from torchdiffusion.core.measurements import Mask, Measurement
from torchdiffusion.inverse.repaint import repaint_budget, repaint_calls, repaint_schedule
from torchdiffusion.inverse.smc import smc_budget
from torchdiffusion.names import INVERSE, get_inverse

F64 = torch.float64
PRIOR = GaussianMixture([1.0, 1.0], torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64), torch.full((2, 2), 0.2))
MEAS = Measurement(Mask(torch.tensor([1.0, 0.0])), torch.tensor([[0.4, 0.0]], dtype=F64), 0.0)


def test_repaint_calls_count_the_schedule():
    """One call per forward move of the schedule plus the final denoise: n + (jn - 1) j (number of jump points) + 1."""
    for n, j, jn in ((1, 1, 1), (7, 3, 3), (40, 10, 10), (33, 5, 2)):
        jumps = len(range(n, j, -j))
        assert repaint_calls(n, j, jn) == n + (jn - 1) * j * jumps + 1
        path = repaint_schedule(n, j, jn)
        assert repaint_calls(n, j, jn) == sum(b > a for a, b in zip(path[:-1], path[1:])) + 1


@pytest.mark.parametrize("nfe", [2, 3, 7, 20, 50, 100, 250, 600])
def test_repaint_budget_fits_and_is_the_largest_grid(nfe):
    k = repaint_budget(nfe)
    n, j, jn = k["steps"], k["jump_length"], k["jump_n_sample"]
    assert repaint_calls(n, j, jn) <= nfe < repaint_calls(n + 1, j, jn)


@pytest.mark.parametrize("nfe", [2, 5, 20, 51, 100, 250])
def test_smc_budget_fits(nfe):
    k = smc_budget(nfe)
    assert k["particles"] >= 1 and k["steps"] >= 1
    assert k["particles"] * (k["steps"] + 1) <= nfe


@pytest.mark.parametrize("name", sorted(INVERSE))
@pytest.mark.parametrize("nfe", [2, 20, 50])
def test_every_method_makes_the_calls_it_promised(name, nfe):
    """The counted calls per sample (a batch call is one; SMC's P particles are P per sample) stay within nfe, and
    use it up to the rounding of the budget rules (one call short for a one-particle budget is allowed nowhere)."""
    info = get_inverse(name)
    plan = info.knobs(nfe)
    steps, P = plan.pop("steps"), plan.get("particles", 1)
    den = count_nfe(PRIOR.denoiser(VP()))
    x = VP().prior_sample((4 * P, 2), generator=gen(1), dtype=F64)
    info.fn(den, VP(), x, grid_lam(VP(), steps), MEAS, generator=gen(2), **plan)
    used = den.nfe * P
    assert used <= nfe
    if name == "repaint":
        assert used == repaint_calls(steps, plan["jump_length"], plan["jump_n_sample"])
    elif name == "smc":
        assert used == P * (steps + 1)
    else:
        assert used == nfe


def test_bad_budgets_are_refused():
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="int >= 2"):
            get_inverse("ddrm").knobs(bad)
    with pytest.raises(ValueError, match="nfe must be an int >= 2"):
        repaint_budget(1)
    with pytest.raises(ValueError, match="nfe must be an int >= 2"):
        smc_budget(0)
    with pytest.raises(ValueError, match="unknown posterior sampler 'dsp'; choose one of"):
        get_inverse("dsp")
