"""Closed-form tests of the reverse-SDE samplers (samplers/sde.py).

Euler-Maruyama on the reverse-time SDE dx = [f x - g2 score] dt + g dW-bar (Song et al. 2021, Eq. 6)
and predictor-corrector sampling (Song et al. 2021, Appendix E, Eq. 46; Appendix G, Algorithms 1-5).

On Gaussian data N(m, v) the exact denoiser is linear, x0_hat = m + k_t (x - alpha_t m) with
k_t = v alpha_t / (alpha_t^2 v + sigma_t^2), so the score is -(x - alpha_t m) / S_t, S_t = alpha_t^2 v + sigma_t^2,
and every predictor is a linear Gaussian recursion x_s = A x_t + B + C z whose output law N(M, V) is known
exactly; A, B, C are written out below from the papers' update rules, not from the implementation.
Statistical checks use Z standard errors (conftest.Z: two-sided p ~ 2e-9 per check); float64, CPU, fixed seeds.
"""

import math

import pytest
import torch

from conftest import Z, gen
from mixture_checks import check_mixture, observed_order
from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, GaussianMixture, SubVP
from torchdiffusion.core.processes import beta_cosine, beta_linear
from torchdiffusion.core.timesteps import grid_discrete, grid_karras, grid_lam, grid_t
from torchdiffusion.samplers import count_nfe
from torchdiffusion.samplers.sde import euler_maruyama, reverse_diffusion, sample_pc, sample_reverse_sde

PREDICTORS = {"euler_maruyama": euler_maruyama, "reverse_diffusion": reverse_diffusion}

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
GAUSS = GaussianMixture([1.0], [[1.5, -0.7]], [[0.4, 2.0]])  # N(m, v) per coordinate, m != 0, v != 1
MV = ((1.5, 0.4), (-0.7, 2.0))
GM2 = GaussianMixture([0.2, 0.3, 0.5], [[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], [[0.5, 0.1], [0.2, 0.6], [0.3, 0.3]])


def _c(process, name: str, t) -> float:
    return float(getattr(process, name)(torch.as_tensor(float(t), dtype=F64)))


def _prior(process, gm, n, seed):
    return process.prior_sample((n, *gm.shape), generator=gen(seed), dtype=F64)


def _exact_start(process, gm, n, seed, t=None):
    """Exact samples of p_t (default t_max): x = alpha x0 + sigma eps with x0 ~ data."""
    g = gen(seed)
    x0 = gm.sample(n, generator=g)
    t = torch.tensor(process.t_max if t is None else t, dtype=F64)
    return process.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=F64))


# --- the exact law of each predictor on Gaussian data -------------------------------------------------


def _gaussian_law(process, ts, m, v, M, V, predictor):
    """Mean and variance at ts[-1] of x_s = A x_t + B + C z, started from N(M, V) at ts[0].

    euler_maruyama (Song et al. 2021, Eq. 6, f and g2 at t, h = t - s):
        x_s = x_t - (f x_t - g2 score) h + sqrt(g2 h) z  =>  A = 1 - f h - g2 h / S, B = g2 h alpha_t m / S, C^2 = g2 h.
    reverse_diffusion (Eq. 46 with the forward step x_t = alpha_ts x_s + sigma_ts z):
        x_s = (2 - alpha_ts) x_t + sigma_ts^2 score + sigma_ts z
        =>  A = 2 - alpha_ts - sigma_ts^2 / S, B = sigma_ts^2 alpha_t m / S, C^2 = sigma_ts^2.
    Where alpha_t = 0 (Flow at t = 1, f and g2 infinite) Euler-Maruyama takes the ancestral step
    q(x_s | x_t, x0_hat) (samplers/sde.py): x0_hat = m there, so x_s ~ N(alpha_s m, sigma_s^2).
    """
    ts = ts.tolist()
    for t, s in zip(ts[:-1], ts[1:]):
        a_t, sig_t, a_s, sig_s = (
            _c(process, n, u) for n, u in (("alpha", t), ("sigma", t), ("alpha", s), ("sigma", s))
        )
        S = a_t**2 * v + sig_t**2
        if predictor == "euler_maruyama" and a_t == 0:
            M, V = a_s * m, sig_s**2
            continue
        if predictor == "euler_maruyama":
            h, f, g2 = t - s, _c(process, "f", t), _c(process, "g2", t)
            A, B, C2 = 1 - f * h - g2 * h / S, g2 * h * a_t * m / S, g2 * h
        else:
            a_ts = a_t / a_s
            var_ts = sig_t**2 - a_ts**2 * sig_s**2
            A, B, C2 = 2 - a_ts - var_ts / S, var_ts * a_t * m / S, var_ts
        M, V = A * M + B, A**2 * V + C2
    return M, V


