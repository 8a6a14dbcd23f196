"""Sampler conformance suite and ground-truth tests (samplers/).

Every sampler registered in ``torchdiffusion.samplers.SAMPLERS`` must have a line in ``SPECS``
below; it then goes through every conformance test (shapes, 2-D and 4-D inputs, determinism,
batch independence, unmutated inputs, NFE, callbacks). The ground-truth tests run samplers
with the exact denoiser E[x0 | x_t] of a Gaussian mixture (testing.py) and compare the
samples with the mixture: weights (binomial standard errors), mean, covariance and
per-component moments, all within Z standard errors (conftest.Z: two-sided p ~ 2e-9 per check).
Float64 on the CPU, fixed seeds.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from conftest import Z, gen
from mixture_checks import check_mixture
from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, GaussianMixture
from torchdiffusion.core.optimized_grid import grid_optimized
from torchdiffusion.core.processes import beta_cosine, beta_linear
from torchdiffusion.core.timesteps import grid_discrete, grid_karras, grid_lam, grid_t
from torchdiffusion.names import SAMPLERS
from torchdiffusion.samplers import count_nfe, langevin_dynamics, sample_annealed_langevin, sample_ddpm

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


# --- the sampler table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How the conformance suite runs one sampler.

    kwargs: small knobs for fast tests. steps(n_ts): callbacks for a grid of n_ts times.
    nfe(n_ts, kwargs): denoiser calls before the final denoising step (which adds one when
    final_denoise and sigma(ts[-1]) > 0, see samplers/_loop.py); None where the solver chooses
    it (adaptive), then the NFE its callback reports is checked against the count.
    stochastic: draws noise (another seed gives other samples).
    batch_independent: example i's result depends on example i alone (not for adaptive step-size
    control, whose error norm is taken over the batch, as torchdiffeq and scipy do).
    """

    kwargs: dict = field(default_factory=dict)
    steps: Callable[[int], int] = lambda n_ts: n_ts - 1
    nfe: Callable[[int, dict], int] | None = lambda n_ts, kw: n_ts - 1
    stochastic: bool = True
    batch_independent: bool = True


SPECS = {
    "ddpm": Spec(),  # Ho et al. 2020, Algorithm 2: one call per pair (t, s)
    "ald": Spec(  # Song & Ermon 2019, Algorithm 1: n_steps_each calls per level
        kwargs={"n_steps_each": 3},
        steps=lambda n_ts: n_ts,
        nfe=lambda n_ts, kw: n_ts * kw["n_steps_each"],
    ),
    "reverse_sde": Spec(),  # Song et al. 2021, Eq. 6, Euler-Maruyama: one call per pair (t, s)
    "pc": Spec(  # Song et al. 2021, Algorithms 1-5: predictor + n_corrector Langevin calls per pair (t, s)
        kwargs={"n_corrector": 1},
        nfe=lambda n_ts, kw: (n_ts - 1) * (1 + kw["n_corrector"]),
        batch_independent=False,  # default batch_norms=True averages the Langevin step's norms over the batch
    ),
    "euler": Spec(stochastic=False),  # Song et al. 2021, Eq. 13 (Euler): 1 call per step
    "heun": Spec(kwargs={"churn": 1.0}, nfe=lambda n_ts, kw: 2 * (n_ts - 1)),  # Karras et al. 2022, Alg. 2
    "rk4": Spec(nfe=lambda n_ts, kw: 4 * (n_ts - 1), stochastic=False),  # classical RK4: 4 calls per step
    "ddim": Spec(stochastic=False),  # Song et al. 2021b, Eq. 12: 1 call per step
    "ddim_eta1": Spec(),  # Eq. 16 with eta = 1: DDPM's step
    "dpm_solver_2": Spec(nfe=lambda n_ts, kw: 2 * (n_ts - 1), stochastic=False),  # Lu et al. 2022, Alg. 1
    "dpm_solver_3": Spec(nfe=lambda n_ts, kw: 3 * (n_ts - 1), stochastic=False),  # Lu et al. 2022, Alg. 2
    "dpmpp_2m": Spec(stochastic=False),  # Lu et al. 2023, Algorithm 2: 1 call per step
    "dpmpp_3m": Spec(stochastic=False),  # 1 call per step
    "dpmpp_2m_sde": Spec(),  # SDE-DPM-Solver++(2M): 1 call, 1 noise draw per step
    "dpmpp_2s_ancestral": Spec(nfe=lambda n_ts, kw: 2 * (n_ts - 1)),  # 2S (2 calls) + 1 noise draw per step
    "unipc_2": Spec(stochastic=False),  # Zhao et al. 2023: 1 call per step (corrector reuses it)
    "unipc_3": Spec(stochastic=False),
    "optimized": Spec(stochastic=False),  # UniPC-3, or the stored weights on grid_optimized (the "VP-opt5" case)
    "ode_adaptive": Spec(steps=lambda n_ts: 1, nfe=None, stochastic=False, batch_independent=False),  # dopri5
}
NAMES = sorted(SAMPLERS)


