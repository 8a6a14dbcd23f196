"""Feature networks for image metrics: a small CNN trained here on the data, and the FID Inception-v3.

``DigitFeatures`` is a classifier trained by :func:`train_feature_net` on the labelled data set itself; its
penultimate layer gives features in which FID, KID and precision/recall are computed. Such numbers compare
models on one data set with one cached net, never with published FID. :func:`feature_net_for` trains it
once and caches it in ``cache_dir`` as ``features-<name>.safetensors`` + ``features-<name>.json`` (with the
SHA-256 of the training data, the training settings, the held-out accuracy and the SHA-256 of the weights
file); both are written atomically. ``InceptionFeatures`` is pytorch-fid's Inception-v3 (pool3, 2048-d):
published FID needs its weights file, which :func:`load_inception` reads; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..utils.io import atomic_write

__all__ = [
    "DigitFeatures",
    "FeatureNetError",
    "train_feature_net",
    "classifier_accuracy",
    "data_hash",
    "save_feature_net",
    "load_feature_net",
    "feature_net_for",
    "InceptionFeatures",
    "INCEPTION_FILE",
    "load_inception",
]

FORMAT_VERSION = 1


class DigitFeatures(nn.Module):
    """Small CNN classifier; ``features(x)`` (N, C, H, W) -> (N, feature_dim) is its penultimate layer.

    conv3x3 (width) - max-pool to 8 x 8 - conv3x3 (2 width) - max-pool to 4 x 4 - conv3x3 (4 width) - linear
    (feature_dim) - LayerNorm, then a linear classifier. The adaptive pools take any H x W (8 x 8 digits: none,
    then 2 x 2). The LayerNorm (no affine) fixes the feature scale, ||f||^2 = feature_dim, so x.y / d in KID's
    kernel is a correlation in [-1, 1], and no feature unit is dead. ``dataset`` only names the net in ``label``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 10,
        *,
        width: int = 32,
        feature_dim: int = 64,
        dataset: str = "custom",
    ):
        super().__init__()
        self.config = dict(
            in_channels=in_channels, n_classes=n_classes, width=width, feature_dim=feature_dim, dataset=dataset
        )
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(8),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(4),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 4 * w, feature_dim), nn.LayerNorm(feature_dim, elementwise_affine=False),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, n_classes)

    @property
    def label(self) -> str:
        return f"own ({self.config['dataset']} CNN) — not comparable to published FID"

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (N, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # (N, n_classes) logits


class FeatureNetError(ValueError):
    """A saved feature net is missing, truncated, corrupt, or inconsistent with its JSON."""


def train_feature_net(
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    width: int = 32,
    feature_dim: int = 64,
    seed: int = 0,
    dataset: str = "custom",
    device: str | torch.device = "cpu",
) -> DigitFeatures:
    """Train a :class:`DigitFeatures` classifier: cross entropy, AdamW, cosine learning-rate decay.

    Args: images (N, C, H, W), labels (N,) int in 0..K-1. ``seed`` fixes the initialisation and the batch
    order (the caller's global RNG is left untouched). Returns the net in eval mode, on ``device``.
    """
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)}, {tuple(labels.shape)}"
        )
    x, y = images.to(device, torch.float32), labels.to(device, torch.int64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitFeatures(x.shape[1], int(y.max()) + 1, width=width, feature_dim=feature_dim, dataset=dataset)
    net = net.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(x) / batch_size))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).to(device).split(batch_size):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def classifier_accuracy(net: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 1024) -> float:
    """Fraction of ``images`` (N, C, H, W) whose arg-max logit is the label (N,)."""
    device = next(net.parameters()).device
    hits = sum(
        int((net(xb.to(device)).argmax(1).cpu() == yb).sum())
        for xb, yb in zip(images.split(batch_size), labels.split(batch_size))
    )
    return hits / len(labels)


