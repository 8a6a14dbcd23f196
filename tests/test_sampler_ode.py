"""Probability-flow ODE samplers (samplers/ode.py) against closed forms.

- Gaussian data N(m, v) per coordinate: the exact denoiser is linear and the probability-flow ODE
  (Song et al. 2021, Eq. 13) maps x_t to x_s = alpha_s m + sqrt(alpha_s^2 v + sigma_s^2) /
  sqrt(alpha_t^2 v + sigma_t^2) (x_t - alpha_t m) (each marginal N(alpha m, alpha^2 v + sigma^2) is
  carried to the next by the monotone affine map between them). Solvers must show their order
  on a log-log fit of the max error over a batch of starts.
- A Gaussian mixture (testing.py): samples from exact p_T must come out with the mixture's weights,
  means and covariances (Z standard errors, conftest.Z).
- Parity with k-diffusion's Karras et al. 2022 samplers on EDM, when its sampling module loads.
Float64 on the CPU, fixed seeds.
"""

import math

import pytest
import torch

from conftest import Z, gen
from mixture_checks import check_mixture, gaussian_flow_map, observed_order
from torchdiffusion import EDM, VE, VP, Cosine, Flow, GaussianMixture, SubVP
from torchdiffusion.core.timesteps import grid_karras, grid_lam, grid_t
from torchdiffusion.samplers import count_nfe
from torchdiffusion.samplers.ode import sample_euler, sample_heun, sample_ode_adaptive, sample_rk4

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
FIXED = {"euler": sample_euler, "heun": sample_heun, "rk4": sample_rk4}
ALL = {**FIXED, "adaptive": sample_ode_adaptive}
NFE_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}  # the docstrings' counts

