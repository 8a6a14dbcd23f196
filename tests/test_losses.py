"""Closed-form tests of losses.py: the weightings, the training times and the denoising loss.

With x_t = alpha x0 + sigma eps (seed 003), every weighting is a weight on |x0_hat - x0|^2:
the discrete variational bound (Ho et al. 2020, Eq. 5 and 7; seed 003, "Final objective
function"), its continuous limit -snr'(t)/2 (Kingma et al. 2021, Eq. 17), the likelihood
weighting g^2/2 on the score (Song et al. 2021b), snr = the eps loss (Ho et al. 2020, Eq. 14),
NCSN's sigma^2 on the score (Song & Ermon 2019, Eq. 6) and min-SNR (Hang et al. 2023).
Float64 on the CPU; statistical tolerances are a fixed number of standard errors.
"""

import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, SubVP
from torchdiffusion.core.predictions import ALL_PREDICTIONS, EPS, SCORE, X0
from torchdiffusion.core.processes import beta_cosine, beta_linear
from torchdiffusion.names import PREDICTIONS, SCHEDULES, WEIGHTINGS, get_prediction, get_weighting
from torchdiffusion.objectives import ELBO, LIKELIHOOD, MIN_SNR, SIMPLE, SNR, MinSNR, denoising_loss, sample_t

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
NON_SIMPLE = tuple(w for w in WEIGHTINGS if w != "simple")
CONTINUOUS = [VP(), SubVP(), VE(), Cosine(), EDM(), Flow()]
CONTINUOUS_IDS = [type(p).__name__ for p in CONTINUOUS]
DISCRETE = [
    Discrete.from_schedule(SCHEDULES[s], T) for s in ("linear", "cosine", "sigmoid", "quadratic") for T in (50, 1000)
]
DISCRETE_IDS = [f"Discrete-{s}-T{T}" for s in ("linear", "cosine", "sigmoid", "quadratic") for T in (50, 1000)]