def test_every_registered_sampler_has_a_spec():
    """A sampler added to SAMPLERS without a line in SPECS would escape the conformance suite."""
    assert set(SAMPLERS) == set(SPECS)


GM2 = GaussianMixture([0.2, 0.3, 0.5], [[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], [[0.5, 0.1], [0.2, 0.6], [0.3, 0.3]])
GM4 = GaussianMixture(
    [0.6, 0.15, 0.25],
    [[1.0, -1.0, 0.5, 2.0], [-2.0, 0.0, 1.5, -1.0], [0.0, 2.0, -2.0, 0.5]],
    [[0.2, 0.3, 0.1, 0.4], [0.5, 0.05, 0.2, 0.3], [0.1, 0.1, 0.6, 0.2]],
    shape=(1, 2, 2),
)
SHAPES = {"2d": GM2, "4d": GM4}

# (process, grid) pairs on which every sampler's defaults are valid
CASES = {
    "VP-lam": (VP(), lambda p: grid_lam(p, 6)),
    "VE-lam": (VE(), lambda p: grid_lam(p, 6)),
    "Discrete50": (Discrete.from_schedule(beta_linear, 50), lambda p: grid_discrete(p, 8)),
    "VP-opt5": (VP(), lambda p: grid_optimized(p, 5)),  # where sample_optimized uses its stored weights
}


def _run(name, process, x, ts, seed=0, gm=GM2, denoiser=None, **extra):
    kw = {**SPECS[name].kwargs, **extra}
    denoiser = denoiser or gm.denoiser(process)
    return SAMPLERS[name](denoiser, process, x, ts, generator=gen(seed), **kw)


def _start(process, gm, n, seed):
    return process.prior_sample((n, *gm.shape), generator=gen(seed), dtype=F64)


# --- conformance --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_shape_and_finite(name, case, shape, dtype):
    """Samplers work for any tensor shape: (B, 2) points and (B, 1, 2, 2) images alike, and return
    x's dtype (coefficients in float64, cast back; DESIGN.md)."""
    process, grid = CASES[case]
    gm = SHAPES[shape]
    x = _start(process, gm, 16, seed=1).to(dtype)
    out = _run(name, process, x, grid(process), gm=gm)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES)
