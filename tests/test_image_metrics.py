"""Image metrics against closed forms: FID of Gaussians, KID's cubic-kernel MMD^2 from moments, k-NN precision and
recall on identical and disjoint sets; the digits feature net's accuracy and cache; the FID Inception's layout."""

import json

import numpy as np
import pytest
import torch

from torchdiffusion.data.images import load_digits
from torchdiffusion.evaluation import features as feats
from torchdiffusion.evaluation.features import (
    INCEPTION_FILE,
    FeatureNetError,
    InceptionFeatures,
    classifier_accuracy,
    feature_net_for,
    load_feature_net,
    load_inception,
    train_feature_net,
)
from torchdiffusion.evaluation.image_metrics import (
    evaluate_images,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)

F64 = torch.float64


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=F64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)


# -- FID ---------------------------------------------------------------------------------------------------
EPS = float(np.finfo(np.float64).eps)


def _fid_rounding(mu1, s1, mu2, s2, route: str = "symmetric") -> float:
    """Worst-case float64 rounding error of d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) by one route.

    The eigenvalues lam_i >= 0 of S1 S2 are those of the symmetric S2^{1/2} S1 S2^{1/2}. A route computes each
    of them within delta (backward-stable LAPACK: error <= p(n) eps ||A|| with p(n) taken as n):
    - "symmetric" (``frechet_distance``): eigh(S1) returns S1 + E, ||E|| <= n eps ||S1||, and clamping its
      negative eigenvalues moves it as much again; the products root S2 root add n eps ||root||_F^2 ||S2|| with
      ||root||_F^2 = Tr S1 <= sqrt(n) ||S1||_F, and eigvalsh n eps ||S1|| ||S2||. By Weyl's theorem every
      eigenvalue moves by at most delta = 3 n^1.5 eps ||S1||_F ||S2||_F.
    - "general" (``np.linalg.eigvals`` or scipy's Schur-form ``sqrtm`` of the computed product S1 @ S2): the
      product and the Hessenberg QR add a backward error 2 n eps ||S1||_F ||S2||_F. S1 S2 = V Lam V^-1 with
      V = S^-1/2 Q for the better-conditioned nonsingular S of the two, so by Bauer-Fike every eigenvalue moves
      by at most kappa(V) times that, kappa(V) = kappa(S)^{1/2}; sqrtm's back-transformation Q R Q^T adds
      n^2 eps ||R||_F <= n^2 eps kappa(V) (sum lam)^{1/2} to the trace.
    An eigenvalue moved by |e| <= delta moves its square root by at most min(sqrt(delta), delta / sqrt(lam)):
    about delta / (2 sqrt(lam)) away from zero, but sqrt(delta) for the zero eigenvalues of a singular
    covariance, so rank deficiency costs half the digits on every route. Tr (S1 S2)^{1/2} enters d^2 twice;
    the three sums of n terms add n eps (||mu1 - mu2||^2 + Tr S1 + Tr S2).
    """
    s1, s2 = np.asarray(s1, dtype=np.float64), np.asarray(s2, dtype=np.float64)
    n, norms = len(s1), float(np.linalg.norm(s1) * np.linalg.norm(s2))
    w2, v2 = np.linalg.eigh(s2)
    r2 = (v2 * np.sqrt(np.clip(w2, 0, None))) @ v2.T
    lam = np.clip(np.linalg.eigvalsh(r2 @ s1 @ r2), 0, None)
    sums = float(((np.asarray(mu1) - np.asarray(mu2)) ** 2).sum() + np.trace(s1) + np.trace(s2))
    delta = known = 3 * n**1.5 * EPS * norms  # lam itself came by the symmetric route: known to within this
    extra = 0.0
    if route != "symmetric":
        kappa = min(float(np.linalg.cond(s1)), float(np.linalg.cond(s2)))
        assert kappa * EPS < 1, "the Bauer-Fike bound needs one nonsingular covariance"
        delta = 2 * n * EPS * kappa**0.5 * norms
        extra = n**2 * EPS * kappa**0.5 * float(np.sqrt(lam.sum()))
    low = lam - known
    moved = np.where(low > 0, delta / np.sqrt(np.where(low > 0, low, 1.0)), np.inf)
    return 2 * (float(np.minimum(np.sqrt(delta), moved).sum()) + extra) + n * EPS * sums


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    v1, v2 = torch.rand(6, generator=gen, dtype=F64) + 0.1, torch.rand(6, generator=gen, dtype=F64) + 0.1
    exact = ((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum()
    s1, s2 = torch.diag(v1), torch.diag(v2)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - float(exact)) <= _fid_rounding(mu1, s1, mu2, s2)


def test_frechet_distance_is_zero_for_identical_statistics_and_symmetric():
    gen = torch.Generator().manual_seed(1)
    mu1, mu2, s1, s2 = (
        torch.randn(30, generator=gen, dtype=F64),
        torch.zeros(30, dtype=F64),
        _spd(30, gen),
        _spd(30, gen),
    )
    assert frechet_distance(mu1, s1, mu1, s1) <= _fid_rounding(mu1, s1, mu1, s1)
    # the two orders take the square root of different matrices: each is within its own rounding bound
    ab, ba = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert abs(ab - ba) <= _fid_rounding(mu1, s1, mu2, s2) + _fid_rounding(mu2, s2, mu1, s1)


def _fid_reference(mu1, s1, mu2, s2, trace_sqrt):
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt(s1 @ s2))


