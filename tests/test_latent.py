"""Latent diffusion's building blocks (issue #14 item 1): the autoencoders (``nets.autoencoder``), their loss and
latent scale (``objectives.autoencoder``), and the push-forward of a Gaussian mixture under an affine map
(``FullCovarianceMixture.affine``).

The proof of the item: with a linear (PCA) autoencoder z = s P^T (x - mu), a Gaussian mixture on 8 x 8 images is
again a Gaussian mixture on the latents, mixture.affine(s P^T, -s P^T mu), whose exact denoiser drives a library
sampler on the latents; decoded, x = P z / s + mu, the samples must follow the projected mixture (the image
mixture pushed through x -> P P^T (x - mu) + mu) within statistical tolerance, and lie on mu + span(P) to
rounding.
"""

import json
import math

import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from conftest import Z, gen
from torchdiffusion import VP, FullCovarianceMixture, GaussianMixture, grid_lam
from torchdiffusion.data import load_digits
from torchdiffusion.nets.autoencoder import LOGVAR_MAX, LOGVAR_MIN, KLAutoencoder, LinearAutoencoder
from torchdiffusion.objectives.autoencoder import autoencoder_loss, kl_divergence, latent_scale_factor
from torchdiffusion.samplers import DEFAULT_SAMPLER

F64 = torch.float64
EPS = torch.finfo(F64).eps


# -- the KL term -----------------------------------------------------------------------------------------------
def _kl_inputs(seed=0, shape=(5, 4, 3, 3)):
    g = gen(seed)
    return torch.randn(shape, generator=g, dtype=F64), 2 * torch.randn(shape, generator=g, dtype=F64)


def test_kl_matches_torch_distributions():
    """The closed form against torch's Normal-Normal KL summed per example. Each of the n entries of an example
    is a sum of four terms rounded to within a few eps of their magnitudes, so the two sums agree within
    4 n eps times the sum of the terms' magnitudes."""
    mean, logvar = _kl_inputs()
    ours = kl_divergence(mean, logvar)
    ref = torch_kl(Normal(mean, torch.exp(logvar / 2)), Normal(torch.zeros_like(mean), 1.0)).flatten(1).sum(1)
    n = mean[0].numel()
    scale = 0.5 * (mean**2 + logvar.exp() + 1 + logvar.abs()).flatten(1).sum(1)
    assert ours.shape == (mean.shape[0],)
    assert bool(((ours - ref).abs() <= 4 * n * EPS * scale).all()), (ours - ref).abs().max()


def test_kl_matches_a_monte_carlo_estimate():
    """KL = E_q[log q(z) - log p(z)]: the mean of n draws lies within Z standard errors (their own spread)."""
    mean, logvar = _kl_inputs(1, (3, 6))
    n = 200_000
    q, p = Normal(mean, torch.exp(logvar / 2)), Normal(0.0, 1.0)
    z = mean + torch.exp(logvar / 2) * torch.randn(n, *mean.shape, generator=gen(20), dtype=F64)
    diff = (q.log_prob(z) - p.log_prob(z)).sum(-1)  # (n, B)
    est, se = diff.mean(0), diff.std(0) / math.sqrt(n)
    assert bool(((est - kl_divergence(mean, logvar)).abs() <= Z * se).all())


def test_kl_is_zero_exactly_at_the_prior_and_positive_elsewhere():
    zero = torch.zeros(2, 3, dtype=F64)
    assert torch.equal(kl_divergence(zero, zero), torch.zeros(2, dtype=F64))
    mean, logvar = _kl_inputs(2)
    assert bool((kl_divergence(mean, logvar) > 0).all())
    # near logvar = l = 0 the term exp(l) - 1 - l is l^2/2 + l^3/6 + O(l^4): expm1(l) - l gets it to an absolute
    # error of about eps |l| (expm1's rounding; the subtraction is exact), where exp(l) - 1 - l errs by eps
    l = 1e-9
    exact = 0.5 * (l**2 / 2 + l**3 / 6)
    got = float(kl_divergence(torch.zeros(1, 1, dtype=F64), torch.full((1, 1), l, dtype=F64)))
    assert abs(got - exact) <= 2 * EPS * l
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(zero, torch.zeros(2, 4))


