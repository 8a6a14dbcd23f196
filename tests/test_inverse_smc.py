"""The twisted diffusion sampler (``inverse.sample_smc``, issue #12 item 3) against exact posteriors of mixtures.

Method. R independent replicates of the whole sampler run in one call (x holds R P starts, ``particles=P``, one y
shared). From its P weighted particles each replicate estimates posterior expectations by self-normalized importance
sampling: the component weights as the mean responsibility under the exact posterior (E_post[p(k | x0)] = w'_k,
unbiased whatever the shape of the components), the mean, and the second moments about the pooled mean (the
covariance). Resampling makes the particles of a replicate share ancestors, so the P particles are worth far fewer
independent draws; the replicates are independent, so the spread of their estimates is the honest standard error,
se = std_r / sqrt(R), whatever that correlation. Each estimate must lie within Z se of the exact value
(``GaussianMixture.posterior``). With R = 30 the standardized error has Student's t law with 29 degrees of freedom,
whose two-sided tail at 6 is 1.5e-6 per check.

What else could move an estimate. (1) The self-normalized estimator's bias, of order 1/P against a standard error
of order 1/sqrt(R P): on the ring the dominant weight is low by about 0.8 / P (measured at P = 32 and 128), half a
standard error at P = 100, R = 30. At sigma_y = 0 resampling is frequent, the particles' genealogy collapses and the
second moments of a replicate are low by several percent at P = 100: the 64-D noise-free covariance test (slow) uses
P = 400. (2) The model's time discretization: the target is the posterior of the DDPM chain on the grid, whose
variances on a Gaussian are low by about 0.9 h relative (h the lam step: 2.3% at 400 steps of grid_lam, 4.6% at
200), at most one or two standard errors of a variance here (a few percent at R P = 3000), inside the Z band; it
shrinks in proportion to h. Components whose posterior weight is below 1e-3 are left out of the weight checks:
their standard errors (1e-6 and below) resolve the discretization's shift of the mixture's far tails. The evidence
estimate (exp of logsumexp(log_weights) - log P, unbiased for the model's p(y)) is checked on the 2-D and 8-D
cases; in 64-D the same variance bias, over 32 measured coordinates, moves the model's p(y) by far more than its
standard error.

Failure. With P = 1 the sampler is plain twisted-proposal guidance (no weights act): on the ring its component
weights and mean are off by tens of standard errors, and the error shrinks by more than its standard errors at P = 100.
"""

import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import VP, Flow, GaussianMixture, grid_lam, sample_ddim
from torchdiffusion.core.measurements import Dense, Mask, Measurement
from torchdiffusion.inverse import sample_smc
from torchdiffusion.inverse.smc import _ancestral, _resample
from torchdiffusion.samplers import _common
from torchdiffusion.samplers.ddim import ddim_step

F64 = torch.float64
MIN_WEIGHT = 1e-3  # posterior weights checked (see the module docstring)


def ring():
    """8 Gaussians (std 0.2) on a circle of radius 2, turned by 0.3 rad so no two share the observed x-coordinate,
    with unequal weights; y = x-coordinate 1.0 observed with sigma_y = 0.05: two components share the posterior."""
    ang = 2 * math.pi * torch.arange(8, dtype=F64) / 8 + 0.3
    prior = GaussianMixture(torch.linspace(1, 2, 8, dtype=F64), 2 * torch.stack([ang.cos(), ang.sin()], 1), 0.04)
    return prior, Measurement(Mask(torch.tensor([1.0, 0.0], dtype=F64)), torch.tensor([1.0, 0.0], dtype=F64), 0.05)


def dense_8d():
    """6 random Gaussians in 8-D (diagonal variances 0.1..0.5), a random 2-row A, y = A (m_0 + m_1) / 2 + noise
    (sigma_y = 0.1): between two components, so several share the posterior."""
    g = gen(0)
    K, D = 6, 8
    prior = GaussianMixture(
        torch.rand(K, generator=g, dtype=F64) + 0.5,
        1.5 * torch.randn(K, D, generator=g, dtype=F64),
        0.1 + 0.4 * torch.rand(K, D, generator=g, dtype=F64),
    )
    A = Dense(torch.randn(2, D, generator=g, dtype=F64) / math.sqrt(D))
    return prior, Measurement.observe(A, (prior.means[:1] + prior.means[1:2]) / 2, 0.1, generator=g)


