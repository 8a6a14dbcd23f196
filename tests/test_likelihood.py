"""Likelihoods against closed forms: exact mixture densities, Gaussian-data bounds, 8-bit cell masses.

Every test names the paper and equation it checks. Float64 on the CPU, fixed seeds.
"""

import math

import pytest
import torch

from conftest import gen
from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, GaussianMixture
from torchdiffusion.core.processes import beta_linear
from torchdiffusion.likelihood.bounds import LAM_FLOOR, elbo, vlb_terms
from torchdiffusion.likelihood.dequantize import bits_per_dim, dequantize, discretized_gaussian_logp, nll_8bit
from torchdiffusion.likelihood.ode import log_likelihood

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _mixture(D):
    """Three components, unequal weights, anisotropic variances, means of size ~0.7."""
    g = gen(D)
    means = 0.7 * torch.randn(3, D, generator=g, dtype=F64)
    return GaussianMixture([0.5, 0.3, 0.2], means, 0.05 + 0.15 * torch.rand(3, D, generator=g, dtype=F64))


def _prior_mismatch_bound(gm, process, x):
    """Bound on |log p_T(x) - log N(x; 0, s^2 I)| with a = alpha(T), s = sigma(T).

    log p_T - log N(0, s^2) = log sum_k w_k exp(l_k), so it lies in [min_k l_k, max_k l_k], where per dim
    l_k = -log(1 + a^2 v/s^2)/2 + x^2 a^2 v / (2 s^2 (s^2 + a^2 v)) + (2 a m x - a^2 m^2) / (2 (s^2 + a^2 v)).
    Hence |l_k| <= sum_d [log(1 + a^2 v/s^2)/2 + x^2 a^2 v / (2 s^4) + (2 a |m x| + a^2 m^2) / (2 s^2)]:
    O(a |m| |x| / s^2), zero when alpha(T) = 0 (Flow).
    """
    a, s = (float(c) for c in process.alpha_sigma(torch.tensor(process.t_max, dtype=F64)))
    m, v, x = gm.means[None], gm.variances[None], x.reshape(len(x), 1, -1)
    terms = (
        torch.log1p(a**2 * v / s**2) / 2
        + x**2 * a**2 * v / (2 * s**4)
        + (2 * a * (m * x).abs() + a**2 * m**2) / (2 * s**2)
    )
    return terms.sum(-1).max(1).values


# -- the exact likelihood: instantaneous change of variables -----------------------------------------


@pytest.mark.parametrize("D", [2, 4])
@pytest.mark.parametrize("process", [VP(), EDM(), Flow()], ids=["VP", "EDM", "Flow"])
def test_ode_likelihood_matches_mixture_density(process, D):
    """Chen et al. 2018 Thm 1; Song et al. 2021 Eq. 39: with the exact denoiser and exact trace, the ODE
    gives log p_{t_start}(x) exactly but for the prior mismatch at T, which is computed and bounded."""
    gm = _mixture(D)
    x = gm.sample(24, generator=gen(1))
    ll, info = log_likelihood(gm.denoiser(process), process, x, return_info=True)
    truth = gm.log_prob(x, process, process.t_min)
    mismatch = gm.log_prob(info["x_T"], process, process.t_max) - info["prior"]
    bound = _prior_mismatch_bound(gm, process, info["x_T"])
    assert (mismatch.abs() <= bound + 1e-12).all()
    # Within 1e-2 nats once the prior mismatch is counted; what is left is solver error (rtol = atol = 1e-5).
    assert float((ll + mismatch - truth).abs().max()) < 2e-3
    assert ((ll - truth).abs() <= 2e-3 + bound).all()  # and uncorrected, within the derived bound (0 on Flow)
    # p_0 itself: off by the t_start effect log p_{t_min}(x) - log p_0(x) as well, computed in closed form.
    effect = truth - gm.log_prob(x)
    assert ((ll - gm.log_prob(x)).abs() <= 2e-3 + bound + effect.abs()).all()


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(probe):
    """Song et al. 2021, Appendix D.2 (Hutchinson 1989): E_e[e^T J e] = tr J, so with probes fixed along the
    ODE the estimate averages to the exact-trace log-likelihood; n_probes = 4 divides its variance by 4."""
    gm, process, R = _mixture(4), VP(), 200
    x = gm.sample(3, generator=gen(2))
    exact = log_likelihood(gm.denoiser(process), process, x, exact_trace=True)
    xr = x.repeat_interleave(R, 0)
    est = log_likelihood(gm.denoiser(process), process, xr, exact_trace=False, probe=probe, generator=gen(3))
    est = est.view(3, R)
    se = est.std(1) / math.sqrt(R)
    assert (se > 1e-3).all() and ((est.mean(1) - exact).abs() < 3 * se).all()
    est4 = log_likelihood(
        gm.denoiser(process), process, xr, exact_trace=False, n_probes=4, probe=probe, generator=gen(4)
    )
    ratio = est4.view(3, R).var(1) / est.var(1)
    assert ((ratio > 0.15) & (ratio < 0.5)).all()