def _denoised_law(process, t, m, v, M, V):
    """Law of the final denoising step x0_hat(x, t) = m + k (x - alpha m) for x ~ N(M, V)."""
    a, s = _c(process, "alpha", t), _c(process, "sigma", t)
    k = v * a / (a**2 * v + s**2)
    return m + k * (M - a * m), k**2 * V


def _check_gaussian(x, laws):
    n = x.shape[0]
    for d, (M, V) in enumerate(laws):
        assert abs(float(x[:, d].mean()) - M) < Z * math.sqrt(V / n), f"mean, coordinate {d}"
        assert abs(float(x[:, d].var()) - V) < Z * V * math.sqrt(2 / (n - 1)), f"variance, coordinate {d}"


LAW_CASES = {
    "VP": (VP(), lambda p: grid_t(p, 12)),
    "VE-lam": (VE(), lambda p: grid_lam(p, 12)),
    "Flow-from-1": (Flow(), lambda p: grid_t(p, 12)),
    "EDM-karras": (EDM(), lambda p: grid_karras(p, 12)),
    "Discrete-cosine-T1000": (
        Discrete.from_schedule(beta_cosine, 1000),
        lambda p: grid_discrete(p, 10, spacing="trailing"),
    ),
}


@pytest.mark.parametrize("predictor", ["euler_maruyama", "reverse_diffusion"])
@pytest.mark.parametrize("case", LAW_CASES)
def test_exact_law_on_gaussian_data(case, predictor):
    """On coarse grids (12 steps) each predictor is a linear Gaussian recursion; its samples have exactly the
    predicted mean and variance (with the final denoising step). Flow starts at t = 1 (alpha = 0, f = -inf):
    the samples are finite and follow the law; Discrete cosine starts at T where alpha_ts ~ 0.03."""
    process, grid = LAW_CASES[case]
    ts, n = grid(process), 20_000
    x = _prior(process, GAUSS, n, seed=1)
    out = sample_pc(
        GAUSS.denoiser(process), process, x, ts, predictor=PREDICTORS[predictor], n_corrector=0, generator=gen(2)
    )
    assert bool(torch.isfinite(out).all())
    sT2 = _c(process, "sigma", ts[0]) ** 2
    laws = [_denoised_law(process, ts[-1], m, v, *_gaussian_law(process, ts, m, v, 0.0, sT2, predictor)) for m, v in MV]
    _check_gaussian(out, laws)


def _order_error(process, grid, n, predictor):
    """Worst error in mean or variance at t_end after n steps from the exact p_T (no sampling), against the
    exact marginal p_{t_end} = N(alpha m, alpha^2 v + sigma^2) that the reverse SDE reproduces."""
    ts, err = grid(process, n), 0.0
    for m, v in MV:
        a0, s0 = _c(process, "alpha", ts[0]), _c(process, "sigma", ts[0])
        M, V = _gaussian_law(process, ts, m, v, a0 * m, a0**2 * v + s0**2, predictor)
        a, s = _c(process, "alpha", ts[-1]), _c(process, "sigma", ts[-1])
        err = max(err, abs(M - a * m), abs(V - (a**2 * v + s**2)))
    return err