def masked_64d(sigma_y):
    """4 Gaussians on 8x8 images; the left half is observed. Components 0 and 1 (and 2 and 3) agree on the observed
    half and differ on the hidden one, so the posterior splits between a pair by their prior weights."""
    g = gen(1)
    K, D = 4, 64
    mask = torch.zeros(1, 8, 8, dtype=F64)
    mask[..., :4] = 1
    seen = mask.flatten().bool()
    means = torch.randn(K, D, generator=g, dtype=F64)
    var = 0.1 + 0.4 * torch.rand(K, D, generator=g, dtype=F64)
    for a, b in ((0, 1), (2, 3)):
        means[b, seen], var[b, seen] = means[a, seen], var[a, seen]
    prior = GaussianMixture(torch.tensor([1.0, 2.0, 1.5, 1.0], dtype=F64), means, var, (1, 8, 8))
    return prior, Measurement.observe(Mask(mask), prior.sample(1, generator=g), sigma_y, generator=g)


def replicates(prior, meas, P, R, steps, seed=0, **kw):
    """R independent runs of P particles: per run the self-normalized estimates of the posterior weights (R, K),
    mean (R, D) and second moments about the pooled mean (R, D, D), and Z_hat / p(y) (R,)."""
    p = VP()
    x = p.prior_sample((R * P, *prior.shape), generator=gen(seed), dtype=F64)
    parts, lw = sample_smc(
        prior.denoiser(p),
        p,
        x,
        grid_lam(p, steps),
        meas,
        particles=P,
        return_particles=True,
        generator=gen(seed + 1),
        **kw,
    )
    assert parts.shape == (R, P, *prior.shape) and lw.shape == (R, P)
    post = prior.posterior(meas)
    w = torch.softmax(lw, 1)
    weights = (w[..., None] * post.responsibilities(parts.reshape(R * P, *prior.shape)).reshape(R, P, -1)).sum(1)
    flat = parts.reshape(R, P, -1)
    mean = (w[..., None] * flat).sum(1)
    d = flat - mean.mean(0)
    second = torch.einsum("rp,rpi,rpj->rij", w, d, d)
    ratio = torch.exp(torch.logsumexp(lw, 1) - math.log(P) - prior.log_evidence(meas))
    return post, weights, mean, second, ratio


def within(est, exact, what, keep=None):
    """Every entry of the replicate mean within Z standard errors of the exact value."""
    R = est.shape[0]
    err, se = est.mean(0) - exact, est.std(0) / math.sqrt(R)
    keep = torch.ones_like(err, dtype=torch.bool) if keep is None else keep
    bad = (err.abs() > Z * se) & keep
    assert not bad.any(), f"{what}: errors {err[bad].tolist()} against se {se[bad].tolist()}"


def check_posterior(prior, meas, P, R, steps, evidence=True, free=None, **kw):
    post, weights, mean, second, ratio = replicates(prior, meas, P, R, steps, **kw)
    within(weights, post.weights, "weights", keep=post.weights >= MIN_WEIGHT)
    within(mean, post.mean(), "mean", keep=free)
    cov_keep = None if free is None else free[:, None] & free[None, :]
    within(second, post.covariance(), "covariance", keep=cov_keep)
    if evidence:
        within(ratio, torch.tensor(1.0, dtype=F64), "Z_hat / p(y)")
    return post, mean


def test_ring_inpainting_matches_the_exact_posterior():
    prior, meas = ring()
    check_posterior(prior, meas, P=100, R=30, steps=400)


def test_random_2_row_measurement_of_an_8d_mixture_matches_the_exact_posterior():
    prior, meas = dense_8d()
    check_posterior(prior, meas, P=100, R=30, steps=400)


def test_another_proposal_keeps_the_target():
    """With MMPS's step as the proposal (``proposal="mmps"``) the weights carry p(x'|x) / q(x'|x) for that proposal:
    the target, and so the weights, means, covariances and evidence, are unchanged."""
    prior, meas = ring()
    check_posterior(prior, meas, P=100, R=30, steps=400, proposal="mmps")


def test_masked_64d_mixture_matches_the_exact_posterior():
    prior, meas = masked_64d(0.05)
    check_posterior(prior, meas, P=100, R=30, steps=200, evidence=False)


@pytest.mark.slow
def test_noise_free_masked_64d_mixture_matches_the_exact_posterior():
    """sigma_y = 0: the posterior lives on {A x0 = y}; the hidden half's weights, mean and covariance match the
    exact posterior's (P = 400: see the module docstring); that the observed half equals y is checked in
    ``test_noise_free_measurements_are_met_exactly``."""
    prior, meas = masked_64d(0.0)
    free = ~meas.operator.mask.flatten().bool()
    check_posterior(prior, meas, P=400, R=30, steps=200, evidence=False, free=free)