def test_log_likelihood_batches_and_generator():
    """Probes are drawn once per call from the generator: batching changes only the adaptive steps."""
    gm, process = _mixture(4), VP()
    x = gm.sample(12, generator=gen(5))
    kw = dict(exact_trace=False, n_probes=2)
    one = log_likelihood(gm.denoiser(process), process, x, generator=gen(6), **kw)
    again = log_likelihood(gm.denoiser(process), process, x, generator=gen(6), **kw)
    split = log_likelihood(gm.denoiser(process), process, x, generator=gen(6), batch_size=5, **kw)
    assert torch.equal(one, again) and float((one - split).abs().max()) < 1e-3


# -- the discrete-time bound (DDPM) ------------------------------------------------------------------


def _gauss_mse(x0, m, v, snr):
    """E_eps ||x0 - E[x0 | x_t]||^2 for data N(m, v I): (1 - r)^2 ||x0 - m||^2 + D k^2 sigma^2, u = v snr,
    1 - r = 1 / (1 + u), k^2 sigma^2 = v^2 snr / (1 + u)^2 (the Gaussian posterior mean is linear in x_t)."""
    u = v * snr
    return ((x0 - m) ** 2).sum(-1) / (1 + u) ** 2 + x0.shape[-1] * v**2 * snr / (1 + u) ** 2


def test_vlb_terms_match_closed_form_for_gaussian_data():
    """Ho et al. 2020 Eq. 5-8: L_T = KL to the prior; L_{t-1} = c_0^2 E||x0 - x0_hat||^2 / (2 beta-tilde_t)
    (the means differ by c_0 (x0 - x0_hat), c_0 = sqrt(abar_{t-1}) beta_t / (1 - abar_t)); L_0 = -log N(x0;
    x0_hat(x_1), beta_1). For Gaussian data each expectation over the noise is closed form (``_gauss_mse``)."""
    process, m, v, R = Discrete.from_schedule(beta_linear, 50), torch.tensor([0.5, -0.3], dtype=F64), 0.2, 600
    gm = GaussianMixture([1.0], m[None], v)
    x0 = gm.sample(3, generator=gen(7))
    b = process.betas
    ab = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(1 - b, 0)])
    t = torch.arange(2, 51)
    tilde = (1 - ab[t - 1]) / (1 - ab[t]) * b[t - 1]
    c0 = ab[t - 1].sqrt() * b[t - 1] / (1 - ab[t])
    snr = ab / (1 - ab)
    diffusion = (c0**2 / (2 * tilde) * _gauss_mse(x0[:, None], m, v, snr[t])).sum(1)
    decoder = _gauss_mse(x0, m, v, snr[1]) / (2 * b[0]) + 2 / 2 * math.log(2 * math.pi * b[0])  # D = 2
    prior = ab[-1] * (x0**2).sum(1) / (2 * (1 - ab[-1]))
    xr = x0.repeat_interleave(R, 0)
    for n_t, importance in [(None, True), (4, True), (4, False)]:
        terms = vlb_terms(gm.denoiser(process), process, xr, n_t=n_t, importance=importance, generator=gen(8))
        torch.testing.assert_close(terms["prior"].view(3, R)[:, 0], prior, rtol=1e-10, atol=1e-14)
        for key, cf in [("diffusion", diffusion), ("decoder", decoder)]:
            est = terms[key].view(3, R)
            assert ((est.mean(1) - cf).abs() < 4 * est.std(1) / math.sqrt(R)).all(), (key, n_t, importance)
        if n_t is not None:  # the reported stderr is that of the t and noise draws
            spread = terms["total"].view(3, R).var(1)
            ratio = (terms["stderr"].view(3, R) ** 2).mean(1) / spread
            assert ((ratio > 0.7) & (ratio < 1.3)).all()


def _nested_family(n):
    """VP's alpha(t)^2 at n + 1 equally spaced times of [t_min, 1] as a DDPM: T = n + 1 latents with the same
    end points for every n, so the grids for n = 10, 50, 250, 1000 are nested."""
    vp = VP()
    log_ab = 2 * vp.log_alpha(vp.t_min + torch.linspace(0, 1, n + 1, dtype=F64) * (vp.t_max - vp.t_min))
    return Discrete(-torch.expm1(torch.diff(log_ab, prepend=torch.zeros(1, dtype=F64))))


