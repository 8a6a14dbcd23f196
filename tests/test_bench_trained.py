"""The glue of benchmarks/bench_trained.py (samplers on trained models), checked on exact denoisers.

- k-diffusion and diffusers are handed a VP network through ``kdiff_model`` and ``diffusers_eps``. With the exact
  VP denoiser of a Gaussian mixture in place of the network, they must give the exact EDM denoiser and the exact
  eps of diffusers' own process (``anchors.exact_eps``), wherever the requested noise level lies in the VP
  model's range. Both sides are float64 closed forms of the same quantity at the same log-SNR; they differ by the
  rounding of ``t_from_lam`` and of the coefficients (~1e-15 relative): 1e-10 is that with a wide margin, and a
  wrong scaling or time would be off by O(1).
- ``Ours.steps_for`` returns the most steps whose real NFE (counted on the actual run) fits the budget.
- ``Held2D``'s fast SW2 is ``metrics.sliced_wasserstein``: the same directions and sorted projections, summed in
  another order (n x 512 float64 terms: relative rounding <= 1e-6 x 1.1e-16 per term, far below 1e-9).
"""

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

from torchdiffusion import EDM, VP, GaussianMixture
from torchdiffusion.evaluation.metrics import sliced_wasserstein
from torchdiffusion.samplers import count_nfe

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
F64 = torch.float64

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # its siblings import each other
B = importlib.import_module("bench_trained")


def _mixture() -> GaussianMixture:
    return GaussianMixture(
        [0.5, 0.3, 0.2], [[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], [[0.09, 0.04], [0.16, 0.09], [0.04, 0.25]]
    )


def _vp_range(vp):
    """(lam at t_max, lam at t_min): the log-SNRs the VP model was trained on."""
    return float(vp.lam(torch.tensor(vp.t_max, dtype=F64))), float(vp.lam(torch.tensor(vp.t_min, dtype=F64)))


def test_kdiff_model_is_the_exact_edm_denoiser():
    gm, vp = _mixture(), VP()
    model = B.kdiff_model(gm.denoiser(vp), vp)
    x = 2 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    lo, hi = _vp_range(vp)
    for s in (math.exp(-hi) * 1.01, 0.1, 1.0, 20.0, math.exp(-lo) * 0.99):
        sigma = torch.full((16,), s, dtype=F64)
        want = gm.x0_mean(x * s, EDM(), sigma)  # x in alpha = 1 units at noise level s
        got = model(x * s, sigma)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-10, s


def test_diffusers_eps_is_the_exact_eps():
    pytest.importorskip("diffusers")
    gm, vp = _mixture(), VP()
    lo, hi = _vp_range(vp)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    checked = 0
    for name in ("DDIMScheduler", "EulerDiscreteScheduler"):  # integer and fractional (sigma-space) timesteps
        sched = B.A.make_scheduler(name)
        sched.set_timesteps(25)
        dproc = B.A.scheduler_process(sched)
        ours, exact = B.diffusers_eps(gm.denoiser(vp), vp, sched), B.A.exact_eps(gm, dproc)
        for t in sched.timesteps:
            if lo < float(dproc.lam(torch.tensor([float(t)], dtype=F64))) < hi:
                want = exact(x, t)
                assert float((ours(x, t) - want).abs().max() / want.abs().max()) < 1e-10, (name, float(t))
                checked += 1
    assert checked >= 40  # all but the ends of the two 25-step schedules lie inside the VP range


@pytest.mark.parametrize("name, grid", [(s, None) for s in ("ddpm", "heun", "rk4", "dpm_solver_3", "pc", "ald")]
                         + [B.DEFAULT])  # fmt: skip
def test_steps_for_takes_the_most_steps_within_the_budget(name, grid):
    """(The default, sample_optimized on the optimized grid without the final denoise, takes exactly the budget in
    steps.)"""
    vp = VP()
    runner = B.Ours(name, vp, 0, grid)
    x = torch.randn(3, 2, dtype=F64)

    def nfe(n):  # counted on a real run with a real denoiser
        d = count_nfe(_mixture().denoiser(vp))
        runner.fn(d, vp, x, runner.grid(vp, n), generator=torch.Generator(), **runner.knobs)
        return d.nfe

    for budget in (5, 10, 20):
        n = runner.steps_for(budget, (2,))
        if n is None:
            assert nfe(1) > budget
        else:
            assert nfe(n) <= budget < nfe(n + 1)
        if (name, grid) == B.DEFAULT:
            assert n == budget


def test_held_out_metrics():
    held = B.Held2D("moons", 500, seed=0)
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(2))
    assert math.isclose(held.sw2(x), sliced_wasserstein(x, held.ref), rel_tol=1e-9)
    assert held.sw2(held.ref) == 0.0
    # Held-out points lie within the outlier radius of the reference; points 100 away and non-finite ones do not.
    fresh = B.make_2d("moons", 200, generator=torch.Generator().manual_seed(3))
    far = torch.cat([fresh[:150], fresh[150:190] + 100.0, torch.full((10, 2), math.nan)])
    assert held.outlier_fraction(fresh) == 0.0
    assert held.outlier_fraction(far) == 50 / 200
    m = held(far)
    assert math.isnan(m["sw2"]) and m["max_norm"] == math.inf


def test_every_job_of_the_2d_benchmark_runs_within_its_budget():
    """``jobs_2d`` drives every sampler of the three libraries (those installed) with the arguments bench_2d gives
    them: each returns finite samples of the prior draw's shape within its NFE budget (a wrong argument order in
    this list once crashed a full run)."""
    vp, gm = VP(), _mixture()
    den = gm.denoiser(vp)
    x_T = vp.prior_sample((64, 2), generator=torch.Generator().manual_seed(0))
    z = x_T / float(vp.sigma(torch.tensor(vp.t_max, dtype=F64)))
    notes, ran = [], set()
    for lib, sampler, _, runs in B.jobs_2d(vp, 0, notes):
        with torch.no_grad():
            x, nfe, _ = runs(den, z if lib != "torchdiffusion" else x_T, [10]).get(10, (None, None, None))
        if x is not None:
            assert x.shape == (64, 2) and bool(torch.isfinite(x).all()), (lib, sampler)
            assert nfe <= 10, (lib, sampler, nfe)
            ran.add(lib)
    installed = {"torchdiffusion"} | {lib for lib in ("k-diffusion", "diffusers") if not any(lib in n for n in notes)}
    assert ran == installed
