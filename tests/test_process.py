"""Closed-form tests of the noise processes (process.py, processes.py).

x_t = alpha(t) x0 + sigma(t) eps (seed 003, "Forward Diffusion Process"); f, g^2 as in
Song et al. 2021, Eq. 5 / 9 / 11 / 12; the posterior q(x_s | x_t, x0) as in Ho et al. 2020,
Eq. 6-7. Statistical checks use Z standard errors (conftest.Z: two-sided p ~ 2e-9 per check) and
fixed seeds; everything runs in float64 on the CPU.
"""

import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, SubVP, make_betas
from torchdiffusion.core.process import NoiseProcess
from torchdiffusion.core.processes import beta_cosine, beta_linear
from torchdiffusion.names import SCHEDULES, build_process

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=F64)


def _interior(process, n: int = 257) -> torch.Tensor:
    """Times strictly inside (t_min, t_max); for a discrete process, off the integers
    (lam, f and g2 are piecewise there, with kinks at the integers)."""
    u = torch.linspace(0, 1, n + 2, dtype=F64)[1:-1]
    t = process.t_min + u * (process.t_max - process.t_min)
    if process.n_steps is not None:
        t = torch.floor(t) + torch.linspace(0.11, 0.89, n, dtype=F64)  # inside segment [i, i + 1]
    return t


def _dense(process, n: int = 4001) -> torch.Tensor:
    return torch.linspace(process.t_min, process.t_max, n, dtype=F64)


# --- lam, snr, t_from_lam ---------------------------------------------------------------------------


def test_lam_strictly_decreasing(process):
    """Half log-SNR lam = log(alpha / sigma) is strictly decreasing on [t_min, t_max] (seed 003)."""
    lam = process.lam(_dense(process))
    assert not torch.isnan(lam).any()
    assert bool((lam[1:] < lam[:-1]).all())


def test_lam_is_log_alpha_over_sigma(process):
    """lam(t) = log alpha(t) - log sigma(t), closed forms against the definition."""
    t = _dense(process, 1001)
    a, s = process.alpha(t), process.sigma(t)
    keep = a > 0  # Flow: alpha(t_max) = 0, lam = -inf
    torch.testing.assert_close(process.lam(t)[keep], (torch.log(a) - torch.log(s))[keep], rtol=1e-10, atol=1e-12)


def test_snr_is_exp_two_lam(process):
    """snr = alpha^2 / sigma^2 = exp(2 lam)."""
    t = _dense(process)
    torch.testing.assert_close(process.snr(t), torch.exp(2 * process.lam(t)), rtol=1e-11, atol=0)


def test_t_from_lam_round_trip(process):
    """t_from_lam is the inverse of lam: t_from_lam(lam(t)) = t on the whole of [t_min, t_max]."""
    t = _dense(process)
    back = process.t_from_lam(process.lam(t))
    scale = process.t_max - process.t_min
    assert float((back - t).abs().max()) <= 1e-12 * scale


def test_t_from_lam_bisection_default_round_trip(process):
    """The base-class bisection t_from_lam inverts lam too (the default for new processes)."""
    t = _dense(process, 201)[:-1]  # lam(t_max) may be -inf (Flow)
    back = NoiseProcess.t_from_lam(process, process.lam(t))
    assert float((back - t).abs().max()) <= 1e-12 * (process.t_max - process.t_min)


# --- f, g2 and derivatives ----------------------------------------------------------------------------


def test_f_closed_form_equals_autograd(process):
    """f(t) = d log alpha / dt (Song et al. 2021, Eq. 5): closed form = autograd default."""
    t = _interior(process)
    torch.testing.assert_close(process.f(t), NoiseProcess.f(process, t), rtol=1e-9, atol=1e-12)


def test_g2_closed_form_equals_autograd(process):
    """g^2 = d sigma^2/dt - 2 f sigma^2 (Song et al. 2021, Eq. 9/11/12): closed form = autograd default."""
    t = _interior(process)
    torch.testing.assert_close(process.g2(t), NoiseProcess.g2(process, t), rtol=1e-9, atol=1e-12)
    assert bool((process.g2(t) > 0).all())