def test_vlb_bounds_mixture_density_and_tightens_with_T():
    """Ho et al. 2020 Eq. 3/5 (-ELBO >= -log p) and Kingma et al. 2021 Sec. 4 / Appendix: inserting steps
    between fixed end points cannot loosen the bound when E||x0 - x0_hat||^2 falls with SNR (the MMSE does)."""
    gm = _mixture(2)
    x0 = gm.sample(500, generator=gen(9))
    logp = gm.log_prob(x0)
    gaps, ses = [], []
    for n in (10, 50, 250, 1000):
        process = _nested_family(n)
        gap = vlb_terms(gm.denoiser(process), process, x0, generator=gen(n))["total"] + logp
        gaps.append(float(gap.mean()))
        ses.append(float(gap.std()) / math.sqrt(len(gap)))
        assert gaps[-1] > -3 * ses[-1]  # -total never exceeds the mean log-density beyond MC error
    for i in range(3):
        assert gaps[i] - gaps[i + 1] > 3 * math.hypot(ses[i], ses[i + 1]), gaps


def test_discretized_decoder_is_a_probability():
    """Ho et al. 2020 Eq. 13: the bins tile the real line (edge bins open), so the 256 masses sum to 1."""
    g = gen(10)
    mean, std = 1.5 * torch.rand(1, 5, generator=g, dtype=F64) - 0.75, 0.002 + 0.05 * torch.rand(1, 5, generator=g)
    bins = -1 + 2 * torch.arange(256, dtype=F64)[:, None] / 255  # every pixel value
    logp = torch.stack([discretized_gaussian_logp(bins, mean[:, j].expand(256, 1), std[0, j]) for j in range(5)])
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(5, dtype=F64), rtol=1e-10, atol=1e-10)
    process, x0 = Discrete.from_schedule(beta_linear, 50), bins[torch.randint(0, 256, (8, 3), generator=g), 0]
    terms = vlb_terms(_mixture(3).denoiser(process), process, x0, decoder="discretized", generator=g)
    assert (terms["decoder"] >= 0).all() and (terms["total"] >= terms["decoder"]).all()


# -- the continuous-time bound ----------------------------------------------------------------------


def _gauss_neg_elbo(process, r2, q2, v, D):
    """The three terms of -ELBO (Kingma et al. 2021 Eq. 17) for data N(m, v I), exact, as functions of
    r2 = ||x0 - m||^2 and q2 = ||x0||^2. With u = v snr = v e^{2 lam}, du = 2 u dlam and ``_gauss_mse``,
    int snr E||x0 - x0_hat||^2 dlam = [D/2 (log(1 + u) + 1/(1 + u)) - r2 / (2 v (1 + u))] from u_lo to u_hi;
    the prior KL is a^2 q2 / (2 s^2) and the reconstruction D/2 (1 + log 2 pi) - D lam(t_min)."""
    t1, lam_hi = process.t_max, float(process.lam(torch.tensor(process.t_min, dtype=F64)))
    lam_lo = float(process.lam(torch.tensor(t1, dtype=F64)))
    if not math.isfinite(lam_lo):
        t1, lam_lo = float(process.t_from_lam(torch.tensor(LAM_FLOOR, dtype=F64))), LAM_FLOOR
    a, s = (float(c) for c in process.alpha_sigma(torch.tensor(t1, dtype=F64)))

    def antiderivative(lam):
        u = v * math.exp(2 * lam)
        return D / 2 * (math.log1p(u) + 1 / (1 + u)) - r2 / (2 * v * (1 + u))

    terms = {
        "prior": a**2 * q2 / (2 * s**2),
        "diffusion": antiderivative(lam_hi) - antiderivative(lam_lo),
        "reconstruction": D / 2 * (1 + math.log(2 * math.pi)) - D * lam_hi,
    }
    return terms, (a, s, lam_lo, lam_hi)


CONTINUOUS = [VP(), VE(), EDM(), Flow(), Cosine()]