# -- the autoencoder loss ------------------------------------------------------------------------------------------
def test_autoencoder_loss_parts_are_exact():
    """recon - x = c everywhere: the L1 part is D |c| per example, L2 is D c^2; the KL part is kl_divergence's
    batch mean and the loss is their weighted sum."""
    x = torch.randn(3, 1, 4, 4, generator=gen(3), dtype=F64)
    c = 0.25  # a power of 2: x + c - x is exact
    mean, logvar = _kl_inputs(4, (3, 2, 2, 2))
    kl = kl_divergence(mean, logvar).mean()
    for name, err in (("l1", 16 * c), ("l2", 16 * c**2)):
        loss, parts = autoencoder_loss(x + c, x, mean, logvar, kl_weight=0.5, reconstruction=name)
        assert float(parts["reconstruction"]) == err
        assert float(parts["kl"]) == float(kl)
        assert float(loss) == err + 0.5 * float(kl)
        assert not parts["kl"].requires_grad


def test_autoencoder_loss_rejects_bad_input():
    x, m = torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 1, 1)
    with pytest.raises(ValueError, match=r"one of \('l1', 'l2'\)"):
        autoencoder_loss(x, x, m, m, reconstruction="lpips")
    with pytest.raises(ValueError, match="kl_weight"):
        autoencoder_loss(x, x, m, m, kl_weight=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        autoencoder_loss(x[:, :, :2], x, m, m)
    with pytest.raises(ValueError, match="examples"):
        autoencoder_loss(x, x, m[:1], m[:1])


# -- the latent scale factor -------------------------------------------------------------------------------------
def test_latent_scale_factor_is_one_over_the_pooled_std():
    """Entries +-s, balanced, have pooled mean 0 and population std s exactly; shifting leaves the factor and
    scaling by a divides it by |a| (to the rounding of n-term sums, n eps relative)."""
    s = 0.375
    z = s * torch.tensor([1.0, -1.0], dtype=F64).repeat(4, 3, 2, 1)  # (4, 3, 2, 2): 48 entries
    n = z.numel()
    assert abs(latent_scale_factor(z) - 1 / s) <= 4 * n * EPS / s
    w = torch.randn(6, 4, 2, 2, generator=gen(5), dtype=F64)
    f = latent_scale_factor(w)
    assert abs(latent_scale_factor(-3 * w + 7) - f / 3) <= 8 * w.numel() * EPS * f
    scaled = (f * w).flatten()
    assert abs(float(((scaled - scaled.mean()) ** 2).mean()) - 1) <= 8 * w.numel() * EPS
    with pytest.raises(ValueError, match="all equal"):
        latent_scale_factor(torch.ones(3, 4))
    with pytest.raises(ValueError, match="at least 2"):
        latent_scale_factor(torch.ones(1))


# -- the push-forward of a mixture ---------------------------------------------------------------------------------
def _random_full_mixture(seed=6, K=3, D=5):
    g = gen(seed)
    B = torch.randn(K, D, D, generator=g, dtype=F64)
    covs = B @ B.mT / D + 0.1 * torch.eye(D, dtype=F64)
    return FullCovarianceMixture(torch.rand(K, generator=g, dtype=F64) + 0.5, torch.randn(K, D, generator=g), covs)


def test_affine_identity_is_the_same_mixture():
    """A = I, b = 0: products with 1 and sums with exact zeros are exact, so everything is bit-equal."""
    mix = _random_full_mixture()
    out = mix.affine(torch.eye(mix.dim, dtype=F64))
    assert torch.equal(out.weights, mix.weights) and torch.equal(out.means, mix.means)
    assert torch.equal(out.covariances, mix.covariances) and out.shape == mix.shape


def test_affine_composes_and_maps_the_moments():
    """(A2, b2) after (A1, b1) is (A2 A1, A2 b1 + b2); the mixture's overall mean and covariance map as
    A m + b and A Cov A^T. Both sides are chains of dot products of lengths 5 and 4, so they differ elementwise by
    at most gamma_n times the same chain in absolute values (Higham 2002, Sec. 3.5), n <= 2 (5 + 4 + 1) terms."""
    mix = _random_full_mixture()
    g = gen(7)
    A1, b1 = torch.randn(4, 5, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    A2, b2 = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    two = mix.affine(A1, b1).affine(A2, b2)
    one = mix.affine(A2 @ A1, A2 @ b1 + b2)
    gamma = 2 * (5 + 4 + 1) * EPS
    A = A2.abs() @ A1.abs()
    tol_m = gamma * (mix.means.abs() @ A.T + A2.abs() @ b1.abs() + b2.abs())  # (K, 3)
    tol_c = gamma * (A @ mix.covariances.abs() @ A.T)  # (K, 3, 3)
    assert bool(((two.means - one.means).abs() <= tol_m).all())
    assert bool(((two.covariances - one.covariances).abs() <= tol_c).all())
    assert torch.equal(two.weights, one.weights) and one.shape == (3,)
    # the overall moments: one more sum over the K = 3 components (and m m^T's products)
    mean = A2 @ A1 @ mix.mean() + A2 @ b1 + b2
    assert bool(((one.mean() - mean).abs() <= 2 * tol_m.amax(0)).all())
    cov = A2 @ A1 @ mix.covariance() @ (A2 @ A1).T
    second = mix.covariances.abs().sum(0) + mix.means.abs().T @ mix.means.abs()  # bounds every term of Cov
    assert bool(((one.covariance() - cov).abs() <= 4 * gamma * (A @ second @ A.T)).all())


def test_affine_change_of_variables():
    """For an invertible A, log p_z(A x + b) = log p_x(x) - log |det A| (the density of a push-forward). Both
    sides are computed through eigendecompositions of C_k and A C_k A^T; the error of a log-density is about
    D eps cond(A C_k A^T) times its terms' size, bounded here by D eps cond(A)^2 max_k cond(C_k) (1 + |log p|)."""
    mix = _random_full_mixture()
    D, g = mix.dim, gen(8)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.linspace(0.5, 2.0, D, dtype=F64)) @ Q2.T  # not symmetric: A C A^T differs from A^T C A
    b = torch.randn(D, generator=g, dtype=F64)
    x = mix.sample(50, generator=g)
    lhs = mix.affine(A, b).log_prob(x @ A.T + b)
    rhs = mix.log_prob(x) - torch.linalg.slogdet(A)[1]
    lam = torch.linalg.eigvalsh(mix.covariances)
    cond = float(torch.linalg.cond(A)) ** 2 * float((lam[:, -1] / lam[:, 0]).max())
    tol = 8 * D * EPS * cond * (1 + rhs.abs())
    assert bool(((lhs - rhs).abs() <= tol).all()), (lhs - rhs).abs().max()


def test_diagonal_affine_keeps_a_diagonal_mixture():
    """A (D,) vector is a diagonal map: a GaussianMixture with means a m + b and variances a^2 v, the same mixture
    as the full-covariance route (a diagonal matrix through to_full) to one rounding of each product."""
    g = gen(9)
    gm = GaussianMixture([1.0, 2.0], torch.randn(2, 4, generator=g), torch.rand(2, 4, generator=g) + 0.1, (1, 2, 2))
    a, b = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64), torch.arange(4, dtype=F64)
    diag = gm.affine(a, b)
    assert isinstance(diag, GaussianMixture) and diag.shape == (1, 2, 2)
    full = gm.affine(torch.diag(a), b)
    assert isinstance(full, FullCovarianceMixture)
    assert torch.allclose(full.means, diag.means, rtol=2 * EPS, atol=0)
    assert torch.allclose(full.covariances, torch.diag_embed(diag.variances), rtol=4 * EPS, atol=0)
    with pytest.raises(ValueError, match="D = 4"):
        gm.affine(torch.eye(3))
    with pytest.raises(ValueError, match="M = 2"):
        gm.affine(torch.ones(2, 4), torch.zeros(3))