@pytest.mark.parametrize(
    "process, beta",
    [
        (VP(), lambda t: 0.1 + t * 19.9),
        (SubVP(), lambda t: 0.1 + t * 19.9),
    ],
    ids=["VP", "SubVP"],
)
def test_vp_drift_is_minus_half_beta(process, beta):
    """VP and sub-VP SDE drift f = -beta(t)/2 with linear beta (Song et al. 2021, Eq. 11-12)."""
    t = _interior(process)
    torch.testing.assert_close(process.f(t), -0.5 * beta(t), rtol=1e-12, atol=0)


def test_vp_g2_is_beta():
    """VP SDE: g^2 = beta(t) (Song et al. 2021, Eq. 11)."""
    p = VP()
    t = _interior(p)
    torch.testing.assert_close(p.g2(t), 0.1 + t * 19.9, rtol=1e-12, atol=0)


def test_subvp_g2_closed_form():
    """Sub-VP SDE: g^2 = beta(t) (1 - exp(-2 int_0^t beta)) (Song et al. 2021, Eq. 12)."""
    p = SubVP()
    t = _interior(p)
    integral = 0.1 * t + 19.9 * t**2 / 2
    torch.testing.assert_close(p.g2(t), (0.1 + 19.9 * t) * (1 - torch.exp(-2 * integral)), rtol=1e-10, atol=0)


def test_ve_g2_closed_form():
    """VE SDE: g^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min) (Song et al. 2021, Eq. 9)."""
    p = VE()
    t = _interior(p)
    sigma = 0.01 * 5000.0**t
    torch.testing.assert_close(p.g2(t), 2 * sigma**2 * math.log(5000.0), rtol=1e-12, atol=0)


