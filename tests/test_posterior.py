"""The exact posterior of a Gaussian mixture under a linear measurement y = A x0 + sigma_y n, against Bayes'
rule computed numerically, and the closed-form identities that tie it to the prior (core/mixture.py).

Numerical Bayes: p(x0 | y) is proportional to p(x0) p(y | x0), integrated by the rectangle rule on a uniform
grid. For a Gaussian integrand of covariance Sigma the rule is spectrally accurate (Poisson summation,
Trefethen & Weideman 2014): its error is the Fourier transform at the nearest dual lattice point,
exp(-(2 pi / h)^2 lam_min(Sigma) / 2), which is e^-316 at a step h = sqrt(lam_min) / 4; a range of +-12 std
around every component cuts tails of e^-72. What is left is rounding: a sum of n terms errs by at most n eps
of the sum of their magnitudes, so the grid tolerances below are n eps times the scale of the integrand
(1 for weights and densities, the grid's half-width L for means, L^2 for covariances). Closed-form
identities (Tweedie, Bayes at time t) are checked to rounding of the float64 linear algebra.
"""

import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import EDM, VE, VP, Dense, Flow, FullCovarianceMixture, GaussianMixture, Mask, Measurement
from torchdiffusion.core.measurements import Colorize, Downsample

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
EPS = torch.finfo(F64).eps
PROCESSES = [VP(), VE(), EDM(), Flow()]