def test_frechet_distance_matches_the_general_formula_including_singular_covariances():
    """Tr (S1 S2)^{1/2} = sum sqrt(eig(S1 S2)) (the eigenvalues are real and >= 0), and scipy's sqrtm.

    The two sides take different routes (two symmetric eigendecompositions against the eigenvalues or Schur
    form of the non-symmetric product), so they agree to the rounding bound of each route, which depends on
    the conditioning: to ~1e-12 relative for well-conditioned covariances, to ~sqrt(eps) for a singular one."""
    gen = torch.Generator().manual_seed(2)
    mu1, mu2 = torch.randn(10, generator=gen, dtype=F64).numpy(), torch.randn(10, generator=gen, dtype=F64).numpy()
    low_rank = torch.randn(4, 10, generator=gen, dtype=F64)
    by_eigvals = lambda m: np.sqrt(np.clip(np.linalg.eigvals(m).real, 0, None)).sum()  # noqa: E731
    for s1, s2 in [(_spd(10, gen), _spd(10, gen)), (low_rank.T @ low_rank, _spd(10, gen))]:
        s1, s2 = s1.numpy(), s2.numpy()
        ours, reference = frechet_distance(mu1, s1, mu2, s2), _fid_reference(mu1, s1, mu2, s2, by_eigvals)
        assert abs(ours - reference) <= _fid_rounding(mu1, s1, mu2, s2) + _fid_rounding(mu1, s1, mu2, s2, "general")
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = _spd(10, gen).numpy(), _spd(10, gen).numpy()
    by_sqrtm = lambda m: np.trace(linalg.sqrtm(m)).real  # noqa: E731
    ours, reference = frechet_distance(mu1, s1, mu2, s2), _fid_reference(mu1, s1, mu2, s2, by_sqrtm)
    assert abs(ours - reference) <= _fid_rounding(mu1, s1, mu2, s2) + _fid_rounding(mu1, s1, mu2, s2, "general")


def test_feature_statistics_are_mean_and_unbiased_covariance():
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    mu, sigma = feature_statistics(f)
    # numpy and torch sum in different orders; a sum of N terms in any order errs by at most N u times the sum of
    # their magnitudes (u = eps/2), so an entry near 0 is bounded absolutely. Both covariances are two-pass:
    # the mean's own error cancels to first order (the deviations sum to 0), each deviation, product and the
    # division add u, so each side errs by (N + 2) u (|D|^T |D|)_ij / (N - 1) with D the deviations.
    a, n = f.numpy(), len(f)
    assert (np.abs(mu.numpy() - a.mean(0)) <= n * EPS * np.abs(a).mean(0)).all()
    d = np.abs(a - a.mean(0))
    assert (np.abs(sigma.numpy() - np.cov(a, rowvar=False)) <= (n + 2) * EPS * (d.T @ d) / (n - 1)).all()