def test_d_alpha_d_sigma_equal_finite_differences(process):
    """alpha'(t) = f alpha and sigma'(t) = (g^2 + 2 f sigma^2) / (2 sigma): central differences."""
    t = _interior(process, 65)
    h = 1e-6 * (process.t_max - process.t_min)
    if process.n_steps is not None:
        h = 1e-5  # stay inside one segment (t is at least 0.11 from an integer)
    fd_alpha = (process.alpha(t + h) - process.alpha(t - h)) / (2 * h)
    fd_sigma = (process.sigma(t + h) - process.sigma(t - h)) / (2 * h)
    # truncation O(h^2) and rounding O(eps / h) are both far below 1e-6 relative
    torch.testing.assert_close(process.d_alpha(t), fd_alpha, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(process.d_sigma(t), fd_sigma, rtol=1e-6, atol=1e-8)


# --- forward marginal -------------------------------------------------------------------------------


def test_perturb_is_alpha_x0_plus_sigma_noise(process):
    """perturb(x0, t, noise) = alpha(t) x0 + sigma(t) noise (seed 003, q(x_t | x0)), per-example t and 4-D x."""
    g = gen(0)
    x0 = torch.randn(6, 1, 2, 2, generator=g, dtype=F64)
    noise = torch.randn(6, 1, 2, 2, generator=g, dtype=F64)
    t = _interior(process, 6)
    a, s = process.alpha(t).view(6, 1, 1, 1), process.sigma(t).view(6, 1, 1, 1)
    torch.testing.assert_close(process.perturb(x0, t, noise), a * x0 + s * noise, rtol=1e-14, atol=1e-14)
    # a scalar time applies to every example
    t0 = t[2]
    torch.testing.assert_close(
        process.perturb(x0, t0, noise), process.alpha(t0) * x0 + process.sigma(t0) * noise, rtol=1e-14, atol=1e-14
    )


def test_perturb_moments(process):
    """x_t ~ N(alpha x0, sigma^2) (seed 003): sample mean and variance over a large batch of noise."""
    n = 40_000
    t = _interior(process, 3)[1]
    a, s = float(process.alpha(t)), float(process.sigma(t))
    x0 = torch.full((n, 1), 1.7, dtype=F64)
    xt = process.perturb(x0, t, torch.randn(n, 1, generator=gen(1), dtype=F64)).flatten()
    assert abs(float(xt.mean()) - a * 1.7) < Z * s / math.sqrt(n)
    assert abs(float(xt.var()) - s**2) < Z * s**2 * math.sqrt(2 / (n - 1))


# --- the posterior q(x_s | x_t, x0) ------------------------------------------------------------------


def _pairs(process):
    """Pairs s < t of interior times, including s far below t."""
    t = _interior(process, 9)
    return [(t[i], t[j]) for i in range(len(t)) for j in range(i + 1, len(t)) if (j - i) in (1, 3, 8)]


def _bayes_conditional(a_s, sig_s, a_t, sig_t, x0, xt):
    """x_s | x_t, x0 by Gaussian conditioning on the joint of (x_s, x_t) given x0.

    x_s = a_s x0 + sig_s e1 and x_t = a_ts x_s + sqrt(v_ts) e2 with a_ts = a_t / a_s and
    v_ts = sig_t^2 - a_ts^2 sig_s^2 (so that x_t | x0 ~ N(a_t x0, sig_t^2)). Joint covariance
    C = [[sig_s^2, a_ts sig_s^2], [a_ts sig_s^2, a_ts^2 sig_s^2 + v_ts]];
    mean_s|t = mu_s + C_st / C_tt (x_t - mu_t), var_s|t = C_ss - C_st^2 / C_tt.
    """
    a_ts = a_t / a_s
    v_ts = sig_t**2 - a_ts**2 * sig_s**2
    mu = torch.stack([a_s * x0, a_t * x0])
    C = torch.tensor([[sig_s**2, a_ts * sig_s**2], [a_ts * sig_s**2, a_ts**2 * sig_s**2 + v_ts]], dtype=F64)
    mean = mu[0] + C[0, 1] / C[1, 1] * (xt - mu[1])
    var = C[0, 0] - C[0, 1] ** 2 / C[1, 1]
    return mean, var


def test_posterior_equals_gaussian_conditioning(process):
    """q(x_s | x_t, x0) (Ho et al. 2020, Eq. 6-7, any s < t) equals Bayes' rule on the 2x2 joint Gaussian."""
    g = gen(2)
    x0 = torch.randn(5, generator=g, dtype=F64) * 2
    xt = torch.randn(5, generator=g, dtype=F64) * 2
    for s, t in _pairs(process):
        a_s, sig_s, a_t, sig_t = (
            float(v) for v in (process.alpha(s), process.sigma(s), process.alpha(t), process.sigma(t))
        )
        mean_ref, var_ref = _bayes_conditional(a_s, sig_s, a_t, sig_t, x0, xt)
        mean, var = process.posterior(x0[:, None], xt[:, None], s, t)
        torch.testing.assert_close(mean.flatten(), mean_ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(var.flatten().expand(5), var_ref.expand(5), rtol=1e-9, atol=1e-14)


def test_transition_var_is_consistent(process):
    """sigma_ts^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 > 0: variance of q(x_t | x_s) for s < t."""
    for s, t in _pairs(process):
        ref = process.sigma(t) ** 2 - (process.alpha(t) / process.alpha(s)) ** 2 * process.sigma(s) ** 2
        torch.testing.assert_close(process.transition_var(s, t), ref, rtol=1e-9, atol=1e-15)
        assert float(process.transition_var(s, t)) > 0


def test_posterior_by_numerical_integration():
    """q(x_s | x_t, x0) proportional to q(x_s | x0) q(x_t | x_s) (Bayes), normalised on a 1-d grid."""
    p = VP()
    s, t = _t(0.3), _t(0.5)
    x0, xt = 1.3, -0.4
    a_s, sig_s = float(p.alpha(s)), float(p.sigma(s))
    a_ts = float(p.alpha(t) / p.alpha(s))
    v_ts = float(p.sigma(t)) ** 2 - a_ts**2 * sig_s**2
    grid = torch.linspace(a_s * x0 - 12 * sig_s, a_s * x0 + 12 * sig_s, 400_001, dtype=F64)
    logd = -0.5 * (grid - a_s * x0) ** 2 / sig_s**2 - 0.5 * (xt - a_ts * grid) ** 2 / v_ts
    w = torch.exp(logd - logd.max())
    z = torch.trapezoid(w, grid)
    mean_num = torch.trapezoid(w * grid, grid) / z
    var_num = torch.trapezoid(w * (grid - mean_num) ** 2, grid) / z
    mean, var = p.posterior(torch.tensor([[x0]], dtype=F64), torch.tensor([[xt]], dtype=F64), s, t)
    assert float(mean) == pytest.approx(float(mean_num), rel=1e-8, abs=1e-10)
    assert float(var) == pytest.approx(float(var_num), rel=1e-7)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("T", [1000, 50])
def test_discrete_posterior_is_ho_eq7(schedule, T):
    """DDPM posterior for s = t - 1 (Ho et al. 2020, Eq. 7), written with betas and alphas_cumprod:
    beta_tilde = (1 - abar_{t-1}) / (1 - abar_t) beta_t,
    mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(1 - beta_t) (1 - abar_{t-1}) / (1 - abar_t) x_t."""
    betas = make_betas(SCHEDULES[schedule], T)
    p = Discrete(betas)
    abar = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(1 - betas, 0)])  # abar_0 = 1
    g = gen(3)
    x0 = torch.randn(T, 1, generator=g, dtype=F64)
    xt = torch.randn(T, 1, generator=g, dtype=F64)
    t = torch.arange(1, T + 1, dtype=F64)
    b = betas
    beta_tilde = (1 - abar[:-1]) / (1 - abar[1:]) * b
    mu_tilde = (abar[:-1].sqrt() * b / (1 - abar[1:]))[:, None] * x0 + (
        (1 - b).sqrt() * (1 - abar[:-1]) / (1 - abar[1:])
    )[:, None] * xt
    mean, var = p.posterior(x0, xt, t - 1, t)
    torch.testing.assert_close(mean, mu_tilde, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(var.flatten(), beta_tilde, rtol=1e-9, atol=1e-15)
    # t = 1: x_0 is known exactly given x0
    assert float(var.flatten()[0]) == 0.0
    torch.testing.assert_close(mean[0], x0[0], rtol=1e-12, atol=1e-12)


# --- the forward SDE --------------------------------------------------------------------------------

# (process, s, t): simulate dx = f x dt + g dW from a fixed x_s at time s to time t.
SDE_CASES = [
    (VP(), 1e-3, 0.5),
    (SubVP(), 1e-3, 0.5),
    (VE(), 0.0, 0.5),
    (Cosine(), 1e-3, 0.6),
    (EDM(), 0.002, 2.0),
    (Flow(), 1e-3, 0.6),
    (Discrete.from_schedule(beta_linear, 50), 1.0, 25.0),
]


@pytest.mark.parametrize(
    "process, s, t", SDE_CASES, ids=lambda v: type(v).__name__ if not isinstance(v, float) else None
)
def test_forward_sde_reproduces_transition(process, s, t):
    """Euler-Maruyama on dx = f x dt + g dW (Song et al. 2021, Eq. 5) from x_s reproduces
    q(x_t | x_s) = N(alpha_t/alpha_s x_s, sigma_ts^2) (seed 003, "Diffusion as SDEs").

    2000 steps: Euler-Maruyama's O(dt) bias in mean and variance, worked out from the exact
    linear recursion, is below 0.25 standard errors of the n = 20000-path estimates."""
    n, steps, xs = 20_000, 2000, 2.0
    g = gen(4)
    ts = torch.linspace(s, t, steps + 1, dtype=F64)
    dt = (t - s) / steps
    f, gg = process.f(ts[:-1]), process.g2(ts[:-1]).sqrt()
    x = torch.full((n,), xs, dtype=F64)
    for k in range(steps):
        x = x + f[k] * x * dt + gg[k] * math.sqrt(dt) * torch.randn(n, generator=g, dtype=F64)
    mean = float(process.alpha(_t(t)) / process.alpha(_t(s))) * xs
    var = float(process.transition_var(_t(s), _t(t)))
    # the library's transition law is its marginal law: sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2
    assert var == pytest.approx(
        float(
            process.sigma(_t(t)) ** 2 - (process.alpha(_t(t)) / process.alpha(_t(s))) ** 2 * process.sigma(_t(s)) ** 2
        ),
        rel=1e-10,
    )
    assert abs(float(x.mean()) - mean) < Z * math.sqrt(var / n)
    assert abs(float(x.var()) - var) < Z * var * math.sqrt(2 / (n - 1))


# --- discrete time ------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("T", [1000, 50])
def test_alphas_cumprod_is_cumprod_one_minus_beta(schedule, T):
    """abar_t = prod_{i<=t} (1 - beta_i) (Ho et al. 2020, Sec. 2), and alpha(t)^2 = abar_t on integer t."""
    p = Discrete.from_schedule(SCHEDULES[schedule], T)
    ref = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(1 - p.betas, 0)])
    assert p.alphas_cumprod.shape == (T + 1,)
    # Two roundings of one product of t factors: the cumprod rounds each 1 - beta_i and each product (2 t u);
    # the library's cumsum of t logs errs by at most u (t + 2) |log abar_t| (u per partial sum, each partial
    # sum at most |log abar_t|, log1p's ulp), and exp adds 2 u: about 1e-12 relative at t = T = 1000.
    u, t = torch.finfo(F64).eps / 2, torch.arange(0, T + 1, dtype=F64)
    rel = u * (t + 2) * (2 + ref.log().abs())
    assert ((p.alphas_cumprod - ref).abs() <= rel * ref).all()
    assert ((p.alpha(t) ** 2 - ref).abs() <= (rel + 3 * u) * ref).all()
    # 1 - abar_t carries abar's absolute error (abar_t / (1 - abar_t) ~ 1 / beta_1 = 2.4e4 times its relative
    # error at t = 1, cosine T = 1000), plus a few roundings of its own in expm1, sqrt and the square.
    assert ((p.sigma(t) ** 2 - (1 - ref)).abs() <= rel * ref + 4 * u * (1 - ref)).all()
    assert (p.n_steps, p.t_min, p.t_max) == (T, 1.0, float(T))