def _rot(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def correlated_2d() -> FullCovarianceMixture:
    """Three correlated 2-D components (so conditioning on one coordinate moves the other's mean)."""
    variances = [(0.8, 0.15), (0.5, 0.3), (1.0, 0.2)]
    covs = torch.stack(
        [_rot(a) @ torch.diag(torch.tensor(v, dtype=F64)) @ _rot(a).T for a, v in zip((0.6, -1.0, 2.2), variances)]
    )
    means = torch.tensor([[-1.5, 0.5], [1.0, -1.0], [0.8, 1.8]], dtype=F64)
    return FullCovarianceMixture([0.3, 0.45, 0.25], means, covs)


def mixture_1d() -> GaussianMixture:
    return GaussianMixture([0.25, 0.45, 0.3], [[-2.0], [0.5], [3.0]], [0.3, 1.0, 0.5])


def _diag_gm():
    return GaussianMixture(
        [0.2, 0.5, 0.3], [[-1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], [[0.3, 0.5], [0.6, 0.2], [0.4, 1.1]]
    )


def _log_gauss(x: torch.Tensor, m: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """log N(x; m, C) for x (n, D), written out (inverse and log-determinant), independent of the library."""
    d = x - m
    Ci = torch.linalg.inv(C)
    return -0.5 * ((d @ Ci) * d).sum(1) - 0.5 * torch.logdet(C) - 0.5 * len(m) * math.log(2 * math.pi)


def _log_prior(prior, pts: torch.Tensor) -> torch.Tensor:
    """log p_0 at the points (n, D), from the components' parameters through ``_log_gauss``."""
    w, m, C = _components(prior)
    return torch.logsumexp(torch.stack([math.log(float(w[k])) + _log_gauss(pts, m[k], C[k]) for k in range(len(w))]), 0)


def _components(prior):
    if isinstance(prior, GaussianMixture):
        return prior.weights, prior.means, torch.diag_embed(prior.variances)
    return prior.weights, prior.means, prior.covariances


def _grid(prior, lam_min: float):
    """A uniform grid (n, D) over +-(max |m| + 12 max std), step sqrt(lam_min) / 4, and its cell volume."""
    w, m, C = _components(prior)
    L = float(m.abs().max()) + 12 * math.sqrt(float(torch.linalg.eigvalsh(C).max()))
    h = math.sqrt(lam_min) / 4
    axis = torch.arange(-L, L + h / 2, h, dtype=F64)
    pts = torch.cartesian_prod(*[axis] * m.shape[1]).reshape(-1, m.shape[1])
    return pts, h ** m.shape[1], L


def _numeric_bayes(prior, pts, vol, log_lik):
    """Per component k of f_k = w_k N(x; m_k, C_k) p(y | x) on the grid: Z_k, mean, covariance."""
    w, m, C = _components(prior)
    out = []
    for k in range(len(w)):
        f = torch.exp(math.log(float(w[k])) + _log_gauss(pts, m[k], C[k]) + log_lik)
        Zk = f.sum() * vol
        mean = (pts * f[:, None]).sum(0) * vol / Zk
        d = pts - mean
        cov = (d.T * f) @ d * vol / Zk
        out.append((Zk, mean, cov))
    return out


def _lam_min(prior) -> float:
    return float(torch.linalg.eigvalsh(_components(prior)[2]).min())


def _check_against_grid(prior, post, pts, vol, L, log_lik, log_evidence):
    n = len(pts)
    tol = 4 * n * EPS
    num = _numeric_bayes(prior, pts, vol, log_lik)
    Ztot = sum(z for z, _, _ in num)
    torch.testing.assert_close(post.weights, torch.stack([z / Ztot for z, _, _ in num]), rtol=0, atol=tol)
    for k, (_, mean, cov) in enumerate(num):
        torch.testing.assert_close(post.means[k], mean, rtol=0, atol=tol * L)
        torch.testing.assert_close(post.covariances[k], cov, rtol=0, atol=tol * L**2)
    assert abs(float(log_evidence) - math.log(float(Ztot))) < tol
    # the log-density on (every 7th point of) the grid: log p(x) + log p(y | x) - log p(y)
    sub = slice(None, None, 7)
    expect = _log_prior(prior, pts[sub]) + log_lik[sub] - math.log(float(Ztot))
    # a log-density's rounding is relative to its quadratic form: compare where log p > -200, at 200 x tol
    keep = expect > -200
    torch.testing.assert_close(post.log_prob(pts[sub])[keep], expect[keep], rtol=0, atol=tol * (1 + 200))


# -- the posterior against Bayes' rule on a grid --------------------------------------------------------


@pytest.mark.parametrize("a", [1.0, -1.7])
def test_posterior_1d_against_bayes(a):
    """1-D, A = a, sigma_y = 0.6: weights, means, variances, log p(y) and the log-density against the grid."""
    prior, sigma_y, y = mixture_1d(), 0.6, 0.9
    m = Measurement(Dense([[a]]), torch.tensor([y], dtype=F64), sigma_y)
    post = prior.posterior(m)
    lam = 1 / (1 / _lam_min(prior) + a**2 / sigma_y**2)  # the integrand's smallest variance
    pts, vol, L = _grid(prior, lam)
    log_lik = -0.5 * (y - a * pts[:, 0]) ** 2 / sigma_y**2 - 0.5 * math.log(2 * math.pi * sigma_y**2)
    _check_against_grid(prior, post, pts, vol, L, log_lik, prior.log_evidence(m)[0])


@pytest.mark.parametrize("kind", ["mask", "row"])
def test_posterior_2d_noisy_against_bayes(kind):
    """2-D, correlated components, sigma_y = 0.5: a mask observing coordinate 0 (y keeps the full shape; its
    masked entry is pure noise, whose density N(y_1; 0, sigma_y^2) is part of p(y)) and a dense row a."""
    prior, sigma_y = correlated_2d(), 0.5
    if kind == "mask":
        op, y = Mask(torch.tensor([1.0, 0.0])), torch.tensor([0.4, -0.3], dtype=F64)
        A = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    else:
        A = torch.tensor([[0.8, -0.6]], dtype=F64)
        op, y = Dense(A), torch.tensor([0.7], dtype=F64)
    m = Measurement(op, y, sigma_y)
    post = prior.posterior(m)
    lam = 1 / (1 / _lam_min(prior) + float(torch.linalg.matrix_norm(A, 2)) ** 2 / sigma_y**2)
    pts, vol, L = _grid(prior, lam)
    r = y - pts @ A.T
    log_lik = -0.5 * (r**2).sum(1) / sigma_y**2 - 0.5 * len(y) * math.log(2 * math.pi * sigma_y**2)
    _check_against_grid(prior, post, pts, vol, L, log_lik, prior.log_evidence(m)[0])


@pytest.mark.parametrize("kind", ["mask", "row"])
def test_posterior_2d_exact_conditioning(kind):
    """sigma_y = 0: conditioning on A x0 = y. The posterior lives on the line {A x = y}; on it, Bayes' rule is
    the prior density restricted to the line and renormalised (a 1-D grid along the line, parameter u with
    x = x_p + u n, n a unit normal of A's row). Weights, means, covariances, the log-density on the line
    (w.r.t. length), log p(y) = log int p(x_p + u n) du / |a| (the coarea formula), A m_k' = y and A C_k' = 0."""
    prior = correlated_2d()
    if kind == "mask":
        op, y, a = Mask(torch.tensor([1.0, 0.0])), torch.tensor([0.4, 0.0], dtype=F64), torch.tensor([1.0, 0.0])
    else:
        a = torch.tensor([0.8, -0.6], dtype=F64) * 1.5
        op, y = Dense(a[None]), torch.tensor([0.7], dtype=F64)
    a = a.to(F64)
    yv = float(y[0])
    m = Measurement(op, y, 0.0)
    post = prior.posterior(m)
    na = float(a.norm())
    x_p, nrm = a * yv / na**2, torch.stack([-a[1], a[0]]) / na
    w, means, C = _components(prior)
    h = math.sqrt(_lam_min(prior)) / 4  # the restriction's variance is at least lam_min(C)
    L = float(means.abs().max()) + 12 * math.sqrt(float(torch.linalg.eigvalsh(C).max()))
    u = torch.arange(-L, L + h / 2, h, dtype=F64)
    pts = x_p + u[:, None] * nrm
    tol = 4 * len(u) * EPS
    f = torch.stack([torch.exp(math.log(float(w[k])) + _log_gauss(pts, means[k], C[k])) for k in range(len(w))])
    Zk = f.sum(1) * h
    torch.testing.assert_close(post.weights, Zk / Zk.sum(), rtol=0, atol=tol)
    for k in range(len(w)):
        mean = (pts * f[k, :, None]).sum(0) * h / Zk[k]
        d = pts - mean
        cov = (d.T * f[k]) @ d * h / Zk[k]
        torch.testing.assert_close(post.means[k], mean, rtol=0, atol=tol * L)
        torch.testing.assert_close(post.covariances[k], cov, rtol=0, atol=tol * L**2)
        assert abs(float(a @ post.means[k]) - yv) < 8 * EPS * L * na
        assert float((a @ post.covariances[k]).abs().max()) < 8 * EPS * L**2 * na
    assert abs(float(prior.log_evidence(m)[0]) - math.log(float(Zk.sum()) / na)) < tol
    logp = torch.log(f.sum(0)) - math.log(float(Zk.sum()))
    keep = logp > -200
    torch.testing.assert_close(post.log_prob(pts)[keep], logp[keep], rtol=0, atol=tol * (1 + 200))
    assert post.support.shape == (2, 1)
    # samples lie on the line
    x = post.sample(1000, generator=gen(0))
    assert float((x @ a - yv).abs().max()) < 16 * EPS * L * na


def test_diagonal_prior_with_a_mask_in_closed_form():
    """A diagonal mixture observed exactly on coordinate 0: coordinate 1 keeps its prior law per component and
    the weights become w_k N(y_0; m_k0, v_k0) / p(y_0); the GaussianMixture and its full form agree."""
    gm = _diag_gm()
    y0 = 0.3
    m = Measurement(Mask(torch.tensor([1.0, 0.0], dtype=F64)), torch.tensor([y0, 0.0], dtype=F64), 0.0)
    post = gm.posterior(m)
    lik = (
        gm.weights
        * torch.exp(-0.5 * (y0 - gm.means[:, 0]) ** 2 / gm.variances[:, 0])
        / torch.sqrt(2 * math.pi * gm.variances[:, 0])
    )
    torch.testing.assert_close(post.weights, lik / lik.sum(), rtol=0, atol=8 * EPS)
    assert abs(float(gm.log_evidence(m)[0]) - math.log(float(lik.sum()))) < 8 * EPS
    expect_means = torch.stack([torch.full((3,), y0, dtype=F64), gm.means[:, 1]], 1)
    torch.testing.assert_close(post.means, expect_means, rtol=0, atol=4 * EPS)
    expect_cov = torch.zeros(3, 2, 2, dtype=F64)
    expect_cov[:, 1, 1] = gm.variances[:, 1]
    torch.testing.assert_close(post.covariances, expect_cov, rtol=0, atol=4 * EPS)
    full = gm.to_full().posterior(m)
    for attr in ("weights", "means", "covariances"):
        assert torch.equal(getattr(post, attr), getattr(full, attr))


# -- samples ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_y", [0.5, 0.0])
def test_posterior_samples_have_its_moments(sigma_y):
    """Samples of the posterior: label frequencies, per-component means and covariances, and the overall mean
    and covariance (mean(), covariance()) within Z standard errors (each from the sample's own spread)."""
    prior = correlated_2d()
    A = torch.tensor([[0.8, -0.6]], dtype=F64)
    # y = -0.3 leaves every component a posterior weight >= 0.07, so each gets thousands of samples
    post = prior.posterior(Measurement(Dense(A), torch.tensor([-0.3], dtype=F64), sigma_y))
    assert bool((post.weights > 0.05).all())
    n = 40000
    x, k = post.sample(n, generator=gen(11), return_labels=True)
    for j, w in enumerate(post.weights.tolist()):
        frac = float((k == j).double().mean())
        assert abs(frac - w) < Z * math.sqrt(w * (1 - w) / n), f"weight {j}"
        xj = x[k == j]
        _check_moments(xj, post.means[j], post.covariances[j], f"component {j}")
    _check_moments(x, post.mean(), post.covariance(), "overall")


def _check_moments(x, mean, cov, what):
    n = x.shape[0]
    se = torch.sqrt(torch.diagonal(cov).clamp_min(0) / n)
    assert bool(((x.mean(0) - mean).abs() <= Z * se + 64 * EPS).all()), f"mean of {what}"
    xc = x - mean
    for a in range(2):
        for b in range(2):
            prod = xc[:, a] * xc[:, b]  # E[prod] = cov[a, b]
            err = abs(float(prod.mean()) - float(cov[a, b]))
            assert err <= Z * float(prod.std()) / math.sqrt(n) + 64 * EPS, f"cov[{a}, {b}] of {what}"


# -- the full-covariance mixture against the diagonal one and against autograd -----------------------------


@pytest.mark.parametrize("process", [None, *PROCESSES], ids=lambda p: type(p).__name__)
def test_full_mixture_equals_the_diagonal_one_on_diagonal_input(process):
    """On diagonal covariances, FullCovarianceMixture gives GaussianMixture's numbers (log_prob, score,
    responsibilities, denoiser, moments) to float64 rounding; and a rotated copy gives them at R x (its
    covariances R diag(v) R^T go through eigh, so this checks the general path against the diagonal one)."""
    gm = _diag_gm()
    full = FullCovarianceMixture(gm.weights, gm.means, torch.diag_embed(gm.variances))
    R = _rot(0.7)
    rot = FullCovarianceMixture(gm.weights, gm.means @ R.T, R @ torch.diag_embed(gm.variances) @ R.T)
    x = torch.randn(64, 2, generator=gen(12), dtype=F64) * 2
    t = None if process is None else torch.linspace(0.2, 0.8, 64, dtype=F64) * process.t_max
    tol = 64 * EPS * (1 + float(x.abs().max()))
    for mix, xx, back in ((full, x, lambda v: v), (rot, x @ R.T, lambda v: v @ R)):
        torch.testing.assert_close(mix.log_prob(xx, process, t), gm.log_prob(x, process, t), rtol=0, atol=tol * 10)
        torch.testing.assert_close(
            mix.responsibilities(xx, process, t), gm.responsibilities(x, process, t), rtol=0, atol=tol * 10
        )
        # the score's scale is |x - m| / min(var): the rounding of the solve grows with 1 / min(var)
        s_tol = tol * 10 / float(gm.variances.min())
        torch.testing.assert_close(back(mix.score(xx, process, t)), gm.score(x, process, t), rtol=0, atol=s_tol)
        if process is not None:
            torch.testing.assert_close(
                back(mix.denoiser(process)(xx, t)), gm.denoiser(process)(x, t), rtol=0, atol=tol * 10
            )
    torch.testing.assert_close(full.mean(), gm.mean(), rtol=0, atol=4 * EPS)
    torch.testing.assert_close(full.covariance(), gm.covariance(), rtol=0, atol=16 * EPS)
    assert torch.equal(full.sample(50, generator=gen(1)), gm.sample(50, generator=gen(1)))


@pytest.mark.parametrize("process", [None, *PROCESSES], ids=lambda p: type(p).__name__)
def test_full_mixture_score_is_the_gradient_of_its_log_prob(process):
    """score = grad_x log p_t(x) by autograd, for correlated components (and for a posterior on a line, whose
    data-level density lives on its support)."""
    prior = correlated_2d()
    line = prior.posterior(Measurement(Dense([[0.8, -0.6]]), torch.tensor([0.7], dtype=F64), 0.0))
    for mix in (prior, line):
        x = (torch.randn(32, 2, generator=gen(13), dtype=F64) * 2).requires_grad_(True)
        t = None if process is None else torch.linspace(0.1, 0.9, 32, dtype=F64) * process.t_max
        (grad,) = torch.autograd.grad(mix.log_prob(x, process, t).sum(), x)
        # a lower bound on the covariances' smallest eigenvalue: at the data level lam_min(C_k) (restricted to
        # a line, the variance 1 / (n^T C^-1 n) is no smaller), at time t sigma(t)^2
        lam = _lam_min(prior) if process is None else float(process.sigma(t).min()) ** 2
        # Both sides mix the components' scores (size S <= r / lam, r = |x| + |m|) with responsibilities from a
        # softmax of log-densities of size L <= r^2 / (2 lam); those round at eps L, which moves the mixed score
        # by up to eps L S, on top of each component's own eps S. (A fixed multiple of eps S alone failed on
        # baseline kernels at VE's small sigma, where L ~ 1e4.)
        r = float(x.detach().abs().max()) + float(prior.means.abs().max())
        S, L = r / lam, r**2 / (2 * lam)
        tol = 16 * EPS * (1 + L) * (1 + S)
        torch.testing.assert_close(mix.score(x.detach(), process, t), grad, rtol=0, atol=tol)


def test_marginal_is_the_mixture_at_time_t():
    """marginal(process, t) has means alpha m_k and covariances alpha^2 C_k + sigma^2 I: its data-level
    log-density equals the mixture's log p_t."""
    prior, process, t = correlated_2d(), VP(), 0.4
    x = torch.randn(16, 2, generator=gen(14), dtype=F64)
    torch.testing.assert_close(prior.marginal(process, t).log_prob(x), prior.log_prob(x, process, t))


# -- time t: the conditional denoiser and the measurement likelihood --------------------------------------


def _measurements():
    return {
        "row-noisy": Measurement(Dense([[0.8, -0.6]]), torch.tensor([0.7], dtype=F64), 0.4),
        "mask-noisy": Measurement(Mask(torch.tensor([1.0, 0.0], dtype=F64)), torch.tensor([0.4, -0.3], dtype=F64), 0.5),
        "mask-exact": Measurement(Mask(torch.tensor([1.0, 0.0], dtype=F64)), torch.tensor([0.4, 0.0], dtype=F64), 0.0),
        "row-exact": Measurement(Dense([[1.2, -0.9]]), torch.tensor([0.7], dtype=F64), 0.0),
    }


MEAS = _measurements()


@pytest.mark.parametrize("name", list(MEAS))
@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
def test_conditional_denoiser_is_tweedie_of_the_conditional_score(process, name):
    """E[x0 | x_t, y] = (x + sigma^2 grad log p_t(x | y)) / alpha (Tweedie), where Bayes gives
    grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x): the conditional denoiser, the prior's score
    and autograd of measurement_likelihood agree. Also log p_t(x | y) = log p_t(x) + log p_t(y | x) - log p(y)."""
    prior, m = correlated_2d(), MEAS[name]
    post = prior.posterior(m)
    x = (torch.randn(24, 2, generator=gen(15), dtype=F64) * 1.5).requires_grad_(True)
    t = torch.linspace(0.15, 0.9, 24, dtype=F64) * process.t_max
    ll = prior.measurement_likelihood(x, process, t, m)
    (g,) = torch.autograd.grad(ll.sum(), x)
    x = x.detach()
    alpha, sigma = process.at(t, x)
    expect = (x + sigma**2 * (prior.score(x, process, t) + g)) / alpha
    D = prior.conditional_denoiser(process, m)(x, t)
    # sigma^2 times a score is of size |x - alpha m| (the variances are >= sigma^2), divided by alpha; rounding
    # is amplified by the condition numbers of the covariances and of S_k, below 100 here (lam_min(C) = 0.15)
    scale = float((sigma**2 / alpha).max()) * (1 + float(x.abs().max())) * 100
    torch.testing.assert_close(D, expect, rtol=0, atol=256 * EPS * scale)
    bayes = prior.log_prob(x, process, t) + ll.detach() - prior.log_evidence(m)[0]
    torch.testing.assert_close(post.log_prob(x, process, t), bayes, rtol=0, atol=256 * EPS * (1 + scale))


@pytest.mark.parametrize("name", ["row-noisy", "mask-noisy", "mask-exact"])
def test_conditional_denoiser_and_likelihood_against_the_grid(name):
    """At VP t = 0.3, E[x0 | x_t, y] and log p_t(y | x_t) against the grid: p(x0 | x_t, y) is proportional to
    p(x0) N(x_t; alpha x0, sigma^2 I) p(y | x0), and p_t(y | x_t) = int p(y | x0) p(x0 | x_t) dx0 with
    p(x0 | x_t) normalised on the same grid. At sigma_y = 0 (mask) the integral runs along the line x0_0 = y_0."""
    prior, m, process, t = correlated_2d(), MEAS[name], VP(), 0.3
    x = torch.tensor([[0.3, -0.8], [1.5, 1.0], [-1.2, 0.4]], dtype=F64)
    alpha, sigma = (float(v) for v in process.at(t, torch.zeros(1, dtype=F64)))
    w, means, C = _components(prior)
    A = m.operator.matrix()
    y = m.y[0]
    lam = 1 / (1 / _lam_min(prior) + alpha**2 / sigma**2 + (0 if m.sigma_y == 0 else 1 / m.sigma_y**2))
    pts, vol, L = _grid(prior, lam)
    logp0 = _log_prior(prior, pts)
    D = prior.conditional_denoiser(process, m)(x, t)
    ll = prior.measurement_likelihood(x, process, t, m)
    tol = 4 * len(pts) * EPS
    for i in range(len(x)):
        log_fwd = -0.5 * ((x[i] - alpha * pts) ** 2).sum(1) / sigma**2  # the constant cancels in the ratio
        p_x0_given_xt = torch.exp(logp0 + log_fwd)
        p_x0_given_xt = p_x0_given_xt / (p_x0_given_xt.sum() * vol)
        if m.sigma_y > 0:
            r = y - pts @ A.T
            lik = torch.exp(-0.5 * (r**2).sum(1) / m.sigma_y**2) / (2 * math.pi * m.sigma_y**2) ** (len(y) / 2)
            f = p_x0_given_xt * lik
            evidence = f.sum() * vol
            mean = (pts * f[:, None]).sum(0) * vol / evidence
        else:  # the density of x0_0 at y_0 under p(x0 | x_t), and the mean along that line
            h = vol**0.5
            axis = torch.unique(pts[:, 1])
            line = torch.stack([torch.full_like(axis, float(y[0])), axis], 1)
            g = torch.exp(_log_prior(prior, line) - 0.5 * ((x[i] - alpha * line) ** 2).sum(1) / sigma**2)
            norm = torch.exp(logp0 + log_fwd).sum() * vol
            evidence = g.sum() * h / norm
            mean = (line * g[:, None]).sum(0) / g.sum()
        assert abs(float(ll[i]) - math.log(float(evidence))) < tol, i
        torch.testing.assert_close(D[i], mean, rtol=0, atol=tol * L)


def test_conditional_denoiser_at_pure_noise_is_the_posterior_mean():
    """Flow at t = 1 has alpha = 0: x_t says nothing about x0, so E[x0 | x_t, y] = E[x0 | y] exactly."""
    prior, process = correlated_2d(), Flow()
    for m in MEAS.values():
        x = torch.randn(5, 2, generator=gen(16), dtype=F64)
        D = prior.conditional_denoiser(process, m)(x, torch.ones(5, dtype=F64))
        torch.testing.assert_close(D, prior.posterior(m).mean().expand(5, 2), rtol=0, atol=16 * EPS)


def test_exact_observation_is_kept_by_the_conditional_denoiser():
    """sigma_y = 0 with a mask: the observed coordinate of E[x0 | x_t, y] is y at every t."""
    prior, m = correlated_2d(), MEAS["mask-exact"]
    for process in PROCESSES:
        x = torch.randn(8, 2, generator=gen(17), dtype=F64) * 2
        t = torch.linspace(0.05, 1.0, 8, dtype=F64) * process.t_max
        D = prior.conditional_denoiser(process, m)(x, t)
        assert float((D[:, 0] - 0.4).abs().max()) < 64 * EPS, type(process).__name__


def test_batches_of_observations_and_times():
    """A batch of observations pairs y[i] with x[i] (denoiser and likelihood equal the one-by-one calls), and
    per-example times group into noise levels without changing the likelihood."""
    prior, process = correlated_2d(), VP()
    ys = torch.tensor([[0.7], [-0.2], [1.1]], dtype=F64)
    mb = Measurement(Dense([[0.8, -0.6]]), ys, 0.3)
    x = torch.randn(3, 2, generator=gen(18), dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.2], dtype=F64)
    D = prior.conditional_denoiser(process, mb)(x, t)
    ll = prior.measurement_likelihood(x, process, t, mb)
    for i in range(3):
        mi = Measurement(mb.operator, ys[i], 0.3)
        torch.testing.assert_close(D[i], prior.conditional_denoiser(process, mi)(x[i : i + 1], t[i : i + 1])[0])
        torch.testing.assert_close(ll[i], prior.measurement_likelihood(x[i : i + 1], process, t[i], mi)[0])
    torch.testing.assert_close(
        prior.log_evidence(mb), torch.stack([prior.log_evidence(Measurement(mb.operator, y, 0.3))[0] for y in ys])
    )


# -- images: the closed-form SVDs through the posterior -----------------------------------------------------


def _image_prior():
    g = gen(19)
    K, shape = 3, (3, 2, 2)
    D = math.prod(shape)
    B = torch.randn(K, D, D, generator=g, dtype=F64)
    covs = B @ B.mT / D + 0.1 * torch.eye(D, dtype=F64)
    return FullCovarianceMixture([0.3, 0.3, 0.4], torch.randn(K, D, generator=g, dtype=F64), covs, shape)


@pytest.mark.parametrize("op", [Colorize(shape=(3, 2, 2)), Downsample(2, shape=(3, 2, 2))], ids=repr)
@pytest.mark.parametrize("sigma_y", [0.2, 0.0])
def test_image_operators_give_the_dense_posterior(op, sigma_y):
    """Colorization and pooling (closed-form SVDs) give the same posterior and likelihood as their dense
    matrices (SVD by LAPACK); at sigma_y = 0 the posterior means satisfy A m_k' = y."""
    prior = _image_prior()
    x0 = prior.sample(1, generator=gen(20))
    m = Measurement.observe(op, x0, sigma_y, generator=gen(21))
    md = Measurement(Dense(op.matrix(), shape=op.in_shape), m.y.reshape(1, -1), sigma_y)
    post, dense = prior.posterior(m), prior.posterior(md)
    tol = 1e3 * EPS  # covariances of condition number <= ~(1 + D / 0.1) ~ 100, entries O(1)
    for attr in ("weights", "means", "covariances"):
        torch.testing.assert_close(getattr(post, attr), getattr(dense, attr), rtol=0, atol=tol)
    x = prior.sample(4, generator=gen(22))
    torch.testing.assert_close(
        prior.measurement_likelihood(x, VP(), 0.5, m), prior.measurement_likelihood(x, VP(), 0.5, md), atol=tol, rtol=0
    )
    if sigma_y == 0:
        Ay = op(post.means.reshape(-1, *op.in_shape))
        torch.testing.assert_close(Ay, m.y.expand_as(Ay), rtol=0, atol=tol)


# -- clear errors -------------------------------------------------------------------------------------------


def test_bad_posterior_requests_are_refused():
    prior = correlated_2d()
    op = Dense([[0.8, -0.6]])
    with pytest.raises(ValueError, match="one observation"):
        prior.posterior(Measurement(op, torch.tensor([[0.1], [0.2]]), 0.1))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        prior.posterior(Measurement(Dense(torch.ones(1, 3)), torch.tensor([0.1]), 0.1))
    with pytest.raises(TypeError, match="Measurement"):
        prior.posterior(op)
    with pytest.raises(ValueError, match="1 \\(shared\\) or one per x"):
        prior.measurement_likelihood(torch.zeros(3, 2), VP(), 0.5, Measurement(op, torch.zeros(2, 1), 0.1))
    point = GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="singular and sigma_y = 0"):
        point.posterior(Measurement(Mask(torch.tensor([1.0, 0.0])), torch.tensor([0.0, 0.0]), 0.0))
    with pytest.raises(ValueError, match="density at sigma = 0 does not exist"):
        point.to_full().log_prob(torch.zeros(1, 2))
    point.to_full().log_prob(torch.zeros(1, 2), VP(), 0.5)  # fine at sigma > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": [1.0, -1.0]}, "non-negative"),
        ({"covariances": torch.eye(2, dtype=F64).expand(3, 2, 2)}, r"\(K, D, D\)"),
        ({"covariances": torch.tensor([[[1.0, 0.0], [0.0, -1.0]]] * 2)}, "positive semi-definite"),
        ({"support": torch.ones(2, 1)}, "orthonormal"),
        ({"shape": (3,)}, "does not hold"),
    ],
)
def test_bad_full_mixtures_are_refused(kwargs, match):
    args = {"weights": [0.5, 0.5], "means": torch.zeros(2, 2), "covariances": torch.eye(2).expand(2, 2, 2)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FullCovarianceMixture(**args)