ORDER_CASES = [
    ("euler_maruyama", VP(), grid_t, (-1.25, -0.9)),
    ("euler_maruyama", SubVP(), grid_t, (-1.25, -0.9)),
    ("euler_maruyama", Cosine(), grid_t, (-1.25, -0.9)),
    ("euler_maruyama", EDM(), grid_karras, (-1.25, -0.9)),
    # On VE and Flow the first-order term of the error happens to vanish for Gaussian data (measured
    # slopes -2.0 and -2.1); weak order 1 promises at least first order.
    ("euler_maruyama", VE(), grid_t, (-2.5, -0.9)),
    ("euler_maruyama", Flow(), grid_t, (-2.5, -0.9)),
    ("reverse_diffusion", VP(), grid_t, (-1.25, -0.9)),
    ("reverse_diffusion", VE(), grid_lam, (-1.25, -0.9)),
    ("reverse_diffusion", Flow(), grid_t, (-1.25, -0.9)),
    ("reverse_diffusion", EDM(), grid_karras, (-1.25, -0.9)),
    ("reverse_diffusion", Cosine(), grid_t, (-1.25, -0.9)),
]


@pytest.mark.parametrize(
    "predictor, process, grid, slope_range",
    ORDER_CASES,
    ids=[f"{c[0]}-{type(c[1]).__name__}-{c[2].__name__}" for c in ORDER_CASES],
)
def test_weak_order_one(predictor, process, grid, slope_range):
    """Weak order 1 (Euler-Maruyama; reverse diffusion, Song et al. 2021, Appendix E): the exact law of the
    recursion converges to p_{t_end} with error ~ n^-1; least-squares slope of log error on log n over
    n = 25, 50, 100, 200. Flow runs from t = 1."""
    ns = [25, 50, 100, 200]
    slope = -observed_order(ns, [_order_error(process, grid, n, predictor) for n in ns])
    assert slope_range[0] < slope < slope_range[1], f"slope {slope:.3f}"


# --- the papers' algorithms, written out literally ---------------------------------------------------


def test_reverse_sde_is_song_vp_euler_maruyama():
    """On VP, Euler-Maruyama on Eq. 6 reads x_s = x_t + [beta/2 x_t + beta score] h + sqrt(beta h) z (seed 003,
    "Reverse SDE" of the VP SDE; score_sde's EulerMaruyamaPredictor), with the exact mixture score."""
    p, ts = VP(), grid_t(VP(), 15)
    x = _prior(p, GM2, 64, seed=3)
    out = sample_reverse_sde(GM2.denoiser(p), p, x, ts, final_denoise=False, generator=gen(4))
    g, y = gen(4), x.clone()
    for t, s in zip(ts[:-1], ts[1:]):
        beta, h = _c(p, "beta", t), float(t - s)
        z = torch.randn(y.shape, generator=g, dtype=F64)
        y = y + (beta / 2 * y + beta * GM2.score(y, p, t)) * h + math.sqrt(beta * h) * z
    torch.testing.assert_close(out, y, rtol=1e-9, atol=1e-9)


def test_reverse_diffusion_is_song_algorithm_3_predictor():
    """On a DDPM grid (Discrete, t = T..1) the reverse-diffusion predictor is Algorithm 3's
    x_i = (2 - sqrt(1 - beta_{i+1})) x_{i+1} + beta_{i+1} s(x_{i+1}, i+1) + sqrt(beta_{i+1}) z."""
    p = Discrete.from_schedule(beta_linear, 50)
    ts = grid_discrete(p, 50)
    x = _prior(p, GM2, 64, seed=5)
    out = sample_pc(GM2.denoiser(p), p, x, ts, n_corrector=0, final_denoise=False, generator=gen(6))
    g, y = gen(6), x.clone()
    for t in ts[:-1]:
        beta = float(p.betas[int(t) - 1])
        z = torch.randn(y.shape, generator=g, dtype=F64)
        y = (2 - math.sqrt(1 - beta)) * y + beta * GM2.score(y, p, t) + math.sqrt(beta) * z
    torch.testing.assert_close(out, y, rtol=1e-9, atol=1e-9)