def test_one_particle_is_guidance_and_fails_where_many_succeed():
    """P = 1: no weight acts, each run's one particle is the twisted proposal's guided sample. On the ring its mean
    responsibility of the dominant posterior component and its mean are off by more than Z standard errors (from
    3000 independent runs), and the error at P = 100 (30 replicates, the same 3000 particles) is smaller by more than
    Z standard errors of the difference."""
    prior, meas = ring()
    post = prior.posterior(meas)
    k = int(post.weights.argmax())
    one = replicates(prior, meas, P=1, R=3000, steps=200)
    many = replicates(prior, meas, P=100, R=30, steps=200)
    # per run: the estimate of the dominant component's weight, and of the mean's unobserved coordinate
    for pick, exact in ((lambda r: r[1][:, k], post.weights[k]), (lambda r: r[2][:, 1], post.mean()[1])):
        e1, ep = pick(one), pick(many)
        err1, errp = (e1.mean() - exact).abs(), (ep.mean() - exact).abs()
        se1, sep = e1.std() / math.sqrt(len(e1)), ep.std() / math.sqrt(len(ep))
        assert err1 > Z * se1, (err1, se1)
        assert err1 - errp > Z * math.sqrt(se1**2 + sep**2), (err1, errp, se1, sep)


def test_noise_free_measurements_are_met_exactly():
    """sigma_y = 0: the last step conditions the Gaussian N(x0_hat, r^2 I) on A x0 = y, so A x0 = y to rounding:
    a mask on 8x8 images (the observed pixels equal y) and a dense 2-row A on 8-D (y in its range)."""
    p = VP()
    prior, meas = masked_64d(0.0)
    x = p.prior_sample((64, 1, 8, 8), generator=gen(2), dtype=F64)
    out = sample_smc(prior.denoiser(p), p, x, grid_lam(p, 20), meas, particles=16, generator=gen(3))
    seen = meas.operator.mask.bool().expand(4, 1, 8, 8)
    scale = float(2 * out.abs().max() + meas.y.abs().max())  # x0 = u + (y - u): two roundings (see below)
    torch.testing.assert_close(out[seen], meas.y.expand(4, 1, 8, 8)[seen], rtol=0, atol=2 * 2**-52 * scale)
    prior, noisy = dense_8d()
    meas = Measurement(noisy.operator, noisy.y, 0.0)
    x = p.prior_sample((64, 8), generator=gen(4), dtype=F64)
    out = sample_smc(prior.denoiser(p), p, x, grid_lam(p, 20), meas, particles=16, generator=gen(5))
    scale = float(meas.operator.A.abs().sum(1).max()) * float(out.abs().max())
    torch.testing.assert_close(meas.operator(out), meas.y.expand(4, 2), rtol=0, atol=64 * 2**-52 * scale)


def test_a_grid_that_ends_on_the_data_and_a_batch_of_observations():
    """Flow with ts ending at t = 0 (sigma = 0): the last step starts from ts[-2]. Two observations y[0], y[1] of the
    ring's x-coordinate (sigma_y = 0), 8 particles each: one sample per observation, its x-coordinate that y."""
    prior, _ = ring()
    p = Flow()
    ys = torch.tensor([[1.5, 0.0], [-0.7, 0.0]], dtype=F64)
    meas = Measurement(Mask(torch.tensor([1.0, 0.0], dtype=F64)), ys, 0.0)
    x = p.prior_sample((16, 2), generator=gen(6), dtype=F64)
    ts = torch.linspace(1.0, 0.0, 30, dtype=F64)
    out = sample_smc(prior.denoiser(p), p, x, ts, meas, generator=gen(7))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    # x0 = u + (y - u) coordinate-wise: two roundings of numbers of size at most |u| + |y| <= 2 |out| + |y|
    torch.testing.assert_close(out[:, 0], ys[:, 0], rtol=0, atol=2 * 2**-52 * float(2 * out.abs().max() + 1.5))


