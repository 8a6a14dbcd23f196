"""Closed-form tests of core/predictions.py and of the exact Gaussian-mixture ground truth (core/mixture.py).

With x = alpha x0 + sigma eps (seed 003): eps, score = -eps/sigma (Tweedie's formula, seed 003),
v = alpha eps - sigma x0 (Salimans & Ho 2022), flow u = dx/dt = alpha' x0 + sigma' eps
(Liu et al. 2022; Lipman et al. 2022). Float64 on the CPU.
"""

import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import VP, Flow, GaussianMixture
from torchdiffusion.core.denoiser import Preconditioned, as_denoiser
from torchdiffusion.core.predictions import ALL_PREDICTIONS, EPS, FLOW, SCORE, X0, V, eps_from, tweedie_score
from torchdiffusion.names import PREDICTIONS, get_prediction

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _times(process) -> torch.Tensor:
    """t_min, interior times (for a discrete process integers and points inside segments), and
    t_max where alpha(t_max) > 0 (Flow's alpha(1) = 0 leaves x0 undetermined by eps, v, flow)."""
    lo, hi = process.t_min, process.t_max
    ts = [lo] + [lo + u * (hi - lo) for u in (0.013, 0.31, 0.62, 0.95)]
    if process.n_steps is not None:
        ts += [2.0, float(process.n_steps // 2)]
    if float(process.alpha(torch.tensor(hi, dtype=F64))) > 0:
        ts.append(hi)
    return torch.tensor(ts, dtype=F64)


def _data(seed: int, shape=(6, 1, 2, 2)):
    g = gen(seed)
    x0 = torch.randn(shape, generator=g, dtype=F64) * 1.5 + 0.3
    eps = torch.randn(shape, generator=g, dtype=F64)
    return x0, eps


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


# --- the conversions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
def test_to_x0_inverts_x0_to(process, predicts):
    """p.to_x0(x, t, p.from_x0(x, t, x0, eps)) = x0 for every target p (the conversions of seed 003)."""
    x0, eps = _data(0)
    for t in _times(process):
        x = process.perturb(x0, t, eps)
        out = predicts.from_x0(process, x, t, x0, eps)
        back = predicts.to_x0(process, x, t, out)
        # rounding in out is amplified by |d x0 / d out| = sqrt(x0_error_scale)
        amp = float(predicts.x0_error_scale(process, t).sqrt()) * float(out.abs().max() + 1)
        torch.testing.assert_close(back, x0, rtol=1e-10, atol=1e-13 * (1 + amp + float(x.abs().max())))


@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
def test_x0_to_without_eps_infers_it(process, predicts):
    """With eps omitted, x0_to infers eps = (x - alpha x0) / sigma: the same target."""
    x0, eps = _data(1)
    t = _times(process)[2]
    x = process.perturb(x0, t, eps)
    torch.testing.assert_close(
        predicts.from_x0(process, x, t, x0), predicts.from_x0(process, x, t, x0, eps), rtol=1e-9, atol=1e-10
    )


def test_targets_closed_form(process):
    """eps is the noise; score = -eps/sigma; v = alpha eps - sigma x0 (Salimans & Ho 2022);
    flow u = d x_t / dt at fixed (x0, eps), checked by central differences of perturb."""
    x0, eps = _data(2)
    for t in _times(process)[1:-1]:
        x = process.perturb(x0, t, eps)
        a, s = process.alpha(t), process.sigma(t)
        torch.testing.assert_close(EPS.from_x0(process, x, t, x0, eps), eps)
        torch.testing.assert_close(SCORE.from_x0(process, x, t, x0, eps), -eps / s)
        torch.testing.assert_close(V.from_x0(process, x, t, x0, eps), a * eps - s * x0)
        h = 1e-6 * (process.t_max - process.t_min)
        if process.n_steps is not None:
            t = t + 0.5  # off the kinks of the piecewise curves
            h = 1e-5
            x = process.perturb(x0, t, eps)
        fd = (process.perturb(x0, t + h, eps) - process.perturb(x0, t - h, eps)) / (2 * h)
        torch.testing.assert_close(FLOW.from_x0(process, x, t, x0, eps), fd, rtol=1e-6, atol=1e-7)


def test_flow_velocity_is_eps_minus_x0():
    """For Flow (alpha = 1 - t, sigma = t) the velocity is u = eps - x0 (Liu et al. 2022)."""
    p = Flow()
    x0, eps = _data(3)
    t = torch.linspace(0.1, 0.9, 6, dtype=F64)
    x = p.perturb(x0, t, eps)
    torch.testing.assert_close(FLOW.from_x0(p, x, t, x0, eps), eps - x0, rtol=1e-12, atol=1e-12)


def test_score_is_autograd_of_gaussian_log_density(process):
    """SCORE.from_x0() = grad_x log N(x; alpha x0, sigma^2 I) (the score of q(x_t | x0), seed 003)."""
    x0, eps = _data(4)
    for t in _times(process):
        x = process.perturb(x0, t, eps).requires_grad_(True)
        a, s = process.alpha(t), process.sigma(t)
        logq = torch.distributions.Normal(a * x0, s).log_prob(x).sum()
        (grad,) = torch.autograd.grad(logq, x)
        score = SCORE.from_x0(process, x.detach(), t, x0)
        torch.testing.assert_close(score, grad, rtol=1e-9, atol=1e-9 * float(grad.abs().max()))


@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
def test_x0_error_scale_is_squared_derivative(process, predicts):
    """x0_error_scale = |d x0_hat / d out|^2 (seed 003, "Final objective function"), by a finite
    perturbation of out (to_x0 is affine in out, so the difference quotient is exact)."""
    x0, eps = _data(5)
    ts = _times(process)
    scale = predicts.x0_error_scale(process, ts)
    assert scale.shape == ts.shape
    for t, sc in zip(ts, scale):
        x = process.perturb(x0, t, eps)
        out = predicts.from_x0(process, x, t, x0, eps)
        delta = 0.5
        q = (predicts.to_x0(process, x, t, out + delta) - predicts.to_x0(process, x, t, out)) / delta
        torch.testing.assert_close(q**2, torch.full_like(q, float(sc)), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
def test_as_denoiser_returns_x0_for_exact_net(process, predicts):
    """as_denoiser(net, process, predicts) on a net returning the exact target of a known x0 gives that x0."""
    x0, eps = _data(6)
    ts = _times(process)[: x0.shape[0]]
    ts = torch.cat([ts, ts[:1]])[: x0.shape[0]]  # per-example times (B,)
    x = process.perturb(x0, ts, eps)

    def net(xx, tt):
        assert tt.shape == (xx.shape[0],)
        return predicts.from_x0(process, xx, tt, x0, eps)

    denoiser = as_denoiser(net, process, predicts=predicts)
    torch.testing.assert_close(denoiser(x, ts), x0, rtol=1e-9, atol=1e-9)
    # a scalar time is broadcast over the batch
    t0 = ts[1]
    x = process.perturb(x0, t0, eps)
    torch.testing.assert_close(denoiser(x, t0), x0, rtol=1e-9, atol=1e-9)


def test_unknown_target_raises_listing_choices():
    """A name is turned into a target only at the edge (``names``): an unknown one is a ValueError listing the
    choices; inside the library a name is not a target, and ``as_denoiser`` says so with a TypeError."""
    p = VP()
    with pytest.raises(ValueError) as err:
        get_prediction("noise")
    for name in PREDICTIONS:
        assert repr(name) in str(err.value)
    with pytest.raises(TypeError, match="must be a Prediction"):
        as_denoiser(lambda a, b: a, p, predicts="noise")
    assert [PREDICTIONS[k] for k in ("eps", "x0", "v", "score", "flow")] == [EPS, X0, V, SCORE, FLOW]


def test_eps_and_score_from_x0():
    """eps_hat = (x - alpha x0_hat) / sigma and score = (alpha x0_hat - x) / sigma^2 (seed 003, Tweedie)."""
    p = VP()
    x0, eps = _data(7)
    t = torch.tensor(0.4, dtype=F64)
    x = p.perturb(x0, t, eps)
    a, s = p.alpha(t), p.sigma(t)
    torch.testing.assert_close(EPS.from_x0(p, x, t, x0), (x - a * x0) / s)
    torch.testing.assert_close(SCORE.from_x0(p, x, t, x0), (a * x0 - x) / s**2)
    torch.testing.assert_close(eps_from(x, x0, a, s), (x - a * x0) / s)  # the formulas the objects use
    torch.testing.assert_close(tweedie_score(x, x0, a, s), (a * x0 - x) / s**2)


def test_preconditioned_inputs(continuous_process):
    """Preconditioned feeds c_in x, c_in = 1/sqrt(alpha^2 sigma_data^2 + sigma^2), and c_noise = -lam/4
    (Karras et al. 2022, Table 1; c_noise = log(sigma)/4 when alpha = 1)."""
    p = continuous_process
    seen = {}

    def net(x, c_noise):
        seen["x"], seen["c"] = x, c_noise
        return x

    t = _times(p)
    x = torch.randn(len(t), 2, generator=gen(8), dtype=F64)
    Preconditioned(net, p, sigma_data=0.5)(x, t)
    c_in = 1 / torch.sqrt(p.alpha(t) ** 2 * 0.25 + p.sigma(t) ** 2)
    torch.testing.assert_close(seen["x"], c_in[:, None] * x)
    torch.testing.assert_close(seen["c"], -p.lam(t) / 4)
    # unit variance in: x_t of data with std sigma_data has c_in-scaled variance 1
    n = 200_000
    x0 = 0.5 * torch.randn(n, 1, generator=gen(9), dtype=F64)
    tt = t[2]
    xt = p.perturb(x0, tt, torch.randn(n, 1, generator=gen(10), dtype=F64))
    Preconditioned(net, p, sigma_data=0.5)(xt, tt)
    assert abs(float(seen["x"].var()) - 1) < Z * math.sqrt(2 / n)


# --- Tweedie's formula with the exact Gaussian mixture ----------------------------------------------

GM2 = GaussianMixture(
    weights=[0.2, 0.3, 0.5],
    means=[[-3.0, 0.5], [2.0, 2.5], [1.0, -2.5]],
    variances=[[0.3, 0.1], [0.2, 0.5], [0.05, 0.4]],
)
GM4 = GaussianMixture(
    weights=[0.6, 0.15, 0.25],
    means=[[1.0, -1.0, 0.5, 2.0], [-2.0, 0.0, 1.5, -1.0], [0.0, 2.0, -2.0, 0.5]],
    variances=[[0.2, 0.3, 0.1, 0.4], [0.5, 0.05, 0.2, 0.3], [0.1, 0.1, 0.6, 0.2]],
    shape=(1, 2, 2),
)


def _points(gm, process, t, seed):
    """Points in the bulk of p_t (perturbed mixture samples) and a few far from it."""
    g = gen(seed)
    x0 = gm.sample(40, generator=g)
    x = process.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    far = 4 * torch.randn((4, *gm.shape), generator=g, dtype=F64)
    return torch.cat([x, far])


def _autograd_score(gm, x, process, t):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x, process, t).sum(), x)
    return grad


@pytest.mark.parametrize("gm", [GM2, GM4], ids=["2d", "4d-image"])
def test_tweedie_denoiser_gives_the_score(process, gm):
    """Tweedie's formula (seed 003; Efron 2011): (alpha E[x0 | x_t] - x_t) / sigma^2 = grad log p_t(x_t),
    with E[x0 | x_t] the mixture's exact denoiser and log p_t its exact log-density (autograd)."""
    for i, t in enumerate(_times(process)):
        x = _points(gm, process, t, seed=20 + i)
        grad = _autograd_score(gm, x, process, t)
        x0_hat = gm.denoiser(process)(x, t)
        assert x0_hat.shape == x.shape
        # (alpha x0_hat - x) / sigma^2 loses a few ulps of |x| to cancellation, amplified by 1/sigma^2
        # (sigma^2 = 1e-8 at SubVP's t_min); the mixture's own score has no such cancellation.
        sigma2 = float(process.sigma(t)) ** 2
        atol = 1e-15 * float(x.abs().max() + 1) / sigma2
        torch.testing.assert_close(SCORE.from_x0(process, x, t, x0_hat), grad, rtol=1e-8, atol=atol)
        torch.testing.assert_close(gm.score(x, process, t), grad, rtol=1e-10, atol=1e-12)


def test_tweedie_with_per_example_times(process):
    """Tweedie's formula with a (B,) tensor of different times (as samplers call denoisers)."""
    ts = _times(process)
    x = _points(GM4, process, ts[2], seed=30)[: len(ts)]
    ts = ts[: x.shape[0]]
    grads = torch.cat([_autograd_score(GM4, x[i : i + 1], process, ts[i]) for i in range(len(ts))])
    x0_hat = GM4.denoiser(process)(x, ts)
    # Each example's cancellation bound, as in test_tweedie_denoiser_gives_the_score: a few ulps of |x| over
    # that example's sigma^2 (from 1e-8 at t_min to ~1 at t_max), not one tolerance for the whole batch.
    atol = 1e-15 * (x.flatten(1).abs().amax(1) + 1) / process.sigma(ts) ** 2
    err = (SCORE.from_x0(process, x, ts, x0_hat) - grads).abs()
    assert (err <= 1e-8 * grads.abs() + _bcast(atol, x)).all()


def test_denoiser_at_zero_noise_limit():
    """E[x0 | x_t] for one Gaussian N(m, v): m + v alpha (x - alpha m) / (alpha^2 v + sigma^2) (Bayes)."""
    gm = GaussianMixture([1.0], [[0.7, -1.2]], [[0.3, 2.0]])
    p = VP()
    t = torch.tensor(0.35, dtype=F64)
    a, s = float(p.alpha(t)), float(p.sigma(t))
    x = torch.randn(9, 2, generator=gen(11), dtype=F64)
    m, v = gm.means[0], gm.variances[0]
    torch.testing.assert_close(gm.denoiser(p)(x, t), m + v * a * (x - a * m) / (a**2 * v + s**2))


def test_log_prob_integrates_to_one():
    """p_t = sum_k w_k N(alpha m_k, alpha^2 v_k + sigma^2) is a density: 2-D trapezoid quadrature = 1."""
    p = VP()
    t = torch.tensor(0.2, dtype=F64)
    a, s = float(p.alpha(t)), float(p.sigma(t))
    sd = (a**2 * GM2.variances + s**2).sqrt()
    lo = (a * GM2.means - 10 * sd).min(0).values
    hi = (a * GM2.means + 10 * sd).max(0).values
    gx = torch.linspace(float(lo[0]), float(hi[0]), 1201, dtype=F64)
    gy = torch.linspace(float(lo[1]), float(hi[1]), 1201, dtype=F64)
    X, Y = torch.meshgrid(gx, gy, indexing="ij")
    dens = GM2.log_prob(torch.stack([X.flatten(), Y.flatten()], 1), p, t).exp().reshape(X.shape)
    total = torch.trapezoid(torch.trapezoid(dens, gy, dim=1), gx)
    assert float(total) == pytest.approx(1.0, abs=1e-6)


def test_log_prob_of_data_is_mixture_density():
    """log p_0(x) without a process: log sum_k w_k prod_d N(x_d; m_kd, v_kd)."""
    x = torch.randn(11, 2, generator=gen(12), dtype=F64) * 2
    comps = torch.stack(
        [
            torch.distributions.Normal(GM2.means[k], GM2.variances[k].sqrt()).log_prob(x).sum(1) + math.log(w)
            for k, w in enumerate([0.2, 0.3, 0.5])
        ],
        1,
    )
    torch.testing.assert_close(GM2.log_prob(x), torch.logsumexp(comps, 1))
    torch.testing.assert_close(GM2.responsibilities(x), torch.softmax(comps, 1))


def test_mixture_mean_and_covariance_by_hand():
    """Mixture moments: mean = sum w_k m_k; Cov = sum w_k (diag v_k + (m_k - mean)(m_k - mean)^T).

    w = (1/4, 3/4), m1 = (0, 2), m2 = (4, -2), v1 = (1, 2), v2 = (3, 1/2):
    mean = (3, -1); within = diag(1/4 + 9/4, 2/4 + 3/8) = diag(5/2, 7/8);
    between = 1/4 [[9, -9], [-9, 9]] + 3/4 [[1, -1], [-1, 1]] = [[3, -3], [-3, 3]]."""
    gm = GaussianMixture([1.0, 3.0], [[0.0, 2.0], [4.0, -2.0]], [[1.0, 2.0], [3.0, 0.5]])
    torch.testing.assert_close(gm.mean(), torch.tensor([3.0, -1.0], dtype=F64))
    torch.testing.assert_close(gm.covariance(), torch.tensor([[5.5, -3.0], [-3.0, 3.875]], dtype=F64))


def test_mixture_sample_moments():
    """gm.sample draws from the mixture: label frequencies and the mean within Z standard errors."""
    n = 40_000
    x, k = GM2.sample(n, generator=gen(13), return_labels=True)
    assert x.shape == (n, 2) and x.dtype == F64
    for j, w in enumerate([0.2, 0.3, 0.5]):
        assert abs(float((k == j).double().mean()) - w) < Z * math.sqrt(w * (1 - w) / n)
        xj = x[k == j]
        se = (GM2.variances[j] / len(xj)).sqrt()
        assert bool(((xj.mean(0) - GM2.means[j]).abs() < Z * se).all())
    assert GM4.sample(3, generator=gen(14)).shape == (3, 1, 2, 2)