def _times(process) -> torch.Tensor:
    """t_min, interior times and, where alpha(t_max) > 0, t_max; integers too on a discrete process.

    Flow's t_max = 1 has alpha = 0, where x0 cannot be recovered from x_t (and sample_t never draws it).
    """
    lo, hi = process.t_min, process.t_max
    ts = [lo] + [lo + u * (hi - lo) for u in (0.013, 0.31, 0.62, 0.95)]
    if process.n_steps is not None:
        ts += [1.0, 2.0, 3.0, float(process.n_steps // 2), float(process.n_steps)]
    elif float(process.alpha(torch.tensor(hi, dtype=F64))) > 0:
        ts.append(hi)
    return torch.tensor(ts, dtype=F64)


def _ddpm_tables(process: Discrete):
    """betas_t, alphas_t = 1 - beta_t and alpha_bar_t = prod_{s <= t} alpha_s for t = 0..T (index 0
    is a placeholder beta_0 = 0, alpha_bar_0 = 1), straight from the betas (Ho et al. 2020, Sec. 2)."""
    betas = torch.cat([torch.zeros(1, dtype=F64), process.betas.to(F64)])
    alphas = 1 - betas
    return betas, alphas, torch.cumprod(alphas, 0)


def _autograd(fn, t: torch.Tensor) -> torch.Tensor:
    """d fn / dt elementwise; zero for a curve constant in t (alpha = 1 on VE and EDM)."""
    u = t.detach().clone().requires_grad_(True)
    y = fn(u)
    if not y.requires_grad:
        return torch.zeros_like(t)
    (g,) = torch.autograd.grad(y.sum(), u)
    return g


# --- 1. every weighting but "simple" is one weight on |x0_hat - x0|^2, whatever the target -----------


@pytest.mark.parametrize("weighting", NON_SIMPLE)
def test_loss_is_target_independent_for_a_fixed_x0_error(process, weighting):
    """Module docstring of losses.py / seed 003, "Final objective function": a weighting is a weight
    w(t) on |x0_hat - x0|^2, converted to the target's units by |dx0/dout|^2; so for one error delta
    in x0 space, the per-example loss is w(t) |delta|^2 / D whether the net predicts eps, x0, v,
    score or flow (Salimans & Ho 2022, Appendix D; Lipman et al. 2022 for the flow velocity)."""
    ts = _times(process)
    B, D = ts.numel(), 3
    g = gen(1)
    x0 = torch.randn(B, D, generator=g, dtype=F64) * 1.3 + 0.4
    noise = torch.randn(B, D, generator=g, dtype=F64)
    delta = torch.randn(B, D, generator=g, dtype=F64) * 0.2
    xt = process.perturb(x0, ts, noise)
    expected = WEIGHTINGS[weighting](process, ts, X0) * (delta**2).mean(1)
    assert torch.isfinite(expected).all() and (expected > 0).all()
    for target in ALL_PREDICTIONS:

        def model(x, t, target=target):
            assert torch.equal(x, xt)  # the loss perturbs with the noise it was given
            return target.from_x0(process, x, t, x0 + delta)

        loss = denoising_loss(model, process, x0, target=target, weighting=WEIGHTINGS[weighting], t=ts, noise=noise)
        assert loss.shape == (B,) and loss.dtype == F64
        torch.testing.assert_close(loss, expected, rtol=1e-8, atol=0, msg=f"target {target}")


def test_simple_loss_is_the_plain_mse_in_the_targets_units(process):
    """Ho et al. 2020, Eq. 14 (L_simple): w = 1, so the loss is |out - target|^2 averaged over the
    non-batch dims; with out = 0 and target eps it is mean(eps^2), with target x0 mean(x0^2)."""
    ts = _times(process)
    B = ts.numel()
    g = gen(2)
    x0 = torch.randn(B, 2, 3, 4, generator=g, dtype=F64)
    noise = torch.randn(B, 2, 3, 4, generator=g, dtype=F64)

    def zero(x, t):
        return torch.zeros_like(x)

    loss = denoising_loss(zero, process, x0, target=EPS, weighting=SIMPLE, t=ts, noise=noise)
    torch.testing.assert_close(loss, (noise**2).flatten(1).mean(1), rtol=1e-14, atol=0)
    loss = denoising_loss(zero, process, x0, target=X0, t=ts, noise=noise)
    torch.testing.assert_close(loss, (x0**2).flatten(1).mean(1), rtol=1e-14, atol=0)


# --- 2. the discrete "elbo" weight is the KL term of the bound ---------------------------------------


def _gauss_kl(mu1, var1, mu2, var2):
    """KL(N(mu1, var1 I) || N(mu2, var2 I)) summed over the last dim, the general formula (the
    variance terms grouped first, so the mean term is not added to 1 and rounded away)."""
    return 0.5 * ((torch.log(var2 / var1) + var1 / var2 - 1) + (mu1 - mu2) ** 2 / var2).sum(-1)


@pytest.mark.parametrize("process", DISCRETE, ids=DISCRETE_IDS)
def test_discrete_elbo_weight_is_the_kl_term(process):
    """Ho et al. 2020, Eq. 5 and 7 (seed 003, "Minimizing the loss"): for t >= 2 the bound's term is
    KL(q(x_{t-1}|x_t, x0) || N(mu~(x_t, x0_hat), sigma_q^2)) with mu~ = sqrt(ab_{t-1}) beta_t/(1-ab_t) x0
    + sqrt(alpha_t)(1-ab_{t-1})/(1-ab_t) x_t and sigma_q^2 = beta_t (1-ab_{t-1})/(1-ab_t). The loss is
    T w_step(t) |x0_hat - x0|^2 / D (uniform t in 1..T estimates the sum), so loss * D / T = KL."""
    T = process.n_steps
    betas, alphas, ab = _ddpm_tables(process)
    t = torch.arange(2, T + 1)
    B, D = t.numel(), 3
    g = gen(3)
    x0 = torch.randn(B, D, generator=g, dtype=F64)
    noise = torch.randn(B, D, generator=g, dtype=F64)
    delta = torch.randn(B, D, generator=g, dtype=F64) * 0.1
    xt = ab[t, None].sqrt() * x0 + (1 - ab[t, None]).sqrt() * noise  # Ho et al. 2020, Eq. 4

    def mu_tilde(x_t, x_0):
        c0 = ab[t - 1].sqrt() * betas[t] / (1 - ab[t])
        cx = alphas[t].sqrt() * (1 - ab[t - 1]) / (1 - ab[t])
        return cx[:, None] * x_t + c0[:, None] * x_0

    var_q = (betas[t] * (1 - ab[t - 1]) / (1 - ab[t]))[:, None].expand(B, D)
    kl = _gauss_kl(mu_tilde(xt, x0), var_q, mu_tilde(xt, x0 + delta), var_q)

    loss = denoising_loss(lambda x, s: x0 + delta, process, x0, target=X0, weighting=ELBO, t=t.to(F64), noise=noise)
    # The difference snr(t-1) - snr(t) cancels a relative 1/beta_t ~ 1e4 of float64 rounding.
    torch.testing.assert_close(loss * D / T, kl, rtol=1e-9, atol=0)


@pytest.mark.parametrize("process", DISCRETE, ids=DISCRETE_IDS)
def test_discrete_elbo_decoder_term_at_t1(process):
    """Ho et al. 2020, Sec. 3.3 with a Gaussian decoder p(x0|x1) = N(mu~(x1, x0_hat), beta_1 I): with
    alpha_bar_0 = 1, Eq. 7 gives mu~(x1, x0_hat) = x0_hat, and -log p(x0|x1) exceeds its value at
    x0_hat = x0 by |x0_hat - x0|^2 / (2 beta_1); so the per-step weight at t = 1 is 1/(2 beta_1)."""
    T = process.n_steps
    betas, alphas, ab = _ddpm_tables(process)
    c0 = ab[0].sqrt() * betas[1] / (1 - ab[1])
    cx = alphas[1].sqrt() * (1 - ab[0]) / (1 - ab[1])
    assert float(cx) == 0.0
    # 1 - beta_1 rounds by up to eps/2 and 1 - ab_1 is then exact (Sterbenz), so 1 - ab_1 = beta_1 (1 + e) with
    # |e| <= eps / (2 beta_1): 2.8e-12 for the cosine schedule's beta_1 = 4e-5; the division adds eps/2.
    torch.testing.assert_close(c0, torch.tensor(1.0, dtype=F64), rtol=float(torch.finfo(F64).eps / betas[1]), atol=0)

    B, D = 5, 4
    g = gen(4)
    x0 = torch.randn(B, D, generator=g, dtype=F64)
    noise = torch.randn(B, D, generator=g, dtype=F64)
    delta = torch.randn(B, D, generator=g, dtype=F64) * 0.05
    decoder_std = betas[1].sqrt()
    nll = -torch.distributions.Normal(c0 * (x0 + delta), decoder_std).log_prob(x0).sum(1)
    nll_min = -torch.distributions.Normal(c0 * x0, decoder_std).log_prob(x0).sum(1)
    ones = torch.ones(B, dtype=F64)
    loss = denoising_loss(lambda x, s: x0 + delta, process, x0, target=X0, weighting=ELBO, t=ones, noise=noise)
    torch.testing.assert_close(loss * D / T, nll - nll_min, rtol=1e-9, atol=0)
    # 1 - alpha_bar_1 rounds to a relative 1e-16 / beta_1 (beta_1 ~ 4e-5 for cosine, T = 1000)
    torch.testing.assert_close(ELBO(process, ones, X0), T / (2 * betas[1]) * ones, rtol=1e-9, atol=0)


@pytest.mark.parametrize("process", DISCRETE, ids=DISCRETE_IDS)
def test_seed_final_objective_weight_is_half_snr_difference(process):
    """Seed 003, "Final objective function": 1/(2 sigma_q^2(t)) * ab_{t-1} (1 - alpha_t)^2 / (1 - ab_t)^2
    = (snr(t-1) - snr(t)) / 2 (Kingma et al. 2021, Eq. 13's discrete form), and that is the library's
    per-step "elbo" weight w(t) / T on |x0_hat - x0|^2 for t >= 2."""
    T = process.n_steps
    betas, alphas, ab = _ddpm_tables(process)
    t = torch.arange(2, T + 1)
    var_q = betas[t] * (1 - ab[t - 1]) / (1 - ab[t])
    seed = ab[t - 1] * (1 - alphas[t]) ** 2 / (1 - ab[t]) ** 2 / (2 * var_q)
    tf = t.to(F64)
    half_dsnr = (process.snr(tf - 1) - process.snr(tf)) / 2
    snr_tab = ab / (1 - ab).clamp_min(1e-300)  # snr(0) = inf is not used: t - 1 >= 1
    torch.testing.assert_close(seed, half_dsnr, rtol=1e-9, atol=0)
    torch.testing.assert_close(seed, (snr_tab[t - 1] - snr_tab[t]) / 2, rtol=1e-9, atol=0)
    torch.testing.assert_close(ELBO(process, tf, X0) / T, seed, rtol=1e-9, atol=0)


# --- 3. likelihood weighting = continuous bound = -snr'/2 -----------------------------------------


@pytest.mark.parametrize("process", CONTINUOUS, ids=CONTINUOUS_IDS)
def test_likelihood_weight_is_half_g2_on_the_score(process):
    """Song et al. 2021b (likelihood weighting lambda(t) = g^2(t)): the weight on |s_hat - s|^2 is
    g^2(t)/2, divided by the density p(t) of the training times (so that their mean estimates the
    integral over [t_min, t_max]; uniform t: times t_max - t_min). g^2 is computed here from its
    definition d sigma^2/dt - 2 (d log alpha/dt) sigma^2 (Song et al. 2021, Eq. 5/11) by autograd of
    the two curves, independently of the processes' closed forms."""
    t = _times(process)
    L = 1 / process.train_t_density(t)  # checked on its own in test_train_t_density_*
    g2 = (
        _autograd(lambda u: process.sigma(u) ** 2, t)
        - 2 * _autograd(lambda u: torch.log(process.alpha(u)), t) * process.sigma(t) ** 2
    )
    torch.testing.assert_close(LIKELIHOOD(process, t, SCORE), g2 / 2 * L, rtol=1e-9, atol=0)

    # the same through the loss: a score net off by e gives g^2/2 * L * mean(e^2)
    B, D = t.numel(), 2
    g = gen(5)
    x0 = torch.randn(B, D, generator=g, dtype=F64)
    noise = torch.randn(B, D, generator=g, dtype=F64)
    e = torch.randn(B, D, generator=g, dtype=F64)

    def model(x, s):
        return SCORE.from_x0(process, x, s, x0, noise) + e

    loss = denoising_loss(model, process, x0, target=SCORE, weighting=LIKELIHOOD, t=t, noise=noise)
    torch.testing.assert_close(loss, g2 / 2 * L * (e**2).mean(1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("process", CONTINUOUS, ids=CONTINUOUS_IDS)
def test_continuous_elbo_is_minus_half_snr_derivative(process):
    """Kingma et al. 2021, Eq. 17: the continuous bound weights |x0_hat - x0|^2 by -snr'(t)/2 (over the
    density of the training times, t_max - t_min for uniform t); it equals the likelihood weighting in x0
    units. snr' by autograd of process.snr, and by a central difference (truncation O(h^2), rounding
    O(1e-16 t / h))."""
    t = _times(process)
    L = 1 / process.train_t_density(t)
    elbo = ELBO(process, t, X0)
    torch.testing.assert_close(elbo, LIKELIHOOD(process, t, X0), rtol=1e-12, atol=0)
    torch.testing.assert_close(elbo, -_autograd(process.snr, t) / 2 * L, rtol=1e-9, atol=0)
    h = 1e-5 * (t.abs() + 1e-3)
    fd = (process.snr(t + h) - process.snr(t - h)) / (2 * h)
    torch.testing.assert_close(elbo, -fd / 2 * L, rtol=1e-6, atol=0)
    assert (elbo > 0).all()  # snr strictly decreases


# --- 4. snr / sigma2 / min_snr / simple ---------------------------------------------------------------


@pytest.mark.parametrize("target", ALL_PREDICTIONS, ids=repr)
def test_simple_weight_is_one(process, target):
    """Ho et al. 2020, Eq. 14: L_simple weighs the target's own squared error by 1."""
    t = _times(process)
    assert torch.equal(SIMPLE(process, t, target), torch.ones_like(t))


def test_snr_weight_is_the_eps_loss(process):
    """Ho et al. 2020, Eq. 14 vs 12: |eps_hat - eps|^2 = snr |x0_hat - x0|^2, so the "snr" weighting
    (and its alias "sigma2") is weight 1 on eps, snr on x0; on the score it is sigma^2, NCSN's
    lambda(sigma) = sigma^2 (Song & Ermon 2019, Eq. 6); "min_snr" on eps is min(snr, gamma)/snr
    (Hang et al. 2023)."""
    t = _times(process)
    a, s = process.alpha(t), process.sigma(t)
    snr = a**2 / s**2
    one = torch.ones_like(t)
    for w in ("snr", "sigma2"):
        torch.testing.assert_close(WEIGHTINGS[w](process, t, EPS), one, rtol=1e-12, atol=0)
        torch.testing.assert_close(WEIGHTINGS[w](process, t, X0), snr, rtol=1e-12, atol=0)
        torch.testing.assert_close(WEIGHTINGS[w](process, t, SCORE), s**2, rtol=1e-12, atol=0)
    for gamma in (5.0, 1.0, 1e-3):
        expected = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
        torch.testing.assert_close(MinSNR(gamma)(process, t, EPS), expected, rtol=1e-12, atol=0)
        assert (expected <= 1).all()

    # through the loss: an eps net off by e has "snr" loss mean(e^2), min_snr loss min(snr, 5)/snr * that
    B, D = t.numel(), 3
    g = gen(6)
    x0 = torch.randn(B, D, generator=g, dtype=F64)
    noise = torch.randn(B, D, generator=g, dtype=F64)
    e = torch.randn(B, D, generator=g, dtype=F64)
    loss = denoising_loss(lambda x, u: noise + e, process, x0, weighting=SNR, t=t, noise=noise)
    torch.testing.assert_close(loss, (e**2).mean(1), rtol=1e-12, atol=0)
    loss = denoising_loss(lambda x, u: noise + e, process, x0, weighting=MIN_SNR, t=t, noise=noise)
    torch.testing.assert_close(loss, snr.clamp(max=5.0) / snr * (e**2).mean(1), rtol=1e-12, atol=0)


# --- 5. sample_t ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 7, 50])
def test_sample_t_discrete_is_uniform_on_1_to_T(T):
    """Ho et al. 2020, Algorithm 1: t ~ Uniform({1, ..., T}). Every value is hit, none lies outside,
    all are integers, and each count is within Z binomial standard errors of n/T."""
    process = Discrete.from_schedule(beta_cosine, T)
    n = 40_000
    t = sample_t(process, n, generator=gen(7))
    assert t.shape == (n,) and t.dtype == F64
    assert torch.equal(t, t.round())
    assert t.min() >= 1 and t.max() <= T
    counts = torch.bincount(t.long(), minlength=T + 1)
    assert counts[0] == 0 and (counts[1:] > 0).all()
    p = 1 / T
    se = math.sqrt(n * p * (1 - p))
    assert ((counts[1:].to(F64) - n * p).abs() < Z * se).all(), counts
    # reproducible from the generator
    assert torch.equal(t, sample_t(process, n, generator=gen(7)))


def test_sample_t_discrete_T1000_range():
    """Uniform({1..T}) for T = 1000: bounds respected and the mean (T+1)/2 within Z standard errors
    sqrt((T^2 - 1)/12 / n)."""
    process = Discrete.from_schedule(beta_linear, 1000)
    n = 100_000
    t = sample_t(process, n, generator=gen(8))
    assert t.min() >= 1 and t.max() <= 1000 and torch.equal(t, t.round())
    T = 1000
    se = math.sqrt((T**2 - 1) / 12 / n)
    assert abs(float(t.mean()) - (T + 1) / 2) < Z * se


def test_sample_t_continuous_is_uniform(continuous_process):
    """Uniform on [t_min, t_max]: all draws inside; mean (t_min + t_max)/2 and variance L^2/12 within Z
    standard errors (L/sqrt(12 n) and L^2/sqrt(180 n), the variance of U^2 terms); Kolmogorov-Smirnov
    distance below the DKW bound sqrt(log(2/p)/(2n)) at p = 1e-9 (Massart 1990)."""
    p = continuous_process
    if isinstance(p, EDM):
        pytest.skip("EDM draws VP's noise levels: test_sample_t_edm_draws_the_noise_levels_of_vp")
    lo, hi = p.t_min, p.t_max
    L = hi - lo
    n = 50_000
    t = sample_t(p, n, generator=gen(9))
    assert t.shape == (n,) and t.dtype == F64
    assert t.min() >= lo and t.max() <= hi
    assert abs(float(t.mean()) - (lo + hi) / 2) < Z * L / math.sqrt(12 * n)
    # Var of (U - 1/2)^2 for U uniform on [0, 1] is 1/80 - 1/144 = 1/180
    assert abs(float(t.var()) - L**2 / 12) < Z * L**2 / math.sqrt(180 * n)
    u = ((t - lo) / L).sort().values
    i = torch.arange(1, n + 1, dtype=F64)
    ks = torch.maximum(i / n - u, u - (i - 1) / n).max()
    assert float(ks) < math.sqrt(math.log(2 / 1e-9) / (2 * n))
    assert torch.equal(t, sample_t(p, n, generator=gen(9)))


BETA_MIN, BETA_D = 0.1, 19.9  # Karras et al. 2022, Table 1, "VP"


def _vp_tau(sigma):
    """Karras et al. 2022, Table 1 ("VP"): the t whose sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) is
    sigma, solved from the quadratic beta_d t^2 / 2 + beta_min t = log(1 + sigma^2)."""
    log1p = torch.log1p(torch.as_tensor(sigma, dtype=F64) ** 2)
    return (-BETA_MIN + torch.sqrt(BETA_MIN**2 + 2 * BETA_D * log1p)) / BETA_D


def test_sample_t_edm_draws_the_noise_levels_of_vp():
    """EDM trains on VP's noise levels: tau(sigma) of the draws (the closed form above, not the library's
    VP) is uniform on [tau(t_min), tau(t_max)]: all draws inside, Kolmogorov-Smirnov distance below the DKW
    bound at p = 1e-9; the ends of train_t are t_min and t_max."""
    p = EDM()
    n = 50_000
    t = sample_t(p, n, generator=gen(19))
    assert t.dtype == F64 and t.min() >= p.t_min and t.max() <= p.t_max
    lo, hi = (float(_vp_tau(x)) for x in (p.t_min, p.t_max))
    u = ((_vp_tau(t) - lo) / (hi - lo)).sort().values
    i = torch.arange(1, n + 1, dtype=F64)
    assert float(torch.maximum(i / n - u, u - (i - 1) / n).max()) < math.sqrt(math.log(2 / 1e-9) / (2 * n))
    ends = p.train_t(torch.tensor([0.0, 1.0], dtype=F64))
    torch.testing.assert_close(ends, torch.tensor([p.t_min, p.t_max], dtype=F64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("process", CONTINUOUS, ids=CONTINUOUS_IDS)
def test_train_t_density_is_that_of_train_t(process):
    """train_t is the inverse CDF of the density train_t_density: p(train_t(u)) * d train_t / du = 1 at every
    u (autograd). Uniform processes: p = 1 / (t_max - t_min). EDM: uniform tau(sigma) (see above) has density
    1 / ((tau_hi - tau_lo) d sigma / d tau) = 2 sigma / ((1 + sigma^2) (beta_d tau + beta_min) (tau_hi - tau_lo))."""
    u = torch.tensor([1e-4, 0.01, 0.2, 0.5, 0.8, 0.99, 1 - 1e-4], dtype=F64)
    t = process.train_t(u)
    dt_du = _autograd(process.train_t, u)
    # a handful of float64 roundings (ndtri, exp and their autograd derivatives): 1e-12 leaves a margin of 1e3
    torch.testing.assert_close(process.train_t_density(t) * dt_du, torch.ones_like(u), rtol=1e-12, atol=0)
    if isinstance(process, EDM):
        lo, hi = (float(_vp_tau(x)) for x in (process.t_min, process.t_max))
        exact = 2 * t / ((1 + t**2) * (BETA_D * _vp_tau(t) + BETA_MIN) * (hi - lo))
    else:
        exact = torch.full_like(t, 1 / (process.t_max - process.t_min))
    torch.testing.assert_close(process.train_t_density(t), exact, rtol=1e-12, atol=0)


# --- 6. the bound of the exact denoiser on Gaussian data ----------------------------------------------


def _posterior_var(alpha, sigma, v):
    """Var[x0 | x_t] for x0 ~ N(m, v) and x_t = alpha x0 + sigma eps: v sigma^2 / (alpha^2 v + sigma^2)."""
    return v * sigma**2 / (alpha**2 * v + sigma**2)


def _exact_denoiser_loss(process, m, v, n, D, seed, target=X0):
    """Per-example "elbo" losses of the exact posterior-mean predictor, over random t, x0, eps."""

    def model(xt, t):
        a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
        x0_hat = m + a * v / (a**2 * v + s**2) * (xt - a * m)
        return target.from_x0(process, xt, t, x0_hat)

    g = gen(seed)
    x0 = m + math.sqrt(v) * torch.randn(n, D, generator=g, dtype=F64)
    return denoising_loss(model, process, x0, target=target, weighting=ELBO, generator=g)


@pytest.mark.parametrize("schedule,T", [("cosine", 20), ("sigmoid", 20), ("linear", 50)])
@pytest.mark.parametrize("D", [1, 2])
def test_discrete_elbo_of_the_exact_denoiser_on_gaussian_data(schedule, T, D):
    """Seed 003, "Final objective function" with the Bayes-optimal x0_hat = E[x0|x_t]: for x0 ~ N(m, v I)
    the expected loss is sum_t w_step(t) Var[x0|x_t], with w_step(1) = 1/(2 beta_1) and
    w_step(t) = (snr(t-1) - snr(t))/2, Var = v sigma_t^2/(alpha_t^2 v + sigma_t^2). Monte Carlo over
    t, x0, eps vs the closed form, within Z standard errors of the mean."""
    process = Discrete.from_schedule(SCHEDULES[schedule], T)
    betas, alphas, ab = _ddpm_tables(process)
    m, v = 0.7, 2.5
    tt = torch.arange(1, T + 1)
    var = _posterior_var(ab[tt].sqrt(), (1 - ab[tt]).sqrt(), v)
    snr = ab / (1 - ab).clamp_min(1e-300)
    w_step = torch.where(tt == 1, 1 / (2 * betas[1]), (snr[tt - 1] - snr[tt]) / 2)
    exact = float((w_step * var).sum())

    n = 200_000
    for target in (X0, EPS):
        losses = _exact_denoiser_loss(process, m, v, n, D, seed=10 + D, target=target)
        se = float(losses.std()) / math.sqrt(n)
        assert abs(float(losses.mean()) - exact) < Z * se, (target, float(losses.mean()), exact, se)
        assert se < 0.05 * exact  # the comparison has power


@pytest.mark.parametrize("process", CONTINUOUS, ids=CONTINUOUS_IDS)
def test_continuous_elbo_of_the_exact_denoiser_on_gaussian_data(process):
    """Kingma et al. 2021, Eq. 17 with the Bayes-optimal denoiser on x0 ~ N(m, v): the integrand
    -snr'/2 * v/(1 + v snr) is the derivative of -log(1 + v snr)/2, so the expected loss is
    (log(1 + v snr(t_min)) - log(1 + v snr(t_max))) / 2 per dimension. Monte Carlo within Z s.e."""
    m, v = -0.3, 1.7
    lo, hi = (torch.tensor(x, dtype=F64) for x in (process.t_min, process.t_max))
    exact = 0.5 * float(torch.log1p(v * process.snr(lo)) - torch.log1p(v * process.snr(hi)))
    n = 1_000_000
    losses = _exact_denoiser_loss(process, m, v, n, 2, seed=20)
    se = float(losses.std()) / math.sqrt(n)
    assert abs(float(losses.mean()) - exact) < Z * se, (float(losses.mean()), exact, se)
    assert se < 0.05 * exact  # EDM: -lam'(t) = 1/t is heavy near t_min, so its s.e. is the largest


# --- 7. errors -----------------------------------------------------------------------------------------


def test_unknown_weighting_raises_listing_the_choices():
    """An unknown weighting name is a ValueError (at the edge, ``names``) whose message lists WEIGHTINGS; inside the
    library a name is not a weighting: the loss refuses it with a TypeError that says so."""
    p = VP()
    t = torch.full((2,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="unknown weighting") as info:
        get_weighting("kl")
    assert all(repr(w) in str(info.value) for w in WEIGHTINGS)
    x0 = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(TypeError, match="weighting must be objects"):
        denoising_loss(lambda x, s: x, p, x0, weighting="kl", t=t)


def test_unknown_target_raises_listing_the_choices():
    """An unknown prediction target name is a ValueError whose message lists PREDICTIONS; inside the library the
    loss refuses a name with a TypeError."""
    p = VP()
    t = torch.full((2,), 0.5, dtype=F64)
    x0 = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(TypeError, match="target and weighting must be objects"):
        denoising_loss(lambda x, s: x, p, x0, target="mu", t=t)
    with pytest.raises(ValueError, match="unknown prediction target") as info:
        get_prediction("mu")
    assert all(repr(k) in str(info.value) for k in PREDICTIONS)


def test_loss_passes_conditioning_and_is_reproducible():
    """Ho et al. 2020, Algorithm 1: t and eps come only from the generator; keyword conditioning
    (class labels) reaches the model unchanged."""
    p = Discrete.from_schedule(beta_linear, 50)
    x0 = torch.randn(8, 2, generator=gen(30), dtype=F64)
    labels = torch.arange(8)
    seen = []

    def model(x, t, class_labels=None):
        seen.append(class_labels)
        assert t.dtype == x.dtype and t.shape == (8,)
        return x * 0.5

    a = denoising_loss(model, p, x0, weighting=ELBO, generator=gen(31), class_labels=labels)
    b = denoising_loss(model, p, x0, weighting=ELBO, generator=gen(31), class_labels=labels)
    assert torch.equal(a, b) and all(s is labels for s in seen)
    c = denoising_loss(model, p, x0, weighting=ELBO, generator=gen(32), class_labels=labels)
    assert not torch.equal(a, c)