@pytest.mark.parametrize("process", CONTINUOUS, ids=lambda p: type(p).__name__)
def test_elbo_matches_closed_form_for_gaussian_data(process):
    """Kingma et al. 2021 Eq. 17-18: the Monte-Carlo ELBO (uniform in lam, or uniform in t) averages to the
    exact ELBO of Gaussian data N(m, v I) (closed form, checked against quadrature); averaged over the data its
    gap to log p_0 is exactly the prior mismatch KL(p_T || N(0, s_T^2 I)) plus the reconstruction mismatch
    E KL(q(x0 | x_tmin) || decoder) = D/2 log(1 + (sigma/alpha)^2 / v) at t_min (the reverse path with the
    exact score is exact)."""
    m, v, D, R = torch.tensor([0.5, -0.3], dtype=F64), 0.2, 2, 1500
    gm = GaussianMixture([1.0], m[None], v)
    x0 = gm.sample(3, generator=gen(11))
    exact, (a, s, lam_lo, lam_hi) = _gauss_neg_elbo(process, ((x0 - m) ** 2).sum(1), (x0**2).sum(1), v, D)
    lam = torch.linspace(lam_lo, lam_hi, 200_001, dtype=F64)
    quad = torch.trapezoid(torch.exp(2 * lam) * _gauss_mse(x0[:, None], m, v, torch.exp(2 * lam)), lam)
    torch.testing.assert_close(exact["diffusion"], quad, rtol=1e-7, atol=0)
    neg = sum(exact.values())
    for importance in (True, False) if type(process) in (VP, VE) else (True,):
        den, xr = gm.denoiser(process), x0.repeat_interleave(R, 0)
        est, se, terms = elbo(den, process, xr, n_t=2, importance=importance, generator=gen(12), return_terms=True)
        for key in ("prior", "reconstruction"):
            torch.testing.assert_close(terms[key].view(3, R)[:, 0], torch.as_tensor(exact[key], dtype=F64).expand(3))
        est = est.view(3, R)
        assert ((est.mean(1) + neg).abs() < 4 * est.std(1) / math.sqrt(R)).all(), importance
        assert torch.isfinite(se).all()
    # The gap identity: average over x0 ~ N(m, v I), E r2 = D v and E q2 = D v + ||m||^2.
    mean_neg = sum(_gauss_neg_elbo(process, D * v, D * v + float((m**2).sum()), v, D)[0].values())
    cov_T = a**2 * v + s**2
    kl_T = D / 2 * (cov_T / s**2 - 1 - math.log(cov_T / s**2)) + a**2 * float((m**2).sum()) / (2 * s**2)
    gap = kl_T + D / 2 * math.log1p(math.exp(-2 * lam_hi) / v)
    entropy = D / 2 * math.log(2 * math.pi * math.e * v)
    assert abs(mean_neg - entropy - gap) < 1e-9 and 0 <= gap < 0.01


def test_elbo_bounds_mixture_density():
    """Kingma et al. 2021 Eq. 17 is a lower bound: averaged over mixture samples, ELBO <= log p_0 + MC error,
    and with the exact denoiser the gap is small (prior and reconstruction mismatch only)."""
    gm, process = _mixture(2), VP()
    x0 = gm.sample(2000, generator=gen(13))
    est, _ = elbo(gm.denoiser(process), process, x0, n_t=4, generator=gen(14))
    gap = gm.log_prob(x0) - est
    se = float(gap.std()) / math.sqrt(len(gap))
    assert -3 * se < float(gap.mean()) < 0.05 + 3 * se


# -- 8-bit data: dequantization and bits per dimension ----------------------------------------------