def test_deterministic_given_generator(name, case):
    """Noise comes only from the generator: the same seed gives the same samples, another seed others."""
    process, grid = CASES[case]
    x = _start(process, GM4, 8, seed=2)
    a = _run(name, process, x, grid(process), seed=5, gm=GM4)
    b = _run(name, process, x, grid(process), seed=5, gm=GM4)
    c = _run(name, process, x, grid(process), seed=6, gm=GM4)
    assert torch.equal(a, b)
    if SPECS[name].stochastic:
        assert float((a - c).abs().min()) > 0
    else:
        assert torch.equal(a, c)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_independence(name, case, shape):
    """Example 0's sample depends only on example 0: change examples 1..7, keep the generator seed
    (noise is drawn shaped like x, so example 0 sees the same noise) and the per-example exact denoiser."""
    if not SPECS[name].batch_independent:
        pytest.skip("adaptive step-size control measures the error over the whole batch")
    process, grid = CASES[case]
    gm = SHAPES[shape]
    x = _start(process, gm, 8, seed=3)
    y = x.clone()
    y[1:] = _start(process, gm, 7, seed=4)
    a = _run(name, process, x, grid(process), seed=7, gm=gm)
    b = _run(name, process, y, grid(process), seed=7, gm=gm)
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    assert float((a[1:] - b[1:]).abs().min()) > 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES)
def test_inputs_not_mutated(name, case):
    """Samplers never modify x or ts (DESIGN.md, samplers are plain functions)."""
    process, grid = CASES[case]
    x = _start(process, GM2, 8, seed=5)
    ts = grid(process)
    x_copy, ts_copy = x.clone(), ts.clone()
    _run(name, process, x, ts)
    assert torch.equal(x, x_copy) and torch.equal(ts, ts_copy)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("final_denoise", [True, False])
def test_nfe_as_documented(name, case, final_denoise):
    """NFE: ddpm len(ts) - 1, ald len(ts) * n_steps_each, plus 1 for the final denoising step when
    sigma(ts[-1]) > 0 (samplers/_loop.py; Ho et al. 2020, Algorithm 2, last line)."""
    process, grid = CASES[case]
    ts = grid(process)
    d = count_nfe(GM2.denoiser(process))
    seen = []
    x = _start(process, GM2, 4, seed=6)
    _run(name, process, x, ts, denoiser=d, final_denoise=final_denoise, callback=lambda info: seen.append(info["nfe"]))
    extra = 1 if final_denoise and float(process.sigma(ts[-1])) > 0 else 0
    expected = SPECS[name].nfe(len(ts), SPECS[name].kwargs) if SPECS[name].nfe else seen[-1]
    assert d.nfe == expected + extra


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES)
def test_callback_once_per_step(name, case):
    """The callback gets {i, t, x, x0_hat, nfe} once per step, in order, with the NFE used so far."""
    process, grid = CASES[case]
    ts = grid(process)
    d = count_nfe(GM4.denoiser(process))
    x = _start(process, GM4, 4, seed=7)
    seen = []
    _run(name, process, x, ts, gm=GM4, denoiser=d, callback=lambda info: seen.append((dict(info), d.nfe)))
    assert len(seen) == SPECS[name].steps(len(ts))
    for i, (info, counted) in enumerate(seen):
        assert set(info) == {"i", "t", "x", "x0_hat", "nfe"}
        assert info["i"] == i
        assert info["t"] == pytest.approx(float(ts[i]), rel=1e-6)
        assert info["x"].shape == x.shape and info["x0_hat"].shape == x.shape
        assert info["nfe"] == counted
    if SPECS[name].nfe is not None:
        assert seen[-1][0]["nfe"] == SPECS[name].nfe(len(ts), SPECS[name].kwargs)


def test_ddpm_rejects_unknown_options():
    p = VP()
    x = _start(p, GM2, 2, seed=8)
    with pytest.raises(TypeError, match="beta_variance"):  # a flag, not a name
        sample_ddpm(GM2.denoiser(p), p, x, grid_t(p, 3), beta_variance="learned")
    with pytest.raises(TypeError, match="eps_form"):  # the update's form is a flag, not a string
        sample_ddpm(GM2.denoiser(p), p, x, grid_t(p, 3), eps_form="v")
    with pytest.raises(ValueError):
        sample_ddpm(GM2.denoiser(p), p, x, torch.tensor([0.1, 0.5], dtype=F64))