M, V = [1.5, -0.7], [0.3, 2.5]
GAUSS = GaussianMixture([1.0], [M], [V])
GM2 = GaussianMixture([0.2, 0.3, 0.5], [[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], [[0.5, 0.1], [0.2, 0.6], [0.3, 0.3]])
GM4 = GaussianMixture(GM2.weights, GM2.means.repeat(1, 2), GM2.variances.repeat(1, 2), shape=(1, 2, 2))
GM4_FLAT = GaussianMixture(GM2.weights, GM2.means.repeat(1, 2), GM2.variances.repeat(1, 2))

# Grids over the whole interval t_max -> t_min (Gaussian data keep the ODE non-stiff at small t);
# Flow starts at t = 1, where alpha = 0.
PROCESSES = {
    "VP": (VP(), grid_t),
    "SubVP": (SubVP(), grid_t),
    "VE": (VE(), grid_t),
    "Cosine": (Cosine(), grid_t),
    "EDM": (EDM(), grid_karras),
    "Flow": (Flow(), grid_t),
}


def _f(fn, t) -> float:
    return float(fn(torch.as_tensor(t, dtype=F64)))


def _exact_start(process, gm, n, seed, t=None):
    """Exact samples of p_t (data pushed through q(x_t | x0)): only the sampler's error is measured."""
    g = gen(seed)
    x0 = gm.sample(n, generator=g)
    t = process.t_max if t is None else t
    return process.perturb(x0, torch.tensor(t, dtype=F64), torch.randn(x0.shape, generator=g, dtype=F64))


def _flow_map(process, x, t, s):
    """The exact probability-flow ODE map x_t -> x_s on this file's Gaussian data."""
    return gaussian_flow_map(process, x, t, s, M, V)


# --- convergence order on Gaussian data -----------------------------------------------------------

ORDER = {"euler": (0.8, 1.3), "heun": (1.8, 2.4), "rk4": (3.0, 5.0)}


@pytest.mark.parametrize("name", FIXED)
@pytest.mark.parametrize("case", PROCESSES)
def test_convergence_order_on_gaussian_data(case, name):
    """Euler is order 1, Heun (Karras et al. 2022, Algorithm 1) order 2, classical RK4 order 4 on the
    probability-flow ODE (Song et al. 2021, Eq. 13), against its exact map on Gaussian data."""
    process, grid = PROCESSES[case]
    x = _exact_start(process, GAUSS, 64, seed=1)
    ns, errs = (20, 40, 80, 160), []
    for n in ns:
        ts = grid(process, n)
        out = FIXED[name](GAUSS.denoiser(process), process, x, ts, final_denoise=False)
        errs.append(float((out - _flow_map(process, x, ts[0], ts[-1])).abs().max()))
    lo, hi = ORDER[name]
    assert lo <= observed_order(ns, errs) <= hi, f"errors {errs}"


@pytest.mark.parametrize("tol", [1e-6, 1e-8])
@pytest.mark.parametrize("case", PROCESSES)
def test_adaptive_error_and_nfe(case, tol):
    """dopri5 (Dormand & Prince 1980, via torchdiffeq) from ts[0] to ts[-1] lands within 10 tol of the exact
    flow map (it controls the local error, RMS over the batch, so the global max error is a few tol);
    the NFE it reports is the number of denoiser calls."""
    process, grid = PROCESSES[case]
    x = _exact_start(process, GAUSS, 64, seed=2)
    ts = grid(process, 5)
    d = count_nfe(GAUSS.denoiser(process))
    out, nfe = sample_ode_adaptive(d, process, x, ts, rtol=tol, atol=tol, final_denoise=False, return_nfe=True)
    assert float((out - _flow_map(process, x, ts[0], ts[-1])).abs().max()) < 10 * tol
    assert nfe == d.nfe > 0


def test_adaptive_uses_only_the_ends_of_ts():
    """sample_ode_adaptive integrates from ts[0] to ts[-1]; interior points of ts change nothing."""
    p = VP()
    x = _exact_start(p, GM2, 16, seed=3)
    a = sample_ode_adaptive(GM2.denoiser(p), p, x, grid_t(p, 3))
    b = sample_ode_adaptive(GM2.denoiser(p), p, x, grid_lam(p, 17))
    assert torch.equal(a, b)


# --- the ends of the interval (samplers/_loop.py policy) ------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_finite_at_both_ends(continuous_process, name):
    """No NaN from t_max (Flow: t = 1, alpha = 0, where the velocity alpha' x0_hat + sigma' eps_hat = x - x0_hat
    stays finite) to t_min, nor on a grid that lands on sigma = 0 where the process has such a time."""
    p = continuous_process
    x = _exact_start(p, GM2, 16, seed=4)
    ts = grid_t(p, 6)
    assert bool(torch.isfinite(ALL[name](GM2.denoiser(p), p, x, ts)).all())
    if _f(p.sigma, 0.0) == 0.0:
        ts0 = torch.cat([ts, torch.zeros(1, dtype=F64)])
        assert bool(torch.isfinite(ALL[name](GM2.denoiser(p), p, x, ts0)).all())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("process", [EDM(), Flow(), VP()], ids=["EDM", "Flow", "VP"])
def test_landing_on_data_is_the_final_denoise(process, name):
    """A last step onto sigma(s) = 0 returns x0_hat(x_t, t) (samplers/_loop.py): the same as stopping at t
    with the final denoising step, and no extra call (Karras et al. 2022, Algorithm 1: Euler to t_N = 0)."""
    ts = grid_t(process, 6)
    ts0 = torch.cat([ts, torch.zeros(1, dtype=F64)])
    x = _exact_start(process, GM2, 16, seed=5)
    d = count_nfe(GM2.denoiser(process))
    a = ALL[name](d, process, x, ts0)
    n_landing = d.nfe
    b = ALL[name](count_nfe(GM2.denoiser(process)), process, x, ts, final_denoise=True)
    assert torch.equal(a, b)
    if name in FIXED:
        assert n_landing == NFE_PER_STEP[name] * 6 + 1


def test_euler_from_flow_t1_is_the_rectified_flow_step():
    """At Flow t = 1 (alpha = 0, x = eps) the velocity is eps - x0_hat (Liu et al. 2022): one Euler step to s
    gives x + (s - 1)(x - x0_hat(x, 1)) exactly."""
    p = Flow()
    x = torch.randn(32, 2, generator=gen(6), dtype=F64)
    ts = torch.tensor([1.0, 0.75], dtype=F64)
    out = sample_euler(GM2.denoiser(p), p, x, ts, final_denoise=False)
    x0_hat = GM2.denoiser(p)(x, torch.ones(32, dtype=F64))
    torch.testing.assert_close(out, x + (0.75 - 1.0) * (x - x0_hat), rtol=1e-14, atol=1e-14)


# --- Heun's churn (Karras et al. 2022, Algorithm 2) ---------------------------------------------


class _Recorder:
    """A denoiser that records the (x, t) of every call."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []

    def __call__(self, x, t, **cond):
        self.calls.append((x, t))
        return self.denoiser(x, t, **cond)


@pytest.mark.parametrize(
    "process, t_start",
    [(VP(), 0.4), (SubVP(), 0.4), (VE(), 0.5), (Cosine(), 0.5), (EDM(), 3.0), (Flow(), 0.6)],
    ids=["VP", "SubVP", "VE", "Cosine", "EDM", "Flow"],
)
def test_churn_reaches_p_t_hat_exactly(process, t_start):
    """Churn (Algorithm 2, lines 4-6) in y = x/alpha with rho = sigma/alpha (Karras Sec. 4): with gamma =
    sqrt(2) - 1, rho(t_hat) = sqrt(2) rho(t) and x_hat = alpha(t_hat) (y + sqrt(rho_hat^2 - rho^2) z) is an
    exact sample of p_{t_hat} = N(alpha_hat m, alpha_hat^2 v + sigma_hat^2) when x_t is one of p_t."""
    n = 20_000
    x = _exact_start(process, GAUSS, n, seed=7, t=t_start)
    ts = grid_t(process, 4, t_start=t_start, t_end=t_start / 2)
    rec = _Recorder(GAUSS.denoiser(process))
    sample_heun(rec, process, x, ts, churn=100.0, generator=gen(8))
    x_hat, t_hat = rec.calls[0]
    t_hat = float(t_hat[0])
    rho = lambda t: _f(process.sigma, t) / _f(process.alpha, t)  # noqa: E731
    assert rho(t_hat) == pytest.approx(math.sqrt(2) * rho(t_start), rel=1e-9)
    a, s = _f(process.alpha, t_hat), _f(process.sigma, t_hat)
    for d in range(2):
        mean, var = a * M[d], a**2 * V[d] + s**2
        assert abs(float(x_hat[:, d].mean()) - mean) < Z * math.sqrt(var / n), f"mean, coordinate {d}"
        assert abs(float(x_hat[:, d].var()) - var) < Z * var * math.sqrt(2 / (n - 1)), f"variance, coordinate {d}"


@pytest.mark.parametrize("final_denoise", [True, False])
def test_churn_gamma_and_window(final_denoise):
    """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0 (Algorithm 2, line 3),
    N counting Karras' steps to t_N = 0: len(ts) - 1, plus the final denoising step. On EDM t_hat = t (1 + gamma)."""
    p = EDM()
    ts = grid_karras(p, 10)  # 11 times
    n_karras = 10 + int(final_denoise)
    rec = _Recorder(GM2.denoiser(p))
    sample_heun(
        rec,
        p,
        _exact_start(p, GM2, 4, seed=9),
        ts,
        churn=1.1,
        t_min_churn=0.5,
        t_max_churn=20.0,
        final_denoise=final_denoise,
        generator=gen(10),
    )
    t_hats = [float(t[0]) for _, t in rec.calls[0:20:2]]  # first stage of each Heun step
    for t, t_hat in zip(ts[:-1].tolist(), t_hats):
        gamma = 1.1 / n_karras if 0.5 <= t <= 20.0 else 0.0
        assert t_hat == pytest.approx(t * (1 + gamma), rel=1e-12)


def test_churn_never_goes_beyond_t_max():
    """Churn at t_max is capped at the process's end: t_hat = t_max and x_hat = x (EDM and k-diffusion go
    above sigma_max unless S_tmax < sigma_max, as in Karras et al.'s settings)."""
    p = VP()
    x = _exact_start(p, GM2, 8, seed=11)
    rec = _Recorder(GM2.denoiser(p))
    sample_heun(rec, p, x, grid_t(p, 4), churn=10.0, generator=gen(12))
    x_hat, t_hat = rec.calls[0]
    assert float(t_hat[0]) == p.t_max
    torch.testing.assert_close(x_hat, x, rtol=1e-15, atol=0)


# --- ground truth: a Gaussian mixture ---------------------------------------------------------------


MIXTURE_RUNS = {
    # Karras et al. 2022, Algorithm 2 with their S_tmin, S_tmax; S_churn / N = 10 / 65 keeps its O(gamma)
    # bias (the Heun step runs from t_hat = t (1 + gamma)) below the statistical tolerance.
    "heun-churn-EDM": (
        sample_heun,
        EDM(),
        lambda p: grid_karras(p, 64),
        {"churn": 10.0, "t_min_churn": 0.05, "t_max_churn": 50.0},
    ),
    "heun-churn-VP": (sample_heun, VP(), lambda p: grid_karras(p, 64), {"churn": 10.0}),
    "heun-Flow": (sample_heun, Flow(), lambda p: grid_t(p, 40), {}),
    "rk4-Cosine": (sample_rk4, Cosine(), lambda p: grid_lam(p, 20), {}),
    "euler-VP": (sample_euler, VP(), lambda p: grid_t(p, 200), {}),
    "adaptive-VE": (sample_ode_adaptive, VE(), lambda p: grid_lam(p, 2), {}),
}


@pytest.mark.parametrize("run", MIXTURE_RUNS)
def test_reproduces_mixture(run):
    """With the exact denoiser E[x0 | x_t] and exact samples of p_T, the ODE samplers (and Heun with churn)
    reproduce the mixture's weights, component moments, mean and covariance."""
    fn, p, grid, kw = MIXTURE_RUNS[run]
    x = _exact_start(p, GM2, 4000, seed=13)
    check_mixture(fn(GM2.denoiser(p), p, x, grid(p), generator=gen(14), **kw), GM2)


# --- conformance: NFE, callbacks, determinism, shapes, inputs ---------------------------------------


@pytest.mark.parametrize("final_denoise", [True, False])
@pytest.mark.parametrize("name", FIXED)
def test_nfe_and_callback(name, final_denoise):
    """NFE per step as documented (Euler 1, Heun 2, RK4 4), plus 1 for the final denoise; the callback gets
    {i, t, x, x0_hat, nfe} once per step with the NFE so far."""
    p = VP()
    ts = grid_lam(p, 7)
    d = count_nfe(GM2.denoiser(p))
    seen = []
    kw = {"churn": 5.0} if name == "heun" else {}
    FIXED[name](
        d,
        p,
        _exact_start(p, GM2, 4, seed=15),
        ts,
        final_denoise=final_denoise,
        generator=gen(1),
        callback=lambda info: seen.append((info, d.nfe)),
        **kw,
    )
    assert d.nfe == NFE_PER_STEP[name] * 7 + int(final_denoise)
    assert [info["i"] for info, _ in seen] == list(range(7))
    for i, (info, counted) in enumerate(seen):
        assert set(info) == {"i", "t", "x", "x0_hat", "nfe"} and info["nfe"] == counted
        assert info["t"] == pytest.approx(float(ts[i])) and info["x"].shape == (4, 2)


def test_adaptive_callback_reports_nfe():
    """The adaptive solver calls back once, as for one step ts[0] -> ts[-1], with the NFE of the integration;
    return_nfe adds the final denoise."""
    p = EDM()
    d = count_nfe(GM2.denoiser(p))
    seen = []
    out, nfe = sample_ode_adaptive(
        d, p, _exact_start(p, GM2, 8, seed=16), grid_karras(p, 5), return_nfe=True, callback=seen.append
    )
    assert len(seen) == 1 and seen[0]["i"] == 0 and seen[0]["t"] == 80.0
    assert seen[0]["nfe"] + 1 == nfe == d.nfe
    assert torch.equal(out, GM2.denoiser(p)(seen[0]["x"], torch.full((8,), 0.002, dtype=F64)))


@pytest.mark.parametrize("name", ALL)
def test_deterministic_and_inputs_not_mutated(name):
    """Deterministic samplers give the same answer twice, draw no noise (the generator's state is untouched)
    and never modify x or ts."""
    p = VP()
    x, ts = _exact_start(p, GM2, 8, seed=17), grid_lam(p, 5)
    x_copy, ts_copy = x.clone(), ts.clone()
    g = gen(3)
    state = g.get_state()
    a = ALL[name](GM2.denoiser(p), p, x, ts, generator=g)
    b = ALL[name](GM2.denoiser(p), p, x, ts, generator=g)
    assert torch.equal(a, b) and torch.equal(g.get_state(), state)
    assert torch.equal(x, x_copy) and torch.equal(ts, ts_copy)


def test_heun_churn_noise_only_from_generator():
    """With churn > 0, Heun's noise comes only from the generator: same seed, same samples; another, others."""
    p = EDM()
    x, ts = _exact_start(p, GM2, 8, seed=18), grid_karras(p, 6)
    run = lambda seed: sample_heun(GM2.denoiser(p), p, x, ts, churn=5.0, generator=gen(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert float((run(1) - run(2)).abs().min()) > 0


@pytest.mark.parametrize("name", [*ALL, "heun-churn"])
def test_4d_input_equals_flattened(name):
    """Images (B, 1, 2, 2) and the same numbers as points (B, 4) give the same samples (any tensor shape);
    float32 input comes back float32."""
    fn = ALL[name.split("-")[0]]
    kw = {"churn": 5.0} if name == "heun-churn" else {}
    p = Cosine()
    x = _exact_start(p, GM4, 8, seed=19)
    ts = grid_lam(p, 5)
    a = fn(GM4.denoiser(p), p, x, ts, generator=gen(4), **kw)
    b = fn(GM4_FLAT.denoiser(p), p, x.reshape(8, 4), ts, generator=gen(4), **kw)
    assert a.shape == x.shape
    torch.testing.assert_close(a.reshape(8, 4), b, rtol=1e-12, atol=1e-12)
    c = fn(GM4.denoiser(p), p, x.float(), ts, generator=gen(4), **kw)
    assert c.dtype == torch.float32 and bool(torch.isfinite(c).all())


@pytest.mark.parametrize("name", [*FIXED, "heun-churn"])
def test_batch_independence(name):
    """Example 0's sample depends only on example 0 (the adaptive solver shares its steps across the batch,
    so it is excluded)."""
    fn = FIXED[name.split("-")[0]]
    kw = {"churn": 5.0} if name == "heun-churn" else {}
    p = VE()
    x = _exact_start(p, GM2, 8, seed=20)
    y = x.clone()
    y[1:] = _exact_start(p, GM2, 7, seed=21)
    a = fn(GM2.denoiser(p), p, x, grid_lam(p, 5), generator=gen(5), **kw)
    b = fn(GM2.denoiser(p), p, y, grid_lam(p, 5), generator=gen(5), **kw)
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)


# --- parity with k-diffusion (optional) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def k_sampling():
    """k_diffusion.sampling without its package __init__ (torchdiffusion.interop.k_diffusion)."""
    from torchdiffusion.interop.k_diffusion import load_k_diffusion_sampling

    sampling = load_k_diffusion_sampling()
    if sampling is None:
        pytest.skip("k-diffusion (and its sampling module's dependencies) is not installed")
    return sampling


KARRAS_CHURN = {"churn": 40.0, "t_min_churn": 0.05, "t_max_churn": 50.0, "s_noise": 1.003}  # Karras Table 5


@pytest.mark.parametrize("name", ["euler", "heun", "heun-churn"])
def test_parity_with_k_diffusion(k_sampling, name):
    """On EDM (alpha = 1, sigma = t) with ts = k-diffusion's Karras sigmas without their final 0, our final
    denoise is its last Euler step to sigma = 0, and the samplers agree to rounding (Karras et al. 2022,
    Algorithms 1-2; with churn, both draw one normal per step, ours from a generator seeded as its global RNG)."""
    p = EDM()
    denoiser = GM2.denoiser(p)
    sigmas = k_sampling.get_sigmas_karras(18, 0.002, 80.0).to(F64)
    x = 80.0 * torch.randn(128, 2, generator=gen(22), dtype=F64)
    ours = {"euler": sample_euler, "heun": sample_heun, "heun-churn": sample_heun}[name]
    theirs = {"euler": k_sampling.sample_euler, "heun": k_sampling.sample_heun, "heun-churn": k_sampling.sample_heun}
    kw = KARRAS_CHURN if name == "heun-churn" else {}
    k_kw = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003} if kw else {}
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(23)
        b = theirs[name](lambda x, sigma: denoiser(x, sigma), x.clone(), sigmas, disable=True, **k_kw)
    finally:
        torch.set_rng_state(rng)
    a = ours(denoiser, p, x, sigmas[:-1], generator=gen(23), **kw)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_heun_rejects_negative_knobs():
    p = EDM()
    x = _exact_start(p, GM2, 2, seed=24)
    with pytest.raises(ValueError, match="churn"):
        sample_heun(GM2.denoiser(p), p, x, grid_karras(p, 3), churn=-1.0)
    with pytest.raises(ValueError, match="s_noise"):
        sample_heun(GM2.denoiser(p), p, x, grid_karras(p, 3), churn=1.0, s_noise=-1.0)