def test_bits_per_dim_of_8bit_data_is_nonnegative():
    """Theis et al. 2016; Ho et al. 2019 Eq. 11-12: -E_u[log p_z(z)] + D log 128 >= -log P(x) >= 0, with P(x)
    the exact mass of the cell (products of normal CDF differences), though the density exceeds 1 and the
    naive bpd at the data is negative; the exact truncated-normal q(u | x) makes the bound tight."""
    D, s = 3, 0.5 / 256  # a sharp mixture in z: std half the cell's half-width 1/256
    pix = torch.tensor([[12, 200, 77], [140, 3, 255]], dtype=F64)
    centre = (pix + 0.5) / 128 - 1
    gm = GaussianMixture([0.7, 0.3], centre, s**2)
    x = pix.repeat_interleave(2, 0)  # (4, 3)
    lo, hi = x / 128 - 1, (x + 1) / 128 - 1
    cdf = torch.special.ndtr((hi[:, None] - centre) / s) - torch.special.ndtr((lo[:, None] - centre) / s)
    neg_log_mass = -torch.log((gm.weights * cdf.prod(-1)).sum(1))
    assert (neg_log_mass >= 0).all()
    naive = bits_per_dim(-gm.log_prob(centre), D)
    assert (naive < 0).all()  # density > 1 at the data: a negative "bpd" without dequantization
    nll, se = nll_8bit(gm.log_prob, x, n_samples=3000, generator=gen(15), dtype=F64)
    # The uniform bound in closed form: z is uniform on a cell of half-width h = 1/256 around the centre,
    # so E(z - mu)^2 = h^2 / 3 per dim (the other component's density is e^-10^5 smaller).
    k = torch.tensor([0, 0, 1, 1])
    closed = (
        -torch.log(gm.weights[k]) + D / 2 * math.log(2 * math.pi * s**2) + D / (6 * 256**2 * s**2) + D * math.log(128)
    )
    assert ((nll - closed).abs() < 4 * se).all()
    assert (nll > neg_log_mass).all() and (bits_per_dim(nll, D) >= 0).all()

    def truncated(xq, generator):  # q(u | x) proportional to component k on the cell, by the inverse CDF
        a, b = torch.special.ndtr((lo - centre[k]) / s), torch.special.ndtr((hi - centre[k]) / s)
        z = centre[k] + s * torch.special.ndtri(a + (b - a) * torch.rand(xq.shape, generator=generator, dtype=F64))
        log_n = -0.5 * (((z - centre[k]) / s) ** 2 + math.log(2 * math.pi * s**2)).sum(1)
        return (z + 1) * 128 - xq, log_n - torch.log(b - a).sum(1) - D * math.log(128)  # dz/du = 1/128

    tight, _ = nll_8bit(gm.log_prob, x, n_samples=8, generator=gen(16), variational=truncated, dtype=F64)
    torch.testing.assert_close(tight, neg_log_mass, rtol=0, atol=1e-6)


def test_bits_per_dim_change_of_variables():
    """Change of variables: y ~ N(mu, s^2 I) seen as z = 2 y - 1 has -log p_y(y) = -log p_z(z) - D log 2."""
    y = torch.tensor([[0.3, 0.6, 0.1]], dtype=F64)
    p_y = GaussianMixture([1.0], [[0.4, 0.5, 0.2]], 0.01)
    p_z = GaussianMixture([1.0], [[-0.2, 0.0, -0.6]], 0.04)
    torch.testing.assert_close(
        bits_per_dim(-p_z.log_prob(2 * y - 1), 3, scale=2.0), -p_y.log_prob(y) / (3 * math.log(2))
    )
    z, corr = dequantize(torch.tensor([[0, 255]]), gen(17), dtype=F64)
    assert ((z >= -1) & (z < 1)).all() and torch.allclose(corr, torch.tensor([-2 * math.log(128)], dtype=F64))


def test_conditioning_follows_examples_and_bad_arguments():
    """Per-example cond tensors are split with their examples (batches, chunks of (example, t) rows): with
    a class-conditional exact denoiser the ODE gives log p_{t_min}(x | y) of each example's own class."""
    process = VP()
    classes = [GaussianMixture([1.0], [[1.0, -0.5]], 0.1), GaussianMixture([1.0], [[-0.8, 0.6]], 0.2)]
    y = torch.tensor([0, 1, 1, 0, 1])
    x = torch.stack([classes[int(c)].sample(1, generator=gen(20 + i))[0] for i, c in enumerate(y)])

    def conditional(proc):
        def denoiser(xt, t, label):
            assert label.shape == xt.shape[:1]  # split along with the examples
            outs = [classes[c].x0_mean(xt, proc, t) for c in (0, 1)]
            return torch.where(label[:, None] == 0, outs[0], outs[1])

        return denoiser

    denoiser = conditional(process)
    ll, info = log_likelihood(denoiser, process, x, batch_size=2, return_info=True, label=y)
    for i, c in enumerate(y.tolist()):
        gm = classes[c]
        mismatch = gm.log_prob(info["x_T"][i : i + 1], process, 1.0) - info["prior"][i]
        truth = gm.log_prob(x[i : i + 1], process, process.t_min)
        assert abs(float(ll[i] + mismatch - truth)) < 2e-3
    discrete = Discrete.from_schedule(beta_linear, 20)
    terms = vlb_terms(conditional(discrete), discrete, x, chunk=7, generator=gen(0), label=y)
    assert torch.isfinite(terms["total"]).all()
    with pytest.raises(ValueError, match="discrete-time"):
        vlb_terms(denoiser, process, x, label=y)
    with pytest.raises(ValueError, match="continuous-time"):
        elbo(denoiser, discrete, x, label=y)
    with pytest.raises(ValueError, match="probe"):
        log_likelihood(denoiser, process, x, exact_trace=False, probe="normal", label=y)
