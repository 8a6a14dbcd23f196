"""The benchmark's anchors (benchmarks/anchors.py) and parity with same-named samplers of today's libraries.

1. Harness: each anchor (k-diffusion, diffusers), driven by the exact mixture denoiser at NFE 100,
   reproduces a moderate Gaussian mixture (weights, mean, covariance). This checks the glue (the
   process behind diffusers' timesteps, the scaled model input, the NFE budget), not the libraries.
2. Parity: on the same process, grid, start and exact denoiser, in float64, a torchdiffusion sampler
   and the same-named one of k-diffusion or diffusers give the same samples. Tolerances are relative
   (max |a - b| / max |b|):
   - k-diffusion computes in the sample's dtype: agreement to 1e-10.
   - diffusers keeps alphas_cumprod and sigmas in float32 (each coefficient rounded to ~6e-8) and
     DPMSolverMultistepScheduler.step even casts the sample to float32 and back at every step: the
     bound is float32 rounding, 1e-5 (DDIM, DDPM) and 1e-4 (DPM-Solver++), orders of magnitude below
     any algorithmic difference (a first- instead of second-order step changes samples by ~1e-2).
   Process matching: diffusers' timestep k is torchdiffusion's ``Discrete`` at t = k + 1 (ours has
   alpha_bar_0 = 1 at t = 0); ``Discrete`` is built from diffusers' own float32 alphas_cumprod.
Skipped where diffusers or k-diffusion is not installed (``pip install -e '.[compare]'``).
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import torchdiffusion.samplers as S
from torchdiffusion import EDM, Discrete, GaussianMixture

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Should have:UserWarning"),  # torchsde: Brownian-tree ends rounded
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # diffusers' numpy-2 copy keyword
]
F64 = torch.float64


def _load_anchors():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "anchors.py"
    spec = importlib.util.spec_from_file_location("anchors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


A = _load_anchors()


@pytest.fixture(scope="module")
def K():
    pytest.importorskip("torchsde")
    pytest.importorskip("scipy")
    K = A.load_k_diffusion_sampling()
    if K is None:
        pytest.skip("k-diffusion is not installed")
    return K


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def _ours(name):
    fn = getattr(S, name, None)
    if fn is None:
        pytest.skip(f"torchdiffusion.samplers.{name} does not exist yet")
    return fn


def _moderate() -> GaussianMixture:
    means = [[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]]
    return GaussianMixture([0.5, 0.3, 0.2], means, [[0.09, 0.04], [0.16, 0.09], [0.04, 0.25]])


def _sharp() -> GaussianMixture:
    ang = torch.arange(6, dtype=F64) * 2 * math.pi / 6
    return GaussianMixture([3, 1, 2, 1, 2, 1], torch.stack([2 * ang.cos(), 2 * ang.sin()], 1), 0.1**2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_mixture(x: torch.Tensor, gm: GaussianMixture) -> None:
    """Weights within 5 binomial standard errors, mean within 5 standard errors, covariance within 10%."""
    n = x.shape[0]
    k = gm.responsibilities(x).argmax(1)
    freq = torch.bincount(k, minlength=len(gm.weights)).to(F64) / n
    se = (gm.weights * (1 - gm.weights) / n).sqrt()
    assert bool(((freq - gm.weights).abs() < 5 * se).all()), (freq, gm.weights)
    cov = gm.covariance()
    assert bool(((x.double().mean(0) - gm.mean()).abs() < 5 * (cov.diag() / n).sqrt()).all())
    assert float(torch.linalg.norm(torch.cov(x.double().T) - cov) / torch.linalg.norm(cov)) < 0.1


# -- 1. the harness ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_euler_ancestral"])
def test_k_diffusion_anchor_reproduces_the_mixture(K, name):
    x, nfe = A.run_k_diffusion(name, _moderate(), 4000, 100, seed=1, dtype=F64)
    assert 99 <= nfe <= 100
    _check_mixture(x, _moderate())


@pytest.mark.parametrize(
    "name", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]
)
def test_diffusers_anchor_reproduces_the_mixture(diffusers, name):
    x, nfe = A.run_diffusers(name, _moderate(), 4000, 100, seed=1, dtype=F64)
    assert nfe == 100
    _check_mixture(x, _moderate())


def test_budgets_count_real_calls(K, diffusers):
    gm = _moderate()
    for name in A.KDIFF_SAMPLERS:
        assert A.run_k_diffusion(name, gm, 4, 10)[1] <= 10
    assert A.run_k_diffusion("sample_heun", gm, 4, 10)[1] == 9  # 5 sigmas: 4 Heun steps + 1 Euler step to 0
    assert A.run_diffusers("HeunDiscreteScheduler", gm, 4, 10)[1] == 9
    assert A.diffusers_steps_for_budget("PNDMScheduler", 10) is None  # its Runge-Kutta warm-up takes 12
    assert A.run_diffusers("PNDMScheduler", gm, 4, 20)[1] <= 20


def test_diffusers_process_matches_its_alphas_cumprod(diffusers):
    sched = A.make_scheduler("EulerDiscreteScheduler")
    p = A.scheduler_process(sched)
    t = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=F64)
    ab = sched.alphas_cumprod.to(F64)[t.long()]
    torch.testing.assert_close(p.alpha(t) ** 2, ab, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.sigma(t) ** 2, 1 - ab, rtol=1e-10, atol=0)
    sched.set_timesteps(7)  # fractional timesteps: the scheduler's interpolated sigma is ours
    sig = p.sigma(sched.timesteps.to(F64)) / p.alpha(sched.timesteps.to(F64))
    torch.testing.assert_close(sig, sched.sigmas[:-1].to(F64), rtol=1e-6, atol=0)


# -- 2. parity -------------------------------------------------------------------------------------


def _discrete_from(sched) -> Discrete:
    """torchdiffusion's Discrete with diffusers' float32 alphas_cumprod: ours at t = k + 1 is theirs at k."""
    ab = sched.alphas_cumprod.to(F64)
    return Discrete(1 - ab / torch.cat([torch.ones(1, dtype=F64), ab[:-1]]))


def _diffusers_parity(name, n, sched_kwargs=None, seed=3):
    gm = _sharp()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    theirs, _ = A.run_diffusers(name, gm, 64, n, n_steps=n, seed=seed, x=x, sched_kwargs=sched_kwargs, dtype=F64)
    sched = A.make_scheduler(name, **(sched_kwargs or {}))
    sched.set_timesteps(n)
    process = _discrete_from(sched)
    return gm, x, theirs, process, sched.timesteps.to(F64) + 1


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_agrees_with_diffusers(diffusers, set_alpha_to_one):
    """DDIMScheduler (eta = 0, "leading" timesteps 1 + k T/n in our t). With set_alpha_to_one its last step,
    from our t = 1, goes to alpha_bar = 1: x0_hat(x_1), our final denoise. Without it, it goes to
    alphas_cumprod[0], which is our t = 1 again: an identity step, i.e. final_denoise=False."""
    fn = _ours("sample_ddim")
    gm, x, theirs, process, ts = _diffusers_parity("DDIMScheduler", 10, {"set_alpha_to_one": set_alpha_to_one})
    ours = fn(gm.denoiser(process), process, x, ts, eta=0.0, final_denoise=set_alpha_to_one)
    assert _rel(ours, theirs) < 1e-5


def test_ddpm_agrees_with_diffusers(diffusers):
    """DDPMScheduler ("fixed_small" variance = the posterior variance, "leading" timesteps) and our
    sample_ddpm (posterior variance) draw the same noise from the same generator in the same order; the
    last step to alpha_bar = 1 is our final denoise."""
    gm, x, theirs, process, ts = _diffusers_parity("DDPMScheduler", 10)
    ours = S.sample_ddpm(gm.denoiser(process), process, x, ts, generator=torch.Generator().manual_seed(3))
    assert _rel(ours, theirs) < 1e-5


@pytest.mark.parametrize("n", [8, 12])
def test_dpm_solver_pp_2m_agrees_with_diffusers(diffusers, n):
    """DPMSolverMultistepScheduler's defaults (dpmsolver++, order 2, midpoint, "linspace" timesteps,
    final_sigmas_type="zero"). Its first step is first order (no history), like ours; its last step to
    sigma = 0 is first order, x = x0_hat: our final denoise at the last timestep. Its lower_order_final
    touches only that step (and, for order 3, the one before it).

    A documented difference: our lower_order_final (Lu et al.'s code) also makes the last steps before the
    final denoise lower-order when there are fewer than 10 of them, so with n = 8 timesteps (7 steps of
    ours) the defaults differ at the last step, and agree with lower_order_final=False; with n = 12 the
    defaults agree. float32 inside diffusers' step limits agreement to 1e-4; a first- instead of a
    second-order step changes the samples by more than 100 times that."""
    fn = _ours("sample_dpm_solver_pp")
    gm, x, theirs, process, ts = _diffusers_parity("DPMSolverMultistepScheduler", n)
    den = gm.denoiser(process)
    if n >= 11:
        assert _rel(fn(den, process, x, ts, order=2), theirs) < 1e-4
    else:
        assert _rel(fn(den, process, x, ts, order=2, lower_order_final=False), theirs) < 1e-4
        assert _rel(fn(den, process, x, ts, order=2), theirs) > 1e-2


@pytest.mark.parametrize(
    "ours_name, theirs_name, kwargs",
    [
        ("sample_euler", "sample_euler", {}),
        ("sample_heun", "sample_heun", {}),
        ("sample_dpm_solver_pp", "sample_dpmpp_2m", {"order": 2, "lower_order_final": False}),
    ],
)
def test_agrees_with_k_diffusion(K, ours_name, theirs_name, kwargs):
    """On EDM with k-diffusion's Karras sigmas: k-diffusion's last step, to its appended sigma = 0, returns
    the denoised value at sigmas[-2] (Euler, and Heun's and 2M's first-order last step), which is our
    final denoise at ts[-1] = sigmas[-2]. k-diffusion's 2M has no lower-order final steps: ours agrees
    with lower_order_final=False (our default lowers the last step on grids of fewer than 10 steps)."""
    fn = _ours(ours_name)
    gm, sigmas = _sharp(), A.kdiff_sigmas(8)
    x = 80.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    theirs = getattr(K, theirs_name)(A.kdiff_model(gm), x, sigmas, disable=True)
    process = EDM()
    ours = fn(gm.denoiser(process), process, x, sigmas[:-1], **kwargs)
    assert _rel(ours, theirs) < 1e-10
