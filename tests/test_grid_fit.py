"""Grids fitted to a model (``grid_fit``): shape, ends, cost accounting, and a lower error than the uniform lam
grid against the exact probability-flow map of Gaussian data."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from mixture_checks import gaussian_flow_map
from torchdiffusion import VP, Flow, GaussianMixture, grid_lam
from torchdiffusion.grid_fit import fit_grid, lam_grid_from_params
from torchdiffusion.samplers import count_nfe, sample_ddim, sample_ddpm, sample_dpm_solver_pp

F64 = torch.float64
M, S = [1.5, -0.5], [0.3, 0.8]  # data mean != 0, std != 1
GAUSS = GaussianMixture([1.0], [M], [[s**2 for s in S]])


def _flow_map(process, x, t, s):
    """The exact probability-flow ODE map x_t -> x_s on this file's Gaussian data."""
    return gaussian_flow_map(process, x, t, s, M, [s**2 for s in S])


def test_params_zero_give_the_uniform_lam_grid_and_knots_interpolate():
    lams = lam_grid_from_params(np.zeros(5), 5, -4.0, 6.0)
    assert np.allclose(lams, np.linspace(-4.0, 6.0, 6))
    warped = lam_grid_from_params(np.array([0.0, 2.0, -1.0]), 20, -4.0, 6.0)
    assert warped.shape == (21,) and warped[0] == -4.0 and np.isclose(warped[-1], 6.0)
    assert (np.diff(warped) > 0).all()


def test_fitted_grid_beats_uniform_lam_against_the_exact_flow_map():
    """With the exact denoiser of Gaussian data the flow map is closed form. The grid fitted on pilot starts
    brings 4 DDIM steps (first order) closer to it on other starts than the uniform lam grid does."""
    p = VP()
    den = GAUSS.denoiser(p)
    pilot = p.prior_sample((64, 2), generator=torch.Generator().manual_seed(1))
    ddim = partial(sample_ddim, eta=0.0)
    fit = fit_grid(ddim, den, p, 4, pilot, final_denoise=False, teacher_steps=200)
    x = p.prior_sample((256, 2), generator=torch.Generator().manual_seed(2))
    exact = _flow_map(p, x, p.t_max, p.t_min)

    def err(ts):
        return float((sample_ddim(den, p, x, ts, final_denoise=False) - exact).norm(dim=1).mean())

    assert fit.error <= fit.error_uniform_lam
    assert err(fit.ts) < 0.8 * err(grid_lam(p, 4))  # 0.63 for pilots of seeds 1, 3 and 5


@pytest.mark.parametrize("process", [VP(), Flow()], ids=["VP", "Flow"])
def test_grid_shape_ends_and_nfe_accounting(process):
    """n + 1 strictly decreasing float64 times from t_max to t_min (Flow: alpha = 0 at t_max, lam = -inf, still
    finite), and ``nfe`` counts every denoiser call the fit made."""
    gm = GaussianMixture([0.3, 0.7], [[-1.0, 0.0], [1.0, 0.5]], [[0.04, 0.04], [0.09, 0.01]])
    d = count_nfe(gm.denoiser(process))
    pilot = process.prior_sample((32, 2), generator=torch.Generator().manual_seed(0))
    fit = fit_grid(partial(sample_dpm_solver_pp, order=2), d, process, 6, pilot, teacher_steps=60, max_evals=30)
    ts = fit.ts
    assert ts.dtype == F64 and ts.shape == (7,)
    assert ts[0] == process.t_max and ts[-1] == process.t_min and bool((ts[1:] < ts[:-1]).all())
    assert fit.nfe == d.nfe and fit.evals <= 30 + 2 * 6  # Powell may finish its line search a little past the budget
    out = sample_dpm_solver_pp(gm.denoiser(process), process, pilot, ts)
    assert bool(torch.isfinite(out).all())


def test_many_steps_fit_few_unknowns():
    """Above ``free_steps`` the search has ``knots`` unknowns, so its cost does not grow with n."""
    p = VP()
    pilot = p.prior_sample((16, 2), generator=torch.Generator().manual_seed(0))
    fit = fit_grid(sample_ddim, GAUSS.denoiser(p), p, 30, pilot, teacher_steps=60, free_steps=12, knots=4)
    assert fit.ts.shape == (31,) and fit.evals <= 40 * 4 + 2 * 4


def test_stochastic_sampler_and_bad_arguments_are_refused():
    p = VP()
    pilot = p.prior_sample((8, 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="deterministic"):
        fit_grid(sample_ddpm, GAUSS.denoiser(p), p, 3, pilot, teacher_steps=20)
    with pytest.raises(ValueError, match="at least 1 step"):
        fit_grid(sample_ddim, GAUSS.denoiser(p), p, 0, pilot)
    with pytest.raises(ValueError, match="teacher_steps"):
        fit_grid(sample_ddim, GAUSS.denoiser(p), p, 10, pilot, teacher_steps=5)


def test_default_sampler_is_a_deterministic_registered_sampler():
    """``DEFAULT_SAMPLER`` names a row of the sampler table, and a deterministic one, so ``--grid fit`` takes it."""
    from torchdiffusion.samplers import DEFAULT_SAMPLER, INFO

    assert DEFAULT_SAMPLER in INFO and not INFO[DEFAULT_SAMPLER].stochastic