# -- the linear autoencoder ------------------------------------------------------------------------------------------
def test_pca_of_data_on_a_subspace_reconstructs_it():
    """Data exactly on an r-dimensional affine subspace: the rank-r PCA autoencoder is the identity on it, and
    encode(decode(z)) = z, to the rounding of D-term products (a few D eps of the data's size)."""
    g = gen(10)
    D, r, N = 36, 5, 40
    basis, _ = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=F64))
    mu = torch.randn(D, generator=g, dtype=F64)
    x = (torch.randn(N, r, generator=g, dtype=F64) @ basis.T + mu).reshape(N, 1, 6, 6)
    ae = LinearAutoencoder.pca(x, r, latent_shape=(5, 1, 1))
    assert ae.latent_shape == (5, 1, 1) and ae.shape == (1, 6, 6)
    size = float(x.abs().max())
    assert float((ae(x) - x).abs().max()) <= 8 * D * EPS * size
    z = torch.randn(7, 5, 1, 1, generator=g, dtype=F64)
    assert float((ae.encode(ae.decode(z)) - z).abs().max()) <= 8 * D * EPS * (float(z.abs().max()) + size)
    # the same subspace as the exact covariance's leading eigenvectors
    exact = LinearAutoencoder.from_covariance(mu, basis @ basis.T, r, shape=(1, 6, 6))
    proj = ae.basis @ ae.basis.T - exact.basis @ exact.basis.T
    assert float(proj.abs().max()) <= 64 * D * EPS