def test_linear_betas_are_ho_values():
    """Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02 for T = 1000."""
    torch.testing.assert_close(make_betas(beta_linear, 1000), torch.linspace(1e-4, 0.02, 1000, dtype=F64))


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_betas_match_nichol_eq17(T):
    """Nichol & Dhariwal 2021, Eq. 17: abar_t = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008,
    wherever beta_t is below the 0.999 clip."""
    p = Discrete.from_schedule(beta_cosine, T)
    s = 0.008
    t = torch.arange(0, T + 1, dtype=F64)
    fcos = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    unclipped = torch.cat([torch.ones(1, dtype=torch.bool), torch.cumprod(p.betas < 0.999, 0).bool()])
    assert int(unclipped.sum()) >= T  # only the last step may be clipped
    torch.testing.assert_close(p.alphas_cumprod[unclipped], (fcos / fcos[0])[unclipped], rtol=1e-9, atol=1e-15)


def test_make_betas_unknown_name_lists_choices():
    """A schedule name becomes a function at the edge (``names``), where an unknown one lists the choices; inside the
    library a name is not a schedule, and ``make_betas`` says so."""
    with pytest.raises(ValueError) as err:
        build_process({"name": "ddpm", "schedule": "exponential", "T": 100})
    for name in SCHEDULES:
        assert name in str(err.value)
    with pytest.raises(TypeError, match="schedule must be a function"):
        make_betas("exponential", 100)