def test_ddpm_grid_ending_at_data_needs_no_final_denoise():
    """A DDPM grid ending at t = 0 (sigma = 0) lands on the data: no noise on the last step and no
    extra evaluation (Ho et al. 2020, Algorithm 2, z = 0 for t = 1)."""
    p = Discrete.from_schedule(beta_linear, 50)
    ts = torch.cat([grid_discrete(p, 50), torch.zeros(1, dtype=F64)])
    d = count_nfe(GM2.denoiser(p))
    x = _start(p, GM2, 6, seed=9)
    a = sample_ddpm(d, p, x, ts, generator=gen(1))
    assert d.nfe == len(ts) - 1
    # the last step returns the posterior mean at s = 0, which is x0_hat at t = 1: Algorithm 2's output
    b = sample_ddpm(GM2.denoiser(p), p, x, ts[:-1], generator=gen(1))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_last_step_to_data_is_noise_free(variance):
    """Ho et al. 2020, Algorithm 2, line 3: z = 0 on the last step (t = 1 -> 0), for either choice of
    sigma_t^2 (beta-tilde or beta). On a point mass at m the exact denoiser returns m, and the step to
    s = 0 has mean c_x x + c_0 m with c_x = 0, c_0 = 1, so the samples are exactly m."""
    p = Discrete.from_schedule(beta_linear, 50)
    m = torch.tensor([0.7, -1.3], dtype=F64)
    point = GaussianMixture([1.0], m[None], [[0.0, 0.0]])
    ts = torch.cat([grid_discrete(p, 50), torch.zeros(1, dtype=F64)])
    out = sample_ddpm(
        point.denoiser(p), p, _start(p, point, 64, seed=15), ts, beta_variance=variance == "beta", generator=gen(8)
    )
    torch.testing.assert_close(out, m.expand(64, 2), rtol=0, atol=1e-12)


def test_ald_rejects_bad_options():
    p = VE()
    x = _start(p, GM2, 2, seed=10)
    with pytest.raises(ValueError):
        sample_annealed_langevin(GM2.denoiser(p), p, x, grid_lam(p, 3), n_steps_each=0)
    with pytest.raises(ValueError):
        sample_annealed_langevin(GM2.denoiser(p), p, x, grid_lam(p, 3), step_eps=0.0)
    q = Discrete.from_schedule(beta_linear, 50)
    with pytest.raises(ValueError):  # sigma(0) = 0: no score at the last level
        sample_annealed_langevin(GM2.denoiser(q), q, x, torch.tensor([10.0, 0.0], dtype=F64))


# --- equivalences -----------------------------------------------------------------------------------

EQUIV = {
    "VP": (VP(), lambda p: grid_t(p, 40)),
    "Cosine": (Cosine(), lambda p: grid_lam(p, 40)),
    "VE": (VE(), lambda p: grid_lam(p, 40)),
    "EDM": (EDM(), lambda p: grid_karras(p, 40)),
    "Flow-below-1": (Flow(), lambda p: grid_t(p, 40, t_start=0.999)),
    "Discrete50": (Discrete.from_schedule(beta_linear, 50), lambda p: grid_discrete(p, 50)),
}


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("case", EQUIV)
def test_ddpm_x0_form_equals_eps_form(case, variance):
    """sample_ddpm's default (seed 003, mu_q with x0_hat) equals eps_form=True (Ho et al. 2020,
    Algorithm 2: (x_t - sigma_ts^2/sigma_t eps_hat) / alpha_ts) for the same noise."""
    process, grid = EQUIV[case]
    x = _start(process, GM2, 32, seed=11)
    a = sample_ddpm(
        GM2.denoiser(process),
        process,
        x,
        grid(process),
        eps_form=False,
        beta_variance=variance == "beta",
        generator=gen(2),
    )
    b = sample_ddpm(
        GM2.denoiser(process),
        process,
        x,
        grid(process),
        eps_form=True,
        beta_variance=variance == "beta",
        generator=gen(2),
    )
    scale = float(x.abs().max())
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * scale)