def test_fid_of_two_samples_of_one_gaussian_is_small_against_a_unit_mean_shift():
    """||delta||^2 = 1 with equal covariances: FID = 1 exactly; the same law gives the finite-sample bias only."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(8, 8, generator=gen, dtype=F64) / 3 + torch.eye(8, dtype=F64)
    x, y = (torch.randn(20000, 8, generator=gen, dtype=F64) @ a.T + 1 for _ in range(2))
    same = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    shifted = frechet_distance(*feature_statistics(x), *feature_statistics(y + 8**-0.5))
    assert shifted == pytest.approx(1.0, abs=0.05)
    assert same < 0.02 * shifted


# -- KID ---------------------------------------------------------------------------------------------------
def _independent_kids(sample_x, sample_y, repeats, m, gen):
    """KID of `repeats` independent pairs of samples of size m: i.i.d. estimates, so their standard error is honest."""
    est = [kernel_inception_distance(sample_x(m), sample_y(m), subsets=1, subset_size=m, generator=gen)[0]
           for _ in range(repeats)]  # fmt: skip
    est = torch.tensor(est, dtype=F64)
    return float(est.mean()), float(est.std() / repeats**0.5)


def test_kid_is_unbiased_for_one_distribution():
    gen = torch.Generator().manual_seed(5)
    draw = lambda m: torch.randn(m, 4, generator=gen, dtype=F64)  # noqa: E731
    mean, se = _independent_kids(draw, draw, 1000, 50, gen)
    assert abs(mean) < 3 * se


def test_kid_matches_the_closed_form_cubic_kernel_mmd_of_a_mean_shift():
    """d = 1: k(x, y) = (xy + 1)^3 = <phi(x), phi(y)> with phi(x) = (x^3, sqrt3 x^2, sqrt3 x, 1), so
    MMD^2 = ||E phi(X) - E phi(Y)||^2. X ~ N(0, 1): E phi = (0, sqrt3, 0, 1); Y ~ N(mu, 1): E Y^3 = mu^3 + 3 mu,
    E Y^2 = 1 + mu^2, so MMD^2 = (mu^3 + 3 mu)^2 + 3 mu^4 + 3 mu^2 (3.578125 at mu = 1/2). Samples of only m = 20
    make a biased estimate miss it (the V-statistic is off by about (E k(x, x) - E k(x, x')) / m ~ 1.2)."""
    gen, mu = torch.Generator().manual_seed(6), 0.5
    exact = (mu**3 + 3 * mu) ** 2 + 3 * mu**4 + 3 * mu**2
    mean, se = _independent_kids(lambda m: torch.randn(m, 1, generator=gen, dtype=F64),
                                 lambda m: mu + torch.randn(m, 1, generator=gen, dtype=F64), 4000, 20, gen)  # fmt: skip
    assert se < 0.15
    assert abs(mean - exact) < 3 * se


def test_kid_of_whole_sets_is_the_u_statistic():
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(12, 3, generator=gen, dtype=F64), torch.randn(12, 3, generator=gen, dtype=F64) + 0.3
    k = lambda a, b: (float(a @ b) / 3 + 1) ** 3  # noqa: E731
    pairs = [(i, j) for i in range(12) for j in range(12) if i != j]
    u = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / len(pairs)
    u -= 2 * sum(k(x[i], y[j]) for i in range(12) for j in range(12)) / 144
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=100, generator=gen)
    # Rounding, on either side: a kernel value k = s^3, s = a.b / 3 + 1, errs by at most 11 u (|a|.|b| / 3 + 1)^3
    # (3 u on the dot product, u each on / 3, + 1 and the cube, times 3 s^2), and a sum of M terms in any order by
    # (M - 1) u times their magnitudes. MMD^2 is a small difference of such sums: bound it absolutely.
    kt = lambda a, b: (a.abs() @ b.abs().T / 3 + 1) ** 3  # noqa: E731
    m = len(x)
    terms = (kt(x, x).sum() + kt(y, y).sum()) / (m * (m - 1)) + 2 * kt(x, y).sum() / m**2
    bound = (m**2 + 11) * EPS * float(terms)  # both sides: 2 (m^2 + 11) u
    assert abs(mean - u) <= bound and std <= bound  # whole sets: every subset is the same sum, reordered


# -- precision and recall ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_of_identical_sets_is_one(k):
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(8), dtype=F64)
    assert precision_recall(x, x.clone(), k=k) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(300, 5, generator=gen), torch.randn(300, 5, generator=gen) + 100
    assert precision_recall(x, y, k=3) == (0.0, 0.0)


def test_precision_recall_when_fake_covers_one_of_two_real_modes():
    """Fakes from one of two far-apart real modes: as plausible as against that mode alone, half the data missed."""
    gen, e1 = torch.Generator().manual_seed(10), torch.eye(5)[0] * 50
    mode_a, mode_b = torch.randn(500, 5, generator=gen) + e1, torch.randn(500, 5, generator=gen) - e1
    fake = torch.randn(1000, 5, generator=gen) + e1
    precision, recall = precision_recall(torch.cat([mode_a, mode_b]), fake, k=3)
    precision_a, recall_a = precision_recall(mode_a, fake, k=3)
    assert precision == precision_a > 0.85
    assert recall == pytest.approx(recall_a / 2, abs=1e-12) and recall_a > 0.85
    with pytest.raises(ValueError, match="k"):
        precision_recall(mode_a[:3], fake, k=3)


# -- the own feature net -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_net():
    """The feature net with its default settings, trained on 80% of the digits; the rest held out."""
    x, y = load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    held, kept = perm[:360], perm[360:]
    return train_feature_net(x[kept], y[kept], seed=0, dataset="digits"), x, y, kept, held


def test_digits_feature_net_is_accurate_on_held_out_digits(digits_net):
    net, x, y, _, held = digits_net
    assert classifier_accuracy(net, x[held], y[held]) > 0.95


def test_digits_features_separate_the_classes(digits_net):
    """Nearest class mean (means from the training split) classifies held-out features."""
    net, x, y, kept, held = digits_net
    with torch.no_grad():
        f_kept, f_held = net.features(x[kept]), net.features(x[held])
    means = torch.stack([f_kept[y[kept] == c].mean(0) for c in range(10)])
    assert (torch.cdist(f_held, means).argmin(1) == y[held]).double().mean() > 0.95


def test_feature_net_cache_loads_bit_exactly_and_retrains_on_new_data(tmp_path, monkeypatch):
    x, y = load_digits()
    x, y = x[:300], y[:300]
    net = feature_net_for("digits", tmp_path, images=x, labels=y, epochs=1, holdout=0.2)
    meta = json.loads((tmp_path / "features-digits.json").read_text())
    assert meta["n_holdout"] == 60 and 0 <= meta["holdout_accuracy"] <= 1 and meta["settings"]["epochs"] == 1
    calls = []
    real_train = feats.train_feature_net
    monkeypatch.setattr(feats, "train_feature_net", lambda *a, **kw: calls.append(1) or real_train(*a, **kw))
    again = feature_net_for("digits", tmp_path, images=x, labels=y, epochs=1, holdout=0.2)
    assert not calls
    with torch.no_grad():
        assert torch.equal(net.features(x), again.features(x))
    changed = x.clone()
    changed[0, 0, 0, 0] += 0.5
    feature_net_for("digits", tmp_path, images=changed, labels=y, epochs=1, holdout=0.2)
    assert calls == [1]
    assert json.loads((tmp_path / "features-digits.json").read_text())["data_sha256"] != meta["data_sha256"]
    feature_net_for("digits", tmp_path, images=changed, labels=y, epochs=2, holdout=0.2)  # new settings
    assert calls == [1, 1]


def test_corrupt_feature_net_cache_raises_on_load_and_is_retrained_with_a_warning(tmp_path):
    x, y = load_digits()
    x, y = x[:200], y[:200]
    feature_net_for("digits", tmp_path, images=x, labels=y, epochs=1)
    weights = tmp_path / "features-digits.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(FeatureNetError, match="features-digits.safetensors"):
        load_feature_net(weights)
    with pytest.warns(UserWarning, match="training it again"):
        feature_net_for("digits", tmp_path, images=x, labels=y, epochs=1)
    load_feature_net(weights)  # repaired
    (tmp_path / "features-digits.json").write_text("{not json")
    with pytest.raises(FeatureNetError, match="corrupt"):
        load_feature_net(weights)


# -- evaluate_images ---------------------------------------------------------------------------------------
def test_evaluate_images_digits_halves_against_noise(digits_net):
    net, x, *_ = digits_net
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(11))
    a, b = x[perm[:898]], x[perm[898:]]
    noise = torch.randn(899, 1, 8, 8, generator=torch.Generator().manual_seed(12))
    same = evaluate_images(a, b, feature_net=net, kid_subsets=10)
    other = evaluate_images(noise, b, features="own", feature_net=net, kid_subsets=10)
    assert same["features"] == "own (digits CNN) — not comparable to published FID"
    assert (same["n_fake"], same["n_real"], same["feature_dim"]) == (898, 899, 64)
    assert other["fid"] > 20 * same["fid"]
    assert other["kid_mean"] > 20 * abs(same["kid_mean"])
    assert min(same["precision"], same["recall"]) > 0.7 and other["precision"] < 0.2