def test_linear_autoencoder_rejects_bad_input():
    with pytest.raises(ValueError, match="orthonormal"):
        LinearAutoencoder(torch.ones(4, 2, dtype=F64), torch.zeros(4))
    with pytest.raises(ValueError, match="D = 4"):
        LinearAutoencoder(torch.eye(4, 2, dtype=F64), torch.zeros(3))
    with pytest.raises(ValueError, match="latent_shape"):
        LinearAutoencoder(torch.eye(4, 2, dtype=F64), torch.zeros(4), latent_shape=(3,))
    with pytest.raises(ValueError, match=r"min\(N - 1, D\)"):
        LinearAutoencoder.pca(torch.randn(4, 8), 4)
    ae = LinearAutoencoder(torch.eye(4, 2, dtype=F64), torch.zeros(4), shape=(1, 2, 2))
    with pytest.raises(ValueError, match="x must be"):
        ae.encode(torch.zeros(3, 4, dtype=F64))


# -- THE PROOF: latent diffusion with a linear autoencoder reproduces the projected mixture ------------------------
def image_mixture():
    """3 Gaussians on 8 x 8 images (D = 64) whose covariances have low effective rank: most of their variance, and
    the offsets of their means, lie in one 6-dimensional subspace, plus a tail spread over all 64 directions with
    variances decaying from 0.05, so a rank-8 PCA keeps the signal and two tail directions. The means are 16 apart
    and every component's standard deviation is at most about 1.1 (at least 22 standard deviations between two
    means in the Mahalanobis distance of either): the Bayes classifier misassigns a draw with a probability of
    order Phi(-11) ~ 1e-28, so components can be told apart sample by sample."""
    g = gen(11)
    D, s, K = 64, 6, 3
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    signal = Q[:, :s]
    covs, means = [], []
    for k in range(K):
        G = 0.5 * torch.randn(s, s, generator=g, dtype=F64) / math.sqrt(s)  # a random shape within the subspace
        tail = 0.05 * torch.exp(-torch.arange(D, dtype=F64) / 8)
        covs.append(signal @ (G @ G.T + 0.1 * torch.eye(s, dtype=F64)) @ signal.T + Q @ torch.diag(tail) @ Q.T)
        means.append(signal @ (16 / math.sqrt(2) * torch.eye(s, dtype=F64)[k]))
    offset = torch.randn(D, generator=g, dtype=F64)
    return FullCovarianceMixture(
        torch.tensor([1.0, 2.0, 1.5]), torch.stack(means) + offset, torch.stack(covs), (1, 8, 8)
    )


