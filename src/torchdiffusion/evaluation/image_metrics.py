"""Image sample-quality metrics in a feature space: FID, KID and precision/recall.

The metrics take features (N, D) from a feature network (:mod:`.nets.features`): either the library's own
small CNN trained on the data set (numbers comparable between models on that data set only), or pytorch-fid's
Inception-v3 pool3 features loaded from its weights file (numbers comparable with published FID).
All statistics are computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .features import InceptionFeatures, load_inception

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "kernel_inception_distance",
    "precision_recall",
    "extract_features",
    "evaluate_images",
]


def _f64(a) -> Tensor:
    return torch.as_tensor(a).detach().to("cpu", torch.float64)


def feature_statistics(features) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of ``features`` (N, D), as ``np.cov(rowvar=False)``; float64."""
    f = _f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected features (N, D) with N >= 2, got shape {tuple(f.shape)}")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrt_psd(s: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, Eq. 6; Dowson & Landau 1982).

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}). S1 S2 is not symmetric, but it is similar to
    M = S1^{1/2} S2 S1^{1/2}, which is symmetric PSD (and S1 S2 = S1^{1/2} (S1^{1/2} S2) shares its
    eigenvalues even for singular S1), so Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(M)): two symmetric eigen-
    decompositions in float64, exact for singular covariances, with no eps offset and no complex round-off
    as in ``scipy.linalg.sqrtm``. Args: mu (D,), sigma (D, D). Returns d^2 >= 0 (rounding clipped) as a float.
    """
    mu1, mu2, s1, s2 = (_f64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (*mu1.shape, *mu1.shape):
        raise ValueError(
            f"inconsistent shapes: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; sigma "
            f"{tuple(s1.shape)}, {tuple(s2.shape)}"
        )
    root = _sqrt_psd(s1)
    m = root @ s2 @ root
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return max(float(d2), 0.0)


def kernel_inception_distance(
    f1, f2, *, subsets: int = 100, subset_size: int = 1000, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018, Sec. 4): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3; mean and std over subsets.

    Each subset draws m = min(subset_size, N1, N2) rows of each set without replacement; the unbiased
    estimate (Gretton et al. 2012, Eq. 3) drops the diagonals of k(X, X) and k(Y, Y):
    MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2.
    The std is over subsets (ddof 0, as torch-fidelity). Args: f1 (N1, D), f2 (N2, D). Returns (mean, std).
    """
    x, y = _f64(f1), _f64(f2)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected features (N1, D) and (N2, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    m, d = min(subset_size, len(x), len(y)), x.shape[1]
    if m < 2:
        raise ValueError(f"KID needs at least 2 examples per set, got {len(x)} and {len(y)}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)  # fixed subsets: the metric is repeatable
    mmds = []
    for _ in range(subsets):
        xs = x[torch.randperm(len(x), generator=generator)[:m]]
        ys = y[torch.randperm(len(y), generator=generator)[:m]]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((xs, xs), (ys, ys), (xs, ys)))
        within = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        mmds.append(within - 2 * kxy.mean())
    mmds = torch.stack(mmds)
    return float(mmds.mean()), float(mmds.std(correction=0))


def _kth_neighbour_distance(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance of each row of x (N, D) to its k-th nearest other row (N,); a row's distance 0 to itself is skipped."""
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def _covered(points: Tensor, centers: Tensor, radii: Tensor, chunk: int) -> float:
    """Fraction of points (N, D) inside at least one ball B(centers_j, radii_j)."""
    inside = [(torch.cdist(c, centers) <= radii).any(1) for c in points.split(chunk)]
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(real_feats, fake_feats, *, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eqs. 1-3).

    The manifold of a set is the union of balls around its points, each with radius the distance to the
    point's k-th nearest neighbour in the set (itself excluded). Precision is the fraction of fake points
    inside the real manifold, recall the fraction of real points inside the fake one. Identical sets give
    (1, 1); far-apart sets (0, 0). Args: real_feats (N, D), fake_feats (M, D), N, M > k. Returns (precision, recall).
    """
    real, fake = _f64(real_feats), _f64(fake_feats)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected features (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(f"need 1 <= k < number of points in each set, got k = {k}, {len(real)} and {len(fake)}")
    precision = _covered(fake, real, _kth_neighbour_distance(real, k, chunk), chunk)
    recall = _covered(real, fake, _kth_neighbour_distance(fake, k, chunk), chunk)
    return precision, recall


@torch.no_grad()
def extract_features(net: nn.Module, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """``net.features`` (or ``net``) of images (N, C, H, W), in batches, in eval mode: (N, D) float64 on the CPU."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    fn = getattr(net, "features", net)
    try:
        out = [fn(xb.to(device, torch.float32)).reshape(len(xb), -1) for xb in images.split(batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(out).to("cpu", torch.float64)


def evaluate_images(
    fake: Tensor,
    real: Tensor,
    *,
    features: str = "auto",
    feature_net: nn.Module | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> dict:
    """FID, KID and precision/recall of generated images against real ones, in one feature space.

    Args:
        fake (M, C, H, W), real (N, C, H, W): images in [-1, 1] (both are clamped to it, like saving to PNG).
        features: "own" (a :class:`~.nets.features.DigitFeatures`, e.g. from ``feature_net_for``),
            "inception" (``load_inception(path)``), or "auto" (whichever ``feature_net`` is).
        feature_net: the network; required ("inception" without it raises FileNotFoundError saying
            which weights file is needed).
        kid_subsets, kid_subset_size, generator: see :func:`kernel_inception_distance`.
        pr_k: k of :func:`precision_recall`.
    Returns a dict: fid, kid_mean, kid_std, precision, recall, n_fake, n_real, feature_dim and features,
    a label saying which features were used, e.g. "own (digits CNN) — not comparable to published FID"
    or "inception (pytorch-fid compatible)".
    """
    if features not in ("auto", "own", "inception"):
        raise ValueError(f"features must be 'auto', 'own' or 'inception', got {features!r}")
    if feature_net is None:
        if features == "inception":
            load_inception(None)  # raises, naming the weights file
        raise ValueError(
            "evaluate_images needs feature_net: feature_net_for(dataset, cache_dir) (own features, trained on the "
            "data set) or load_inception(path) (FID comparable with published numbers)"
        )
    kind = "inception" if isinstance(feature_net, InceptionFeatures) else "own"
    if features not in ("auto", kind):
        raise ValueError(f"features={features!r}, but feature_net is a {type(feature_net).__name__}")
    if fake.ndim != 4 or fake.shape[1:] != real.shape[1:]:
        raise ValueError(
            f"expected fake and real images (N, C, H, W) alike, got {tuple(fake.shape)}, {tuple(real.shape)}"
        )
    f_fake, f_real = (extract_features(feature_net, x.clamp(-1, 1), batch_size=batch_size) for x in (fake, real))
    kid_mean, kid_std = kernel_inception_distance(
        f_fake, f_real, subsets=kid_subsets, subset_size=kid_subset_size, generator=generator
    )
    precision, recall = precision_recall(f_real, f_fake, k=pr_k)
    default = "own (custom network) — not comparable to published FID"
    return {
        "fid": frechet_distance(*feature_statistics(f_fake), *feature_statistics(f_real)),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "n_fake": len(fake),
        "n_real": len(real),
        "feature_dim": f_fake.shape[1],
        "features": getattr(feature_net, "label", default),
    }