# -- the cache -------------------------------------------------------------------------------------------
_SETTINGS = {
    k: p.default
    for k, p in inspect.signature(train_feature_net).parameters.items()
    if p.kind is p.KEYWORD_ONLY and k not in ("dataset", "device")
}


def data_hash(images: Tensor, labels: Tensor) -> str:
    """SHA-256 of the images (as float32) and labels (as int64), their shapes included."""
    h = hashlib.sha256()
    for t in (images.detach().to("cpu", torch.float32), labels.detach().to("cpu", torch.int64)):
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.contiguous().numpy())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def save_feature_net(net: DigitFeatures, path: str | os.PathLike, meta: dict) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` (``meta``, the net's config, the weights' SHA-256) atomically."""
    path = Path(path)
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    digest = {}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp), metadata={"format": "pt"})
        digest["sha256"] = _sha256_file(tmp)

    atomic_write(path, write)
    meta = {**meta, "format_version": FORMAT_VERSION, "net": net.config, "weights_sha256": digest["sha256"]}
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def load_feature_net(path: str | os.PathLike) -> tuple[DigitFeatures, dict]:
    """``(net in eval mode, meta)`` from :func:`save_feature_net`'s files; ``FeatureNetError`` on any problem."""
    path, meta_path = Path(path), Path(path).with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a feature-net description of format_version {FORMAT_VERSION}")
        if _sha256_file(path) != meta["weights_sha256"]:
            raise ValueError("the weights file does not match the SHA-256 recorded in the JSON")
        with torch.random.fork_rng(devices=[]):
            net = DigitFeatures(**meta["net"])
        net.load_state_dict(load_file(str(path)))
    except Exception as e:  # OSError, JSON, KeyError, TypeError, safetensors and load_state_dict errors
        raise FeatureNetError(f"{path}: cannot load the feature net, missing or corrupt ({e})") from None
    return net.eval(), meta


def feature_net_for(
    dataset_name: str,
    cache_dir: str | os.PathLike,
    *,
    images: Tensor | None = None,
    labels: Tensor | None = None,
    holdout: float = 0.1,
    device: str | torch.device = "cpu",
    **train_kw,
) -> DigitFeatures:
    """The own feature net of a data set, trained once and cached in ``cache_dir``.

    ``images``/``labels`` default to ``load_images(dataset_name)``. A cached net is used when its data hash
    and settings (``train_kw`` of :func:`train_feature_net` and ``holdout``) match; otherwise the net is
    trained on all but a random ``holdout`` fraction (whose accuracy goes into the JSON as
    ``holdout_accuracy``) on ``device`` and the cache is overwritten. Files are keyed by the last path
    component of ``dataset_name``. A missing, truncated or otherwise corrupt cache (see :func:`load_feature_net`)
    is retrained with a warning rather than raising: it is derived data, and training is deterministic.
    Returns the net on the CPU, in eval mode.
    """
    if unknown := sorted(set(train_kw) - set(_SETTINGS)):
        raise TypeError(f"unknown training settings {unknown}; valid: {', '.join(_SETTINGS)}")
    if images is None:
        from ..data.images import load_images

        images, labels = load_images(dataset_name)
    if labels is None:
        raise ValueError(f"{dataset_name}: own features need class labels; use Inception features instead")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(dataset_name)).name) or "data"
    path = Path(cache_dir) / f"features-{name}.safetensors"
    settings, digest = {**_SETTINGS, **train_kw, "holdout": holdout}, data_hash(images, labels)
    if path.exists() or path.with_suffix(".json").exists():
        try:
            net, meta = load_feature_net(path)
        except FeatureNetError as e:
            warnings.warn(f"{e}; training it again", stacklevel=2)
        else:
            if meta.get("data_sha256") == digest and meta.get("settings") == settings:
                return net
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings["seed"]))
    held, kept = perm[: round(holdout * len(images))], perm[round(holdout * len(images)) :]
    start = time.perf_counter()
    net = train_feature_net(images[kept], labels[kept], dataset=name, device=device, **train_kw).cpu()
    seconds = time.perf_counter() - start
    accuracy = classifier_accuracy(net, images[held], labels[held]) if len(held) else None
    meta = {
        "dataset": str(dataset_name),
        "data_sha256": digest,
        "settings": settings,
        "n_train": len(kept),
        "n_holdout": len(held),
        "holdout_accuracy": accuracy,
        "train_seconds": round(seconds, 3),
    }
    save_feature_net(net, path, meta)
    return net


# -- Inception-v3 as in pytorch-fid (Szegedy et al. 2016; Heusel et al. 2017) ------------------------------
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
_MISSING = f"FID against published numbers needs the Inception weights file {INCEPTION_FILE}; pass --inception PATH"


class _Conv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) - batch norm (eps 1e-3) - ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class _Mixed(nn.Module):
    """An Inception block: its convolutions by torchvision's names (the state-dict keys), chained by ``run``."""

    def __init__(self, **convs):
        super().__init__()
        for name, spec in convs.items():
            setattr(self, name, _Conv(*spec))

    def run(self, x: Tensor, *names: str) -> Tensor:
        for name in names:
            x = getattr(self, name)(x)
        return x


def _avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # TensorFlow's pool ignores the zero padding


class FIDInceptionA(_Mixed):
    def __init__(self, c: int, pool_features: int):
        super().__init__(branch1x1=(c, 64, 1), branch5x5_1=(c, 48, 1), branch5x5_2=(48, 64, 5, 1, 2),
                         branch3x3dbl_1=(c, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                         branch3x3dbl_3=(96, 96, 3, 1, 1), branch_pool=(c, pool_features, 1))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        b5, dbl = self.run(x, "branch5x5_1", "branch5x5_2"), self.run(x, *(f"branch3x3dbl_{i}" for i in (1, 2, 3)))
        return torch.cat([self.branch1x1(x), b5, dbl, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(_Mixed):
    def __init__(self, c: int):
        super().__init__(branch3x3=(c, 384, 3, 2), branch3x3dbl_1=(c, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                         branch3x3dbl_3=(96, 96, 3, 2))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        dbl = self.run(x, *(f"branch3x3dbl_{i}" for i in (1, 2, 3)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, 2)], 1)


class FIDInceptionC(_Mixed):
    def __init__(self, c: int, channels_7x7: int):
        c7, row, col = channels_7x7, ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
        super().__init__(branch1x1=(c, 192, 1), branch7x7_1=(c, c7, 1), branch7x7_2=(c7, c7, *row),
                         branch7x7_3=(c7, 192, *col), branch7x7dbl_1=(c, c7, 1), branch7x7dbl_2=(c7, c7, *col),
                         branch7x7dbl_3=(c7, c7, *row), branch7x7dbl_4=(c7, c7, *col),
                         branch7x7dbl_5=(c7, 192, *row), branch_pool=(c, 192, 1))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.run(x, "branch7x7_1", "branch7x7_2", "branch7x7_3")
        dbl = self.run(x, *(f"branch7x7dbl_{i}" for i in range(1, 6)))
        return torch.cat([self.branch1x1(x), b7, dbl, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(_Mixed):
    def __init__(self, c: int):
        super().__init__(branch3x3_1=(c, 192, 1), branch3x3_2=(192, 320, 3, 2), branch7x7x3_1=(c, 192, 1),
                         branch7x7x3_2=(192, 192, (1, 7), 1, (0, 3)), branch7x7x3_3=(192, 192, (7, 1), 1, (3, 0)),
                         branch7x7x3_4=(192, 192, 3, 2))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.run(x, *(f"branch7x7x3_{i}" for i in range(1, 5)))
        return torch.cat([self.run(x, "branch3x3_1", "branch3x3_2"), b7, F.max_pool2d(x, 3, 2)], 1)


class FIDInceptionE_1(_Mixed):
    pool = staticmethod(_avg_pool)

    def __init__(self, c: int):
        row, col = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
        super().__init__(branch1x1=(c, 320, 1), branch3x3_1=(c, 384, 1), branch3x3_2a=(384, 384, *row),
                         branch3x3_2b=(384, 384, *col), branch3x3dbl_1=(c, 448, 1),
                         branch3x3dbl_2=(448, 384, 3, 1, 1), branch3x3dbl_3a=(384, 384, *row),
                         branch3x3dbl_3b=(384, 384, *col), branch_pool=(c, 192, 1))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        b3, dbl = self.branch3x3_1(x), self.run(x, "branch3x3dbl_1", "branch3x3dbl_2")
        b3, dbl = [self.branch3x3_2a(b3), self.branch3x3_2b(b3)], [self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)]
        return torch.cat([self.branch1x1(x), *b3, *dbl, self.branch_pool(self.pool(x))], 1)


class FIDInceptionE_2(FIDInceptionE_1):
    pool = staticmethod(lambda x: F.max_pool2d(x, 3, 1, 1))  # max, not average: as in the TF graph pytorch-fid ports


class InceptionFeatures(nn.Module):
    """pytorch-fid's FID Inception-v3; ``features(x)`` gives its pool3 features (N, 2048).

    Module names are torchvision's, so pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` loads as
    is (see :func:`load_inception`); ``fc`` (1008 classes) is kept only for that. ``x`` (N, 1 or 3, H, W)
    in [-1, 1] is resized to 299 x 299 (bilinear, as pytorch-fid; its 2 x - 1 on [0, 1] input is our
    range already); one channel is repeated to three, as PIL's grey-to-RGB conversion does.
    """

    label = "inception (pytorch-fid compatible)"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = _Conv(3, 32, 3, 2), _Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = _Conv(32, 64, 3, 1, 1), _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = FIDInceptionA(192, 32), FIDInceptionA(256, 64)
        self.Mixed_5d, self.Mixed_6a = FIDInceptionA(288, 64), InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), FIDInceptionE_1(1280), FIDInceptionE_2(2048)
        self.fc = nn.Linear(2048, 1008)

    def features(self, x: Tensor) -> Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # (N, 2048, 8, 8) at the end
        return x.mean((2, 3))  # (N, 2048)

    forward = features


def load_inception(path: str | os.PathLike | None, *, check_hash: bool = True) -> InceptionFeatures:
    """:class:`InceptionFeatures` with pytorch-fid's weights from ``path`` (its ``INCEPTION_FILE``), in eval mode.

    The file's SHA-256 must start with 6726825d, the prefix in its name (the ``torch.hub`` convention),
    unless ``check_hash=False``. Every weight must be present with its shape; BatchNorm's
    ``num_batches_tracked`` counters, unused in eval mode, may be absent (files from older PyTorch).
    Raises FileNotFoundError when there is no file, ValueError when it is another one.
    """
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(_MISSING + (f" ({path}: no such file)" if path is not None else ""))
    prefix = INCEPTION_FILE.rsplit("-", 1)[1].removesuffix(".pth")
    if check_hash and not (digest := _sha256_file(Path(path))).startswith(prefix):
        raise ValueError(
            f"{path}: SHA-256 {digest[:8]}... is not that of {INCEPTION_FILE} ({prefix}...); "
            "load_inception(path, check_hash=False) loads it anyway"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.random.fork_rng(devices=[]):
            net = InceptionFeatures()
        result = net.load_state_dict(state, strict=False)  # still raises on a wrong shape
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise KeyError(f"missing keys {missing[:3]}, unexpected keys {result.unexpected_keys[:3]}")
    except Exception as e:  # unpickling refused, truncated file, not a dict, missing or unexpected keys, shapes
        raise ValueError(f"{path}: not pytorch-fid's Inception state dict ({e})") from None
    return net.eval()