def check_gaussian(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, rank: int, what: str):
    """Samples x (n, D) of a Gaussian N(mean, cov) whose covariance has rank r: in the whitened coordinates
    y = Lambda^{-1/2} V^T (x - mean) (V, Lambda its r leading eigenpairs) every mean is 0 and every second moment
    E[y_a y_b] is delta_ab; each sample average lies within Z standard errors (from its own spread, as
    ``mixture_checks.check_mixture``)."""
    n = x.shape[0]
    lam, V = torch.linalg.eigh(cov)
    lam, V = lam[-rank:], V[:, -rank:]
    y = (x - mean) @ V / lam.sqrt()
    err = y.mean(0)
    assert bool((err.abs() <= Z / math.sqrt(n)).all()), f"{what}: whitened mean {err.tolist()}"
    prod = y[:, :, None] * y[:, None, :]  # (n, r, r)
    est, se = prod.mean(0), prod.std(0) / math.sqrt(n)
    bad = (est - torch.eye(rank, dtype=F64)).abs() > Z * se
    assert not bool(bad.any()), f"{what}: second moments {est[bad].tolist()} against se {se[bad].tolist()}"


@pytest.mark.parametrize("latent_shape", [(8,), (2, 2, 2)], ids=["flat", "image"])
def test_latent_sampling_with_a_pca_autoencoder_reproduces_the_projected_mixture(latent_shape):
    """The exact latent denoiser, UniPC-3 on VP for 100 steps of grid_lam, decoding: component weights (by the
    Bayes classifier of the projected mixture, whose components are far apart), per-component and overall means
    and covariances all within Z standard errors; and every decoded sample on mu + span(P) to rounding.

    The samplers return x0_hat = E[z0 | z_tmin] at the last time t_min, whose covariance on a Gaussian component
    is C (C + (sigma/alpha)^2 I)^{-1} C: each variance c is low by about sigma(t_min)^2 / c relative. The
    smallest latent variances here (tail directions, 0.02 s^2 ~ 2e-3) would be 5% low at VP's default t_min =
    1e-3 (sigma ~ 1e-2), measured 2.5 to 4 standard errors at n = 20,000; at t_min = 1e-6 (sigma ~ 3e-4) the
    shift is 5e-5 relative. 100 steps of UniPC-3 move no statistic measurably (the same to 3 decimals as 400 steps)."""
    mix, r, n = image_mixture(), 8, 20_000
    data = mix.sample(4000, generator=gen(12))
    ae = LinearAutoencoder.pca(data, r, latent_shape=latent_shape)
    P, mu = ae.basis, ae.mean
    s = latent_scale_factor(ae.encode(data))  # unit-variance latents, as Rombach et al. 2022 App. G
    latent = mix.affine(s * P.T, -s * P.T @ mu, shape=latent_shape)
    process = VP(t_min=1e-6)
    zT = process.prior_sample((n, *latent_shape), generator=gen(13), dtype=F64)
    z = DEFAULT_SAMPLER(latent.denoiser(process), process, zT, grid_lam(process, 100))
    x = ae.decode(z / s).reshape(n, -1)
    assert x.shape == (n, 64)

    # decoding is linear: x - mu = P (z / s) lies in span(P); the residual of (I - P P^T) is rounding of D- and
    # r-term dot products, bounded elementwise by (D + r + 2) eps times the products' magnitudes (Higham 2002,
    # Sec. 3.1: |fl(a^T b) - a^T b| <= gamma_n |a|^T |b|)
    v = x - mu
    resid = v - (v @ P) @ P.T
    bound = (
        (64 + r + 2)
        * EPS
        * ((v.abs() @ P.abs()) @ P.abs().T + v.abs() + mu.abs() + (z.reshape(n, -1) / s).abs() @ P.abs().T)
    )
    assert bool((resid.abs() <= bound).all()), float((resid.abs() / bound).max())

    projector = P @ P.T
    projected = mix.affine(projector, mu - projector @ mu, support=P)
    k = projected.responsibilities(x).argmax(1)
    for j, w in enumerate(projected.weights.tolist()):
        frac = float((k == j).double().mean())
        assert abs(frac - w) < Z * math.sqrt(w * (1 - w) / n), f"weight of component {j}: {frac} vs {w}"
        check_gaussian(x[k == j], projected.means[j], projected.covariances[j], r, f"component {j}")
    check_gaussian(x, projected.mean(), projected.covariance(), r, "overall")