def _norm(v):
    return torch.linalg.vector_norm(v.flatten(1), dim=1).reshape(-1, *([1] * (v.ndim - 1)))


@pytest.mark.parametrize("n_corrector", [1, 2])
def test_pc_is_song_algorithm_2_with_algorithm_4(n_corrector):
    """PC on VE (Song et al. 2021, Algorithm 2 with the corrector of Algorithm 4), written out with the exact
    score: x' = x + (sigma_{i+1}^2 - sigma_i^2) s(x, sigma_{i+1}), x_i = x' + sqrt(sigma_{i+1}^2 - sigma_i^2) z,
    then M times eps = 2 (r ||z|| / ||g||)^2, x_i <- x_i + eps g + sqrt(2 eps) z with g = s(x_i, sigma_i);
    4-D inputs, norms per example over all non-batch dims."""
    p, r = VE(), 0.16
    ts = grid_lam(p, 10)
    gm = GaussianMixture(
        GM2.weights, torch.cat([GM2.means, -GM2.means], 1), torch.cat([GM2.variances] * 2, 1), (1, 2, 2)
    )
    x = _prior(p, gm, 32, seed=7)
    out = sample_pc(
        gm.denoiser(p),
        p,
        x,
        ts,
        snr=r,
        n_corrector=n_corrector,
        batch_norms=False,
        final_denoise=False,
        generator=gen(8),
    )
    g, y = gen(8), x.clone()
    sig = p.sigma(ts)
    for i in range(len(ts) - 1):
        d2 = float(sig[i] ** 2 - sig[i + 1] ** 2)
        y = y + d2 * gm.score(y, p, ts[i]) + math.sqrt(d2) * torch.randn(y.shape, generator=g, dtype=F64)
        for _ in range(n_corrector):
            z = torch.randn(y.shape, generator=g, dtype=F64)
            grad = gm.score(y, p, ts[i + 1])
            eps = 2 * (r * _norm(z) / _norm(grad)) ** 2
            y = y + eps * grad + torch.sqrt(2 * eps) * z
    torch.testing.assert_close(out, y, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("norms", ["example", "batch"])
def test_langevin_corrector_step_on_vp(norms):
    """One corrector step at level s after a step t -> s on VP (Algorithm 5): eps = 2 a (r ||z|| / ||g||)^2 with
    a = alpha_ts^2 = (alpha_t / alpha_s)^2 (1 - beta_i on a DDPM grid), norms per example or averaged over the
    batch (the paper's large-batch rule); predictor None leaves x as it is."""
    p, r = VP(), 0.3
    ts = torch.tensor([0.5, 0.4], dtype=F64)
    x = _exact_start(p, GM2, 16, seed=9, t=0.4)
    out = sample_pc(
        GM2.denoiser(p),
        p,
        x,
        ts,
        predictor=None,
        snr=r,
        batch_norms=norms == "batch",
        final_denoise=False,
        generator=gen(10),
    )
    z = torch.randn(x.shape, generator=gen(10), dtype=F64)
    grad = GM2.score(x, p, ts[1])
    nz, ng = (_norm(z), _norm(grad)) if norms == "example" else (_norm(z).mean(), _norm(grad).mean())
    eps = 2 * (_c(p, "alpha", 0.5) / _c(p, "alpha", 0.4)) ** 2 * (r * nz / ng) ** 2
    torch.testing.assert_close(out, x + eps * grad + torch.sqrt(2 * eps) * z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("process", [VE(), VP()], ids=["VE", "VP"])
def test_langevin_corrector_second_moment(process):
    """One per-example corrector step from exact samples of p_s = N(alpha_s m, S I_D) (Gaussian data N(m, v I)):
    with u = x - alpha_s m, g = -u / S, eps = k S^2 ||z||^2 / ||u||^2, k = 2 a r^2, and ||u||^2 ~ S chi^2_D,

        E||u'||^2 / D = S [1 - 2k + (k^2 + 2k) (D + 2) / (D - 2)]      (E[1 / chi^2_D] = 1 / (D - 2)),

    not S (1 + k^2) as for a fixed step: the step depends on x. Iterated, this inflates variances by about
    (1 + k/2)(D + 2)/(D - 2) (a 2-D mixture's tenfold), which is why the mixture tests below use batch_norms=True."""
    D, r, n = 8, 0.5, 40_000
    m = torch.linspace(-1.0, 2.0, D, dtype=F64)
    gm = GaussianMixture([1.0], m[None], 0.7)
    t, s = 0.35, 0.3
    x = _exact_start(process, gm, n, seed=11, t=s)
    ts = torch.tensor([t, s], dtype=F64)
    out = sample_pc(
        gm.denoiser(process),
        process,
        x,
        ts,
        predictor=None,
        snr=r,
        batch_norms=False,
        final_denoise=False,
        generator=gen(12),
    )
    a_s, sig_s = _c(process, "alpha", s), _c(process, "sigma", s)
    S, k = a_s**2 * 0.7 + sig_s**2, 2 * (_c(process, "alpha", t) / a_s) ** 2 * r**2
    expected = S * (1 - 2 * k + (k**2 + 2 * k) * (D + 2) / (D - 2))
    q = ((out - a_s * m) ** 2).sum(1) / D
    assert abs(float(q.mean()) - expected) < Z * float(q.std()) / math.sqrt(n)
    assert abs(expected - S * (1 + k**2)) > 20 * float(q.std()) / math.sqrt(n)  # the test can tell the two apart


# --- ground truth: Gaussian mixtures -----------------------------------------------------------------


def _isolated_var(process, ts, v, predictor):
    """Output variance (after the final denoise) on an isolated Gaussian component of variance v from p_T."""
    a0, s0 = _c(process, "alpha", ts[0]), _c(process, "sigma", ts[0])
    M, V = _gaussian_law(process, ts, 0.0, v, 0.0, a0**2 * v + s0**2, predictor)
    return _denoised_law(process, ts[-1], 0.0, v, M, V)[1]


def test_reverse_sde_vp_reproduces_mixture():
    """Euler-Maruyama on the VP reverse SDE (Song et al. 2021, Eq. 6 and 11), 500 uniform steps, exact
    denoiser, exact start from p_T: weights, means and covariance of the 3-component mixture. The
    per-component variance is checked against the exact Euler-Maruyama law of an isolated component."""
    p = VP()
    ts = grid_t(p, 500)
    x = sample_reverse_sde(GM2.denoiser(p), p, _exact_start(p, GM2, 4000, seed=13), ts, generator=gen(14))
    check_mixture(x, GM2, lambda v: _isolated_var(p, ts, v, "euler_maruyama"))


@pytest.mark.parametrize("process", [VE(), VP()], ids=["VE", "VP"])
def test_pc_reproduces_mixture(process):
    """PC with the reverse-diffusion predictor and one Langevin corrector step per level (Song et al. 2021,
    Algorithms 2-5, r = 0.16), 500 uniform steps, batch-averaged norms. The corrector's law is not linear,
    so the variance is checked against v itself: the predictor's own deficit (about 2% here, from the exact
    recursion) and the corrector's Langevin bias (about r^2 = 2.6%, the stationary variance S / (1 - eps/2S)
    of a step eps = 2 r^2 S) are both far under the smallest component's tolerance (5 x 5% = 25%)."""
    ts = grid_t(process, 500)
    x = sample_pc(
        GM2.denoiser(process),
        process,
        _exact_start(process, GM2, 4000, seed=15),
        ts,
        batch_norms=True,
        generator=gen(16),
    )
    check_mixture(x, GM2, lambda v: v)


def test_reverse_sde_reproduces_16d_mixture():
    """A 16-D mixture (unequal weights and per-coordinate variances) through Euler-Maruyama on VP: weights,
    means and per-coordinate variances (exact Euler-Maruyama law per isolated component)."""
    g, D = gen(17), 16
    means = torch.zeros(3, D, dtype=F64)
    means[0], means[1, : D // 2], means[2, D // 2 :] = -2.0, 2.0, 2.0
    means += 0.5 * torch.randn(3, D, generator=g, dtype=F64)
    gm = GaussianMixture([0.2, 0.3, 0.5], means, 0.2 + 0.5 * torch.rand(3, D, generator=g, dtype=F64))
    p = VP()
    ts = grid_t(p, 300)
    x = sample_reverse_sde(gm.denoiser(p), p, _exact_start(p, gm, 4000, seed=18), ts, generator=gen(19))
    check_mixture(x, gm, lambda v: _isolated_var(p, ts, v, "euler_maruyama"))


# --- conformance: NFE, ends, determinism, shapes ---------------------------------------------------------

# name: (sampler, kwargs, documented NFE per step: 1 for a predictor (not None) plus n_corrector
# for the Langevin corrector)
CONFIGS = {
    "reverse_sde": (sample_reverse_sde, {}, 1),
    "pc": (sample_pc, {}, 2),
    "pc-batch-2": (sample_pc, {"batch_norms": True, "n_corrector": 2}, 3),
    "pc-em": (sample_pc, {"predictor": euler_maruyama, "n_corrector": 2}, 3),
    "corrector-only": (sample_pc, {"predictor": None, "n_corrector": 2}, 2),
    "predictor-only": (sample_pc, {"n_corrector": 0}, 1),
}


@pytest.mark.parametrize("final_denoise", [True, False])
@pytest.mark.parametrize("config", CONFIGS)
def test_nfe_and_callback(config, final_denoise):
    """count_nfe agrees with the documented count; the callback sees every step once with the NFE so far."""
    fn, kw, per_step = CONFIGS[config]
    p = VE()
    d, calls = count_nfe(GM2.denoiser(p)), []
    x = _prior(p, GM2, 4, 20)
    fn(d, p, x, grid_lam(p, 7), **kw, final_denoise=final_denoise, generator=gen(21), callback=calls.append)
    assert d.nfe == 7 * per_step + (1 if final_denoise else 0)
    assert [c["i"] for c in calls] == list(range(7))
    assert [c["nfe"] for c in calls] == [(i + 1) * per_step for i in range(7)]
    assert all(set(c) == {"i", "t", "x", "x0_hat", "nfe"} for c in calls)


@pytest.mark.parametrize("config", CONFIGS)
def test_step_to_data_returns_x0_hat(config):
    """A last step onto sigma = 0 (EDM, t = 0) returns x0_hat(x_t, t) with one evaluation, runs no corrector and
    needs no final denoise (samplers/_loop.py): on a point mass at m the samples are exactly m."""
    fn, kw, per_step = CONFIGS[config]
    p, m = EDM(), torch.tensor([0.7, -1.3], dtype=F64)
    point = GaussianMixture([1.0], m[None], [[0.0, 0.0]])
    ts = torch.cat([grid_karras(p, 6), torch.zeros(1, dtype=F64)])
    d = count_nfe(point.denoiser(p))
    out = fn(d, p, _prior(p, point, 16, 22), ts, **kw, generator=gen(23))
    assert d.nfe == 6 * per_step + 1
    torch.testing.assert_close(out, m.expand(16, 2), rtol=0, atol=1e-12)


def test_flow_first_step_is_ancestral():
    """Flow at t = 1 has f = -inf and g2 = inf: the Euler-Maruyama step from there is q(x_s | x_t, x0_hat), i.e.
    x_s = alpha_s x0_hat + sigma_s z (samplers/sde.py); on a point mass at m, x0_hat = m exactly."""
    p, m = Flow(), torch.tensor([0.7, -1.3], dtype=F64)
    point = GaussianMixture([1.0], m[None], [[0.0, 0.0]])
    ts = torch.tensor([1.0, 0.9], dtype=F64)
    x = _prior(p, point, 16, 24)
    out = sample_reverse_sde(point.denoiser(p), p, x, ts, final_denoise=False, generator=gen(25))
    z = torch.randn(x.shape, generator=gen(25), dtype=F64)
    torch.testing.assert_close(out, 0.1 * m + 0.9 * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("grid", [grid_t, grid_lam], ids=["grid_t", "grid_lam"])
def test_finite_at_both_ends(process, grid, config):
    """No NaN or inf for any process (continuous and Discrete), from t_max (Flow: t = 1, alpha = 0) to t_min,
    and on to t = 0 where sigma(0) = 0."""
    fn, kw, _ = CONFIGS[config]
    ts = grid(process, 10)
    if process.t_min > 0 and _c(process, "sigma", 0.0) == 0:
        ts = torch.cat([ts, torch.zeros(1, dtype=F64)])
    out = fn(GM2.denoiser(process), process, _prior(process, GM2, 16, 26), ts, **kw, generator=gen(27))
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("config", CONFIGS)
def test_determinism_inputs_and_shapes(config):
    """Noise only from the generator (same seed, same samples; another seed, others); x and ts untouched;
    (B, 1, 2, 2) inputs give the same samples as the flattened (B, 4) ones (norms over all non-batch dims)."""
    fn, kw, _ = CONFIGS[config]
    p = VP()
    gm4 = GaussianMixture([0.6, 0.4], [[1.0, -1.0, 0.5, 2.0], [-2.0, 0.0, 1.5, -1.0]], 0.3, shape=(1, 2, 2))
    x, ts = _prior(p, gm4, 8, 28), grid_lam(p, 6)
    x_copy, ts_copy = x.clone(), ts.clone()
    a = fn(gm4.denoiser(p), p, x, ts, **kw, generator=gen(29))
    b = fn(gm4.denoiser(p), p, x, ts, **kw, generator=gen(29))
    c = fn(gm4.denoiser(p), p, x, ts, **kw, generator=gen(30))
    flat = fn(gm4.denoiser(p), p, x.reshape(8, 4), ts, **kw, generator=gen(29))
    assert a.shape == x.shape and torch.equal(a, b) and float((a - c).abs().min()) > 0
    assert torch.equal(x, x_copy) and torch.equal(ts, ts_copy)
    torch.testing.assert_close(a.reshape(8, 4), flat, rtol=1e-12, atol=1e-12)
    x32 = fn(gm4.denoiser(p), p, x.float(), ts, **kw, generator=gen(29))
    assert x32.dtype == torch.float32 and bool(torch.isfinite(x32).all())


def test_rejects_bad_options():
    """Bad values are ValueErrors; a name where a predictor function or a flag belongs is a TypeError (names become
    objects only at the edge)."""
    p = VE()
    x, ts, d = _prior(p, GM2, 2, 31), grid_lam(p, 3), GM2.denoiser(p)
    for kw in ({"predictor": "ancestral"}, {"batch_norms": "global"}):
        with pytest.raises(TypeError):
            sample_pc(d, p, x, ts, **kw)
    for kw in (
        {"n_corrector": -1},
        {"n_corrector": 1.5},
        {"snr": 0.0},
        {"predictor": None, "n_corrector": 0},
    ):
        with pytest.raises(ValueError):
            sample_pc(d, p, x, ts, **kw)
    with pytest.raises(ValueError):
        sample_reverse_sde(d, p, x, torch.tensor([0.1, 0.5], dtype=F64))