def test_ddpm_eps_form_on_flow_from_t_max_is_a_clear_error():
    """Flow has alpha(1) = 0, so Algorithm 2's 1/alpha_ts is infinite on the first step: eps_form=True
    refuses with a clear error, the default (seed 003) stays finite."""
    p = Flow()
    x = _start(p, GM2, 8, seed=12)
    a = sample_ddpm(GM2.denoiser(p), p, x, grid_t(p, 20), eps_form=False, generator=gen(3))
    assert bool(torch.isfinite(a).all())
    with pytest.raises(ValueError, match="eps_form"):
        sample_ddpm(GM2.denoiser(p), p, x, grid_t(p, 20), eps_form=True, generator=gen(3))


# --- exact laws on Gaussian data --------------------------------------------------------------------
#
# With Gaussian data N(m, v) (per coordinate) the exact denoiser is linear,
# E[x0 | x_t] = m + k_t (x - alpha_t m), k_t = v alpha_t / (alpha_t^2 v + sigma_t^2),
# so each sampler is a linear Gaussian recursion and its output law N(M, V) is known exactly.


def _ddpm_gaussian_law(process, ts, m, v, M, V, variance="posterior"):
    """Mean and variance after DDPM ancestral sampling (Ho et al. 2020, Eq. 7 with x0_hat) from N(M, V),
    coefficients written out from alpha and sigma."""
    a = lambda t: float(process.alpha(t))  # noqa: E731
    s = lambda t: float(process.sigma(t))  # noqa: E731
    for t, u in zip(ts[:-1], ts[1:]):
        a_ts = a(t) / a(u)
        var_ts = s(t) ** 2 - a_ts**2 * s(u) ** 2
        c_x, c_0 = a_ts * s(u) ** 2 / s(t) ** 2, a(u) * var_ts / s(t) ** 2
        noise = var_ts * s(u) ** 2 / s(t) ** 2 if variance == "posterior" else var_ts
        k = v * a(t) / (a(t) ** 2 * v + s(t) ** 2)
        M = c_x * M + c_0 * (m + k * (M - a(t) * m))
        V = (c_x + c_0 * k) ** 2 * V + noise
    t = ts[-1]
    k = v * a(t) / (a(t) ** 2 * v + s(t) ** 2)  # final denoising step
    return m + k * (M - a(t) * m), k**2 * V


def _ald_gaussian_law(process, ts, m, v, M, V, n_steps_each, step_eps):
    """Mean and variance after annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) from N(M, V):
    score = -(x - alpha m) / S, S = alpha^2 v + sigma^2; x <- x + a/2 score + sqrt(a) z,
    a = step_eps sigma^2 / sigma_L^2; then the final denoising step."""
    a = lambda t: float(process.alpha(t))  # noqa: E731
    s = lambda t: float(process.sigma(t))  # noqa: E731
    s_L = s(ts[-1])
    for t in ts:
        step = step_eps * s(t) ** 2 / s_L**2
        S = a(t) ** 2 * v + s(t) ** 2
        r = 1 - step / (2 * S)
        for _ in range(n_steps_each):
            M = a(t) * m + r * (M - a(t) * m)
            V = r**2 * V + step
    t = ts[-1]
    k = v * a(t) / (a(t) ** 2 * v + s(t) ** 2)
    return m + k * (M - a(t) * m), k**2 * V


GAUSS = GaussianMixture([1.0], [[1.5, -0.7]], [[0.4, 2.0]])