# -- the KL autoencoder ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("factor", "size"), [(1, 4), (2, 8), (4, 16), (8, 16)])
def test_kl_autoencoder_shapes(factor, size):
    ae = KLAutoencoder(in_channels=3, image_size=size, latent_channels=2, factor=factor, channels=8, groups=4)
    assert ae.latent_shape == (2, size // factor, size // factor)
    x = torch.randn(2, 3, size, size, generator=gen(14))
    recon, mean, logvar = ae(x, generator=gen(15))
    assert recon.shape == x.shape and mean.shape == logvar.shape == (2, *ae.latent_shape)
    assert ae.decode(mean).shape == x.shape
    # another multiple of the factor runs too (convolutions only)
    assert ae.encode(torch.zeros(1, 3, 2 * size, size))[0].shape == (1, 2, 2 * size // factor, size // factor)


def test_kl_autoencoder_config_rebuilds_the_same_model():
    ae = KLAutoencoder(channels=8, groups=4, channel_mult=(1, 2, 3), num_res_blocks=2)
    config = json.loads(json.dumps(ae.config))  # JSON-able, as a checkpoint stores it
    twin = KLAutoencoder(**config)
    twin.load_state_dict(ae.state_dict())
    x = torch.randn(3, 1, 16, 16, generator=gen(16))
    for a, b in zip(ae(x, generator=gen(17)), twin(x, generator=gen(17)), strict=True):
        assert torch.equal(a, b)


def test_kl_autoencoder_clamps_logvar():
    """However large the encoder's raw output, logvar stays in [LOGVAR_MIN, LOGVAR_MAX] = [-30, 20]."""
    ae = KLAutoencoder(channels=8, groups=4)
    conv_out = ae.encoder[-1]
    x = torch.randn(2, 1, 16, 16, generator=gen(18))
    for bias in (1e4, -1e4):
        with torch.no_grad():
            conv_out.bias.fill_(bias)
            _, logvar = ae.encode(x)
        assert float(logvar.max()) == (LOGVAR_MAX if bias > 0 else LOGVAR_MIN) == float(logvar.min())


def test_kl_autoencoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="power of 2"):
        KLAutoencoder(factor=3, image_size=12)
    with pytest.raises(ValueError, match="multiple of the downsampling factor 4"):
        KLAutoencoder(image_size=18)
    with pytest.raises(ValueError, match="log2\\(factor\\) \\+ 1 = 3"):
        KLAutoencoder(channel_mult=(1, 2))
    with pytest.raises(TypeError, match="image_size must be an integer"):
        KLAutoencoder(image_size=16.0)
    with pytest.raises(ValueError, match="latent_channels must be >= 1"):
        KLAutoencoder(latent_channels=0)
    ae = KLAutoencoder(channels=8, groups=4)
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(torch.zeros(1, 1, 10, 16))
    with pytest.raises(ValueError, match=r"z must be \(B, 4, H, W\)"):
        ae.decode(torch.zeros(1, 3, 4, 4))


def test_kl_autoencoder_learns_to_reconstruct_digits():
    """80 Adam steps on 64 digits (16 x 16): the reconstruction of each image from its latent mean beats every
    reconstruction that ignores the input, whose best L1 error is that of the per-pixel median image (the L1
    minimiser over constants), and the training loss falls below that level too. An encoder or decoder that passes
    no information (or a broken gradient) cannot beat it. About 3 s on one thread."""
    torch.manual_seed(0)  # the initial weights
    x = load_digits(16)[0][:64]
    ae = KLAutoencoder(channels=8, groups=4)
    baseline = float((x - x.median(0).values).abs().flatten(1).sum(1).mean())
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    g = gen(19)
    losses = []
    for _ in range(80):
        recon, mean, logvar = ae(x, generator=g)
        loss, _ = autoencoder_loss(recon, x, mean, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        mean, _ = ae.encode(x)
        err = float((ae.decode(mean) - x).abs().flatten(1).sum(1).mean())
    assert losses[0] > baseline, "an untrained model should not already beat the constant baseline"
    assert err < baseline and min(losses[-10:]) < baseline, (err, losses[-10:], baseline)