def test_the_moves_are_ddim_steps_and_runs_are_reproducible():
    """The transition density the weights use, N(a x + b x0_hat, c^2 I), is ``ddim_step``'s: with the same noise
    the step equals a x + b x0_hat + c z (to rounding of |x|). The same generator seed gives the same samples."""
    p = VP()
    x = torch.randn(5, 3, generator=gen(8), dtype=F64)
    x0 = torch.randn(5, 3, generator=gen(9), dtype=F64)
    _, g = _common.setup(p, x, grid_lam(p, 10))
    for eta in (1.0, 0.4):
        for i in (0, 4, 9):
            a, b, c = _ancestral(g, i, eta)
            z = torch.randn(5, 3, generator=gen(10), dtype=F64)
            step = ddim_step(g, i, x, x0, eta, gen(10))
            torch.testing.assert_close(step, a * x + b * x0 + c * z, rtol=0, atol=16 * 2**-52 * float(x.abs().max()))
    prior, meas = ring()
    x = p.prior_sample((32, 2), generator=gen(11), dtype=F64)
    runs = [sample_smc(prior.denoiser(p), p, x, grid_lam(p, 10), meas, particles=8, generator=gen(12)) for _ in "ab"]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_without_a_measured_direction_it_is_the_ddpm_sampler():
    """A = 0 observes nothing: every twist is constant, no weight moves, and with the same noise the particles are
    DDPM's (sample_ddim, eta = 1) up to the Gaussian last step (its draw: the same generator's next numbers)."""
    p = VP()
    prior, _ = ring()
    meas = Measurement(Dense(torch.zeros(1, 2, dtype=F64)), torch.zeros(1, dtype=F64), 0.1)
    x = p.prior_sample((8, 2), generator=gen(13), dtype=F64)
    parts, lw = sample_smc(
        prior.denoiser(p), p, x, grid_lam(p, 10), meas, particles=8, return_particles=True, generator=gen(14)
    )
    assert torch.equal(lw, lw[:, :1].expand_as(lw))
    seen = []
    sample_ddim(prior.denoiser(p), p, x, grid_lam(p, 10), eta=1.0, generator=(g := gen(14)), callback=seen.append)
    t_min = grid_lam(p, 10)[-1]
    a, s = float(p.alpha(t_min)), float(p.sigma(t_min))
    r = math.sqrt(s**2 / (a**2 + s**2))  # r_tmin at sigma_data = 1
    x0_hat = prior.denoiser(p)(seen[-1]["x"], t_min.expand(8))
    expect = x0_hat + r * torch.randn(8, 2, generator=g, dtype=F64)
    torch.testing.assert_close(parts[0], expect, rtol=0, atol=1e-12)


def test_resampling_schemes():
    """Systematic resampling gives particle j floor(P w_j) or ceil(P w_j) copies (Kitagawa 1996); multinomial's
    counts have mean P w_j (within Z binomial standard errors over repeated draws)."""
    P = 50
    lw = torch.log(torch.rand(3, P, generator=gen(15), dtype=F64) ** 3 + 0.01)  # expected counts >= 8 below
    w = torch.softmax(lw, 1)
    idx = _resample(lw, "systematic", gen(16))
    counts = torch.zeros(3, P, dtype=F64).scatter_add_(1, idx, torch.ones(3, P, dtype=F64))
    assert ((counts >= torch.floor(P * w) - 1e-9) & (counts <= torch.ceil(P * w) + 1e-9)).all()
    n = 400
    g = gen(17)
    idx = torch.cat([_resample(lw, "multinomial", g) for _ in range(n)], 1)
    counts = torch.zeros(3, P, dtype=F64).scatter_add_(1, idx, torch.ones_like(idx, dtype=F64)) / n
    se = (P * w * (1 - w) / n).sqrt()
    assert ((counts - P * w).abs() <= Z * se + 1e-12).all()


def test_bad_input_is_refused():
    p = VP()
    prior, meas = ring()
    x = p.prior_sample((8, 2), generator=gen(18), dtype=F64)
    ts = grid_lam(p, 4)
    D = prior.denoiser(p)
    for kw, match in [
        ({"eta": 0.0}, "eta"),
        ({"sigma_data": 0.0}, "sigma_data"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
        ({"resampling": "stratified"}, "systematic"),
        ({"particles": 3}, "particles"),
    ]:
        with pytest.raises(ValueError, match=match):
            sample_smc(D, p, x, ts, meas, **kw)
    with pytest.raises(ValueError, match="batch"):  # 3 observations for 8 particles in groups of 4
        sample_smc(D, p, x, ts, Measurement(meas.operator, meas.y.expand(3, 2), 0.1), particles=4)
    with pytest.raises(TypeError, match="Measurement"):
        sample_smc(D, p, x, ts, (meas.operator, meas.y))
    with pytest.raises(ValueError, match="sigma > 0"):
        sample_smc(D, Flow(), x, torch.tensor([0.0], dtype=F64), meas)
