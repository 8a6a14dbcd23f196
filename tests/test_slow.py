"""Long runs (``make test-slow``): the main job end to end, and tighter sampler statistics."""

import pytest
import torch

from torchdiffusion import Discrete, GaussianMixture, grid_discrete, sample_ddpm
from torchdiffusion.core.processes import beta_linear

pytestmark = pytest.mark.slow


def test_demo_main_job_reaches_the_noise_floor(tmp_path):
    """The demo (VP, 8 Gaussians, DDPM and annealed Langevin): both samplers within 2x the noise floor."""
    from torchdiffusion.app.demo import run_demo

    m = run_demo(tmp_path, progress=False)
    assert m["sw2_ddpm"] < 2 * m["sw2_floor"]
    assert m["sw2_ald"] < 2 * m["sw2_floor"]
    for name in ("demo.png", "metrics.json", "samples_ddpm.npy", "samples_ald.npy"):
        assert (tmp_path / name).stat().st_size > 0


def test_ddpm_algorithm2_full_grid_many_samples():
    """Ho et al. 2020 Algorithm 2 on T = 1000 with the exact denoiser: mixture weights within 4
    binomial standard errors at n = 20000 (a tighter version of the fast test)."""
    gm = GaussianMixture([0.2, 0.3, 0.5], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], [[0.1, 0.2], [0.3, 0.1], [0.2, 0.2]])
    p = Discrete.from_schedule(beta_linear, 1000)
    n = 20000
    g = torch.Generator().manual_seed(0)
    x = sample_ddpm(
        gm.denoiser(p), p, p.prior_sample((n, 2), generator=g, dtype=torch.float64), grid_discrete(p, 1000), generator=g
    )
    freq = torch.bincount(gm.responsibilities(x).argmax(1), minlength=3).double() / n
    se = (gm.weights * (1 - gm.weights) / n).sqrt()
    assert bool(((freq - gm.weights).abs() < 4 * se).all())