def test_evaluate_images_needs_a_matching_feature_net(digits_net):
    x = digits_net[1][:10]
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
        evaluate_images(x, x, features="inception")
    with pytest.raises(ValueError, match="feature_net_for"):
        evaluate_images(x, x)
    with pytest.raises(ValueError, match="DigitFeatures"):
        evaluate_images(x, x, features="inception", feature_net=digits_net[0])


# -- the FID Inception -------------------------------------------------------------------------------------
def test_load_inception_names_the_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth; pass --inception PATH"):
        load_inception(tmp_path / "nothing.pth")


def test_inception_has_pytorch_fid_layout_and_loads_its_state_dict(tmp_path):
    """Keys and shapes of torchvision's Inception3 (1008 classes, no aux head), as in pytorch-fid's weights file."""
    torch.manual_seed(0)
    net = InceptionFeatures().eval()
    state = net.state_dict()
    assert len(state) == 566 and sum(k.endswith("num_batches_tracked") for k in state) == 94
    shapes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
              "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7), "Mixed_7a.branch3x3_2.bn.running_var": (320,),
              "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048)}  # fmt: skip
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    path = tmp_path / "weights.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)  # older files lack them
    with pytest.raises(ValueError, match="SHA-256"):
        load_inception(path)
    loaded = load_inception(path, check_hash=False)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        f = net.features(x)
        assert f.shape == (2, 2048) and (f >= 0).all()
        assert torch.equal(loaded.features(x), f)
        assert loaded.features(torch.zeros(1, 3, 28, 28)).shape == (1, 2048)
    result = evaluate_images(x.repeat(2, 1, 1, 1), torch.rand(4, 1, 8, 8) * 2 - 1, feature_net=loaded, pr_k=1)
    assert result["features"] == "inception (pytorch-fid compatible)" and result["feature_dim"] == 2048
    assert result["fid"] >= 0 and result["recall"] == 0.0  # fakes are 2 points; their 1-NN balls have radius 0


def test_inception_average_pool_ignores_padding_as_tensorflow():
    assert torch.equal(feats._avg_pool(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