def _check_gaussian_law(x, M, V):
    n = x.shape[0]
    for d in range(x.shape[1]):
        assert abs(float(x[:, d].mean()) - M[d]) < Z * math.sqrt(V[d] / n), f"mean, coordinate {d}"
        assert abs(float(x[:, d].var()) - V[d]) < Z * V[d] * math.sqrt(2 / (n - 1)), f"variance, coordinate {d}"


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize(
    "process, grid",
    [
        (VP(), lambda p: grid_t(p, 12)),
        (VE(), lambda p: grid_lam(p, 12)),
        (Discrete.from_schedule(beta_cosine, 50), lambda p: grid_discrete(p, 10)),
    ],
    ids=["VP", "VE", "Discrete"],
)
def test_ddpm_exact_law_on_gaussian_data(process, grid, variance):
    """On Gaussian data the coarse-grid DDPM sampler (Ho et al. 2020, Eq. 7 and Algorithm 2) is a linear
    Gaussian recursion: its samples have exactly the mean and variance that recursion predicts."""
    n = 20_000
    ts = grid(process)
    x = _start(process, GAUSS, n, seed=13)
    out = sample_ddpm(GAUSS.denoiser(process), process, x, ts, beta_variance=variance == "beta", generator=gen(4))
    sT2 = float(process.sigma(ts[0])) ** 2
    laws = [_ddpm_gaussian_law(process, ts, m, v, 0.0, sT2, variance) for m, v in ((1.5, 0.4), (-0.7, 2.0))]
    _check_gaussian_law(out, [law[0] for law in laws], [law[1] for law in laws])


def test_ald_exact_law_on_gaussian_data():
    """On Gaussian data annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) is a linear Gaussian
    recursion; with few steps per level it is far from equilibrium, so this checks the step a_i =
    step_eps sigma_i^2 / sigma_L^2, the update x + a_i/2 score + sqrt(a_i) z and the final denoise."""
    p, n = VE(), 20_000
    ts = grid_lam(p, 8)
    x = _start(p, GAUSS, n, seed=14)
    out = sample_annealed_langevin(GAUSS.denoiser(p), p, x, ts, n_steps_each=4, step_eps=2e-5, generator=gen(5))
    sT2 = float(p.sigma(ts[0])) ** 2
    laws = [_ald_gaussian_law(p, ts, m, v, 0.0, sT2, 4, 2e-5) for m, v in ((1.5, 0.4), (-0.7, 2.0))]
    _check_gaussian_law(out, [law[0] for law in laws], [law[1] for law in laws])


@pytest.mark.parametrize("tau_over_s2", [0.5, 0.02])
def test_langevin_dynamics_exact_law(tau_over_s2):
    """Unadjusted Langevin x <- x + tau score + sqrt(2 tau) z (seed 003, "Langevin Dynamics") on N(m, s^2):
    x_k - m = (1 - r)^k (x_0 - m) + noise, r = tau / s^2, so from a fixed x_0 the law after k steps is
    N(m + (1-r)^k (x_0 - m), V (1 - (1-r)^(2k))) with stationary V = s^2 / (1 - tau / (2 s^2))."""
    m = torch.tensor([1.5, -0.5], dtype=F64)
    s2 = torch.tensor([0.64, 2.0], dtype=F64)
    tau = tau_over_s2 * 0.64  # the same step on both coordinates
    n = 40_000
    x0 = torch.full((n, 2), -2.0, dtype=F64)
    calls = []
    for k in (3, 400):
        out = langevin_dynamics(
            lambda x: -(x - m) / s2, x0, step_size=tau, n_steps=k, generator=gen(6), callback=calls.append
        )
        r = tau / s2
        V = s2 / (1 - tau / (2 * s2))
        mean = m + (1 - r) ** k * (-2.0 - m)
        var = V * (1 - (1 - r) ** (2 * k))
        _check_gaussian_law(out, mean.tolist(), var.tolist())
    assert len(calls) == 403 and calls[-1]["i"] == 399
    assert torch.equal(x0, torch.full((n, 2), -2.0, dtype=F64))


def test_langevin_dynamics_edge_cases():
    x = torch.randn(3, 2, generator=gen(7), dtype=F64)
    assert torch.equal(langevin_dynamics(lambda y: -y, x, step_size=0.1, n_steps=0), x)
    with pytest.raises(ValueError):
        langevin_dynamics(lambda y: -y, x, step_size=0.0, n_steps=3)
    with pytest.raises(ValueError):
        langevin_dynamics(lambda y: -y, x, step_size=0.1, n_steps=-1)