def test_make_betas_and_discrete_reject_bad_input():
    with pytest.raises(ValueError):
        make_betas(beta_linear, 1)
    with pytest.raises(ValueError):
        Discrete(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError):
        Discrete(torch.tensor([0.1]))


# --- the prior ----------------------------------------------------------------------------------------


def test_prior_sample_std_is_sigma_t_max(process):
    """x_T ~ N(0, sigma(t_max)^2 I): exactly sigma(t_max) times the generator's standard normals."""
    x = process.prior_sample((4000, 2), generator=gen(5), dtype=F64)
    z = torch.randn(4000, 2, generator=gen(5), dtype=F64)
    s = float(process.sigma(_t(process.t_max)))
    assert process.prior_std == pytest.approx(s, rel=1e-15)
    torch.testing.assert_close(x, s * z, rtol=1e-15, atol=0)
    n = x.numel()
    assert abs(float(x.pow(2).mean()) - s**2) < Z * s**2 * math.sqrt(2 / n)


def test_prior_logp_is_gaussian_log_density(process):
    """prior_logp(x) = sum_i log N(x_i; 0, sigma(t_max)^2), summed over all but the batch dim."""
    x = torch.randn(7, 1, 2, 2, generator=gen(6), dtype=F64) * 3
    s = float(process.sigma(_t(process.t_max)))
    ref = torch.distributions.Normal(_t(0.0), _t(s)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(process.prior_logp(x), ref, rtol=1e-12, atol=1e-12)
