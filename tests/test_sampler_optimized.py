"""sample_optimized (samplers/optimized.py): the general data-prediction multistep form it runs, against UniPC-3
written in that form, a point mass's exact solution, and its fallback off the stored grid."""

from functools import partial

import pytest
import torch

from torchdiffusion import EDM, VP, Flow, GaussianMixture, grid_lam
from torchdiffusion.core import optimized_grid
from torchdiffusion.core.optimized_grid import OPTIMIZED_LAM, OPTIMIZED_WEIGHTS, ROUNDING, grid_optimized
from torchdiffusion.samplers import count_nfe, sample_optimized, sample_unipc
from torchdiffusion.samplers.optimized import sample_weighted, solver_weights

F64 = torch.float64
GM = GaussianMixture([0.3, 0.7], [[-2.0, 1.0, 0.0], [1.5, -0.5, 1.0]], [[0.1, 0.4, 0.2], [0.3, 0.05, 0.5]])
PROCESSES = [VP(), EDM(), Flow()]


def test_stored_tables_are_well_formed():
    assert set(OPTIMIZED_WEIGHTS) <= set(OPTIMIZED_LAM)
    for n, rows in OPTIMIZED_WEIGHTS.items():
        assert [len(r) for r in rows] == list(range(1, n + 1))  # row j weighs the j values computed before it
        for r in rows:  # each row sums to 1 up to the rounding of its entries
            assert abs(sum(r) - 1.0) <= ROUNDING / 2 * len(r) + 1e-12


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_with_unipc3s_own_weights_it_is_unipc3(process, monkeypatch):
    """The form holds every explicit data-prediction multistep solver: given UniPC-3's weights (its corrector
    folded in), it reproduces UniPC-3 to float64 rounding on the stored 5-step grid."""
    ts = grid_optimized(process, 5).to(F64)
    weights = solver_weights(partial(sample_unipc, order=3), process, ts)  # read off with basis vectors
    monkeypatch.setitem(optimized_grid.OPTIMIZED_WEIGHTS, 5, weights)
    x = process.prior_sample((64, 3), generator=torch.Generator().manual_seed(0), dtype=F64)
    den = GM.denoiser(process)
    got = sample_optimized(den, process, x, ts, final_denoise=False)
    want = sample_unipc(den, process, x, ts, order=3, final_denoise=False)
    # two orders of the same float64 arithmetic: ~10 roundings per step over 5 steps, on weights of size up to 2
    # (and the read-off's division): a few hundred ulps of the output's scale at most; 1e3 allowed
    assert torch.allclose(got, want, rtol=0, atol=1e3 * torch.finfo(F64).eps * float(want.abs().max()))


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_a_point_mass_is_exact(process):
    """Weights that sum to 1 keep a constant x0_hat = c exact: x_n = sigma_n / sigma_0 x_T + alpha_n (1 -
    e^{-(lam_n - lam_0)}) c, the probability-flow solution for data at c (Lu et al. 2022b, Eq. 9)."""
    ts = grid_optimized(process, 5).to(F64)
    c = torch.tensor([0.7, -1.3], dtype=F64)
    x = process.prior_sample((16, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    got = sample_optimized(lambda z, t: c.expand_as(z), process, x, ts, final_denoise=False)
    lam, alpha, sigma = process.lam(ts), process.alpha(ts), process.sigma(ts)
    want = sigma[-1] / sigma[0] * x + alpha[-1] * -torch.expm1(lam[0] - lam[-1]) * c
    # two terms, each a product of a few rounded float64 factors, and weights renormalized to sum 1: tens of ulps
    assert torch.allclose(got, want, rtol=0, atol=64 * torch.finfo(F64).eps * float(want.abs().max()))


@pytest.mark.parametrize("n", sorted(OPTIMIZED_WEIGHTS))
def test_stored_weights_change_the_samples_and_cost_one_call_per_step(n):
    process = VP()
    ts = grid_optimized(process, n)
    x = process.prior_sample((32, 3), generator=torch.Generator().manual_seed(2))
    den, seen = count_nfe(GM.denoiser(process)), []
    got = sample_optimized(den, process, x, ts, final_denoise=False, callback=seen.append)
    assert den.nfe == n and [s["nfe"] for s in seen] == [*range(2, n + 1), n] and len(seen) == n
    assert torch.allclose(seen[-1]["x"], got)
    assert not torch.allclose(got, sample_unipc(GM.denoiser(process), process, x, ts, order=3, final_denoise=False))
    den = count_nfe(GM.denoiser(process))
    sample_optimized(den, process, x, ts, final_denoise=True)
    assert den.nfe == n + 1  # the final x0_hat, when asked for


@pytest.mark.parametrize(
    "grid", [lambda p: grid_optimized(p, 7), lambda p: grid_optimized(p, 10), lambda p: grid_lam(p, 5)],
    ids=["optimized-7", "optimized-10", "lam-5"],
)  # fmt: skip
def test_off_the_stored_grids_it_is_unipc3(grid):
    process = EDM()
    ts = grid(process)
    assert len(ts) - 1 not in OPTIMIZED_WEIGHTS or not torch.equal(ts, grid_optimized(process, len(ts) - 1))
    x = process.prior_sample((20, 3), generator=torch.Generator().manual_seed(3))
    den = GM.denoiser(process)
    assert torch.equal(sample_optimized(den, process, x, ts), sample_unipc(den, process, x, ts, order=3))


def test_weights_of_the_wrong_shape_are_refused():
    process = VP()
    ts = grid_lam(process, 3)
    x = process.prior_sample((4, 3), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"rows of 1\.\.3 values, got \[1, 2\]"):
        sample_weighted(GM.denoiser(process), process, x, ts, [[1.0], [0.5, 0.5]])