# --- ground truth: a Gaussian mixture ------------------------------------------------------------------


def _exact_start(process, gm, n, seed):
    """Exact samples of p_T (data pushed through q(x_T | x0)), so that only the sampler's own error
    is measured, not the prior's mismatch alpha(t_max) x0."""
    g = gen(seed)
    x0 = gm.sample(n, generator=g)
    return process.perturb(x0, torch.tensor(process.t_max, dtype=F64), torch.randn(x0.shape, generator=g, dtype=F64))


def _ddpm_var_from_exact_start(process, ts, v):
    """Output variance of DDPM on an isolated Gaussian component of variance v, started from p_T."""
    var_T = float(process.alpha(ts[0])) ** 2 * v + float(process.sigma(ts[0])) ** 2
    return _ddpm_gaussian_law(process, ts, 0.0, v, 0.0, var_T)[1]


def test_ddpm_discrete_t1000_reproduces_mixture():
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on Discrete linear T = 1000 with
    grid_discrete(process, 1000) and the exact denoiser reproduces the mixture.

    With x0_hat = E[x0 | x_t] and the posterior variance beta-tilde, each step misses
    c_0^2 Var[x0 | x_t] of variance (the spread of x0 given x_t), an O(1/T) deficit; on an isolated
    Gaussian component it is given exactly by the linear recursion _ddpm_gaussian_law (about -2%
    here, under one standard error), which the per-component variance check uses."""
    p = Discrete.from_schedule(beta_linear, 1000)
    ts = grid_discrete(p, 1000)
    x = sample_ddpm(GM2.denoiser(p), p, _exact_start(p, GM2, 4000, seed=20), ts, generator=gen(21))
    check_mixture(x, GM2, lambda v: _ddpm_var_from_exact_start(p, ts, v))


def test_ddpm_vp_reproduces_mixture():
    """DDPM ancestral sampling on the continuous VP process (Song et al. 2021, Eq. 11) with
    grid_t(process, 500) reproduces the mixture (variance deficit as in the discrete test)."""
    p = VP()
    ts = grid_t(p, 500)
    x = sample_ddpm(GM2.denoiser(p), p, _exact_start(p, GM2, 4000, seed=22), ts, generator=gen(23))
    check_mixture(x, GM2, lambda v: _ddpm_var_from_exact_start(p, ts, v))


def test_ald_ve_reproduces_mixture():
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) on VE with grid_lam(VE(), L)
    (geometric sigmas 50 .. 0.01) reproduces the mixture.

    Langevin is exact only as the step -> 0 and the steps per level -> infinity. At the paper's
    L = 10, n_steps_each = 100 the samples are visibly biased (component weights off by about 0.03
    in a trial run; within-component variances inflated by 12%, from the Gaussian recursion): at
    small sigma the step a_i = step_eps sigma_i^2 / sigma_L^2 is too small to equilibrate within a
    component, and the weights freeze too early. L = 200 levels with n_steps_each = 20 at the
    default step_eps = 2e-5 bring the weight bias below one standard error at n = 4000 (about 0.005
    in trial runs with n = 40000); the leftover variance excess (+2.2%, from the last levels not
    equilibrating) is given exactly by the Gaussian recursion _ald_gaussian_law, which the
    per-component check uses."""
    p = VE()
    L, n_each, eps = 200, 20, 2e-5
    ts = grid_lam(p, L)
    x = sample_annealed_langevin(
        GM2.denoiser(p),
        p,
        _exact_start(p, GM2, 4000, seed=24),
        ts,
        n_steps_each=n_each,
        step_eps=eps,
        generator=gen(25),
    )
    sT2 = float(p.sigma(ts[0])) ** 2
    check_mixture(x, GM2, lambda v: _ald_gaussian_law(p, ts, 0.0, v, 0.0, v + sT2, n_each, eps)[1])
