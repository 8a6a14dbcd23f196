"""Image data sets as plain tensors: built-in digits, user files, augmentation and opt-in downloads.

Images are float32 tensors of shape (N, C, H, W) scaled to [-1, 1]; labels, where a format has them,
are int64 tensors of shape (N,). A training loop draws batches by index, ``x[idx]``. The file formats
are read by :mod:`.image_files`; nothing here touches the network unless :func:`download` is called.
"""

from __future__ import annotations

import hashlib
import http.client
import operator
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import torch
import torch.nn.functional as F
from torch import Tensor

from .image_files import load_cifar10, load_idx, load_idx_folder, load_image_folder, load_npz
from .shapes import load_shapes

__all__ = ["DOWNLOADABLE", "IMAGE_DATASETS", "download", "load_digits", "load_images", "random_flip"]


def load_digits(size: int = 8, *, pad_to: int | None = None) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8 x 8 handwritten digits (UCI optdigits test set; no download).

    Pixel counts 0..16 map linearly to [-1, 1] (x / 8 - 1). ``size != 8`` resizes bilinearly
    (``F.interpolate``, antialiased when shrinking); ``pad_to`` then pads with the background value -1
    to ``pad_to x pad_to``, centered (extra row / column at the bottom / right), keeping every pixel.

    Returns:
        ``(images (1797, 1, H, W) float32, labels (1797,) int64 in 0..9)``, H = W = ``pad_to or size``.
    """
    size = operator.index(size)  # rejects floats such as 16.0 instead of silently truncating
    pad_to = operator.index(pad_to) if pad_to is not None else None
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if pad_to is not None and pad_to < size:
        raise ValueError(f"pad_to must be >= size ({size}), got {pad_to}")
    try:
        from sklearn.datasets import load_digits as _sklearn_digits
    except ImportError:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from None
    bunch = _sklearn_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8 - 1  # (1797, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
        x = x.clamp_(-1.0, 1.0)
    if pad_to is not None:
        before = (pad_to - size) // 2
        after = pad_to - size - before
        x = F.pad(x, (before, after, before, after), value=-1.0)
    return x, torch.as_tensor(bunch.target, dtype=torch.int64)


def random_flip(x: Tensor, generator: torch.Generator | None = None, *, p: float = 0.5) -> Tensor:
    """Flip each example left-right with probability ``p`` (the usual augmentation, e.g. DDPM on CIFAR-10).

    Example ``i`` is flipped iff ``u[i] < p`` with ``u = torch.rand(N, generator=generator)``, so one
    generator state gives one set of flips. ``x`` (N, ..., W) is not modified.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch of shape (N, ..., W), got shape {tuple(x.shape)}")
    device = generator.device if generator is not None else x.device
    flip = (torch.rand(x.shape[0], generator=generator, device=device) < p).to(x.device)
    return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


IMAGE_DATASETS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "digits": partial(load_digits, 8),
    "digits16": partial(load_digits, 16),
    "shapes16": partial(load_shapes, 16),  # coloured shapes (data.shapes), 8192 by default, 24 classes
    "shapes32": partial(load_shapes, 32),
}

_PATH_KINDS = (
    "an image folder, a CIFAR-10 batches folder (with data_batch_1), an MNIST folder "
    "(with train-images-idx3-ubyte[.gz]), an .npz file or an IDX file (*-ubyte, *-ubyte.gz)"
)


def load_images(spec: str | os.PathLike, **kw) -> tuple[Tensor, Tensor | None]:
    """A built-in image data set by name, or image data at a path; ``kw`` go to the loader.

    * a name of :data:`IMAGE_DATASETS` -> :func:`load_digits` or :func:`.shapes.load_shapes` (``n=``, ``seed=``);
    * a folder with ``data_batch_1`` (itself or in ``cifar-10-batches-py/``) -> :func:`load_cifar10`
      (``split=``); with ``train-images-idx3-ubyte[.gz]`` -> :func:`load_idx_folder` (``split=``);
      any other folder -> :func:`load_image_folder` (``size=`` required; class names are dropped);
    * ``*.npz`` -> :func:`load_npz`; ``*-ubyte`` / ``*-ubyte.gz`` -> :func:`load_idx`, with the
      labels file next to it (``...-images-idx3-...`` -> ``...-labels-idx1-...``) when there is one.

    Returns ``(images (N, C, H, W) float32 in [-1, 1], labels (N,) int64 or None)``.
    """
    if isinstance(spec, str) and spec in IMAGE_DATASETS:
        return IMAGE_DATASETS[spec](**kw)
    path = Path(spec)
    if path.is_dir():
        if (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py" / "data_batch_1").is_file():
            return load_cifar10(path, **kw)
        if any((path / f"train-images-idx3-ubyte{gz}").is_file() for gz in ("", ".gz")):
            return load_idx_folder(path, **kw)
        if "size" not in kw:
            raise TypeError(f"{path}: loading an image folder needs size=<side length in pixels>")
        return load_image_folder(path, **kw)[:2]
    name = path.name.lower()
    if path.is_file() and name.endswith(".npz"):
        return load_npz(path, **kw)
    if path.is_file() and name.endswith(("-ubyte", "-ubyte.gz")):
        labels = path.with_name(path.name.replace("-images-idx3-", "-labels-idx1-"))
        if "labels_path" not in kw and labels != path and labels.is_file():
            kw["labels_path"] = labels
        return load_idx(path, **kw)
    reason = "not found" if not path.exists() else "not a built-in name or a supported file"
    raise ValueError(
        f"unknown image data set {str(spec)!r} ({reason}); built-in names: {', '.join(IMAGE_DATASETS)}; "
        f"or a path to {_PATH_KINDS}"
    )


# --- opt-in downloads --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    folder: str  # under root
    mirrors: tuple[str, ...]  # tried in order until one answers
    files: dict[str, str]  # file name -> published hex digest (32 hex digits: MD5, 64: SHA256)


# The MD5 values are the ones each source publishes (Fashion-MNIST README, CIFAR-10 page) or, for
# MNIST, whose page lists none, those torchvision verifies against.
_SOURCES = {
    "mnist": _Source(
        "mnist",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": _Source(
        "fashion-mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "cifar10": _Source(
        ".", ("https://www.cs.toronto.edu/~kriz/",), {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
    ),
}
DOWNLOADABLE: tuple[str, ...] = tuple(_SOURCES)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_MEMBERS = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_HASHES = {32: "md5", 64: "sha256"}
_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


def _hasher(digest: str):
    try:
        return hashlib.new(_HASHES[len(digest)])
    except KeyError:
        raise ValueError(f"checksum {digest!r}: expected 32 (MD5) or 64 (SHA256) hex digits") from None


def _digest_of(path: Path, digest: str) -> str:
    h = _hasher(digest)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(target: Path, stream: IO[bytes], digest: str | None = None, url: str = "") -> None:
    """Copy ``stream`` to a temporary file next to ``target``, check ``digest``, then ``os.replace``."""
    h = _hasher(digest) if digest else None
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(1 << 20):
                out.write(chunk)
                if h is not None:
                    h.update(chunk)
        if h is not None and h.hexdigest() != digest.lower():
            raise ValueError(
                f"checksum mismatch for {url}: expected {h.name} {digest.lower()}, got {h.hexdigest()}; "
                "nothing was saved (a damaged or changed download)"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fetch(source: _Source, name: str, target: Path, digest: str) -> None:
    failures = []
    for url in (mirror + name for mirror in source.mirrors):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                _write_atomic(target, response, digest, url)
            return
        except _NETWORK_ERRORS as err:  # HTTPError's str has the status code; URLError's reason the cause
            reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
            failures.append(f"could not reach {url}: {reason}")
    raise ConnectionError(f"{'; '.join(failures)}; download the files by hand into {target.parent} and pass the folder")


def download(name: str, root: str | os.PathLike, *, checksums: Mapping[str, str] | None = None) -> Path:
    """Download ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"`` into ``root``; return the folder to load.

    The only function here that uses the network. Each file is verified against its published
    checksum (``checksums`` maps file names to hex digests that replace those, e.g. for a mirror) and
    written atomically (temporary file + ``os.replace``), so an interrupted or corrupted download never
    leaves a partial file. Files already present with the right checksum are not fetched again.
    CIFAR-10's archive is kept, and its batches are extracted into ``root/cifar-10-batches-py``.

    Raises:
        ConnectionError: no mirror could be reached (the message lists each URL and why).
        ValueError: unknown ``name`` or file in ``checksums``, or a checksum mismatch.
    """
    if name not in _SOURCES:
        raise ValueError(f"unknown downloadable data set {name!r}; valid choices: {', '.join(DOWNLOADABLE)}")
    source = _SOURCES[name]
    unknown = sorted(set(checksums or {}) - set(source.files))
    if unknown:
        raise ValueError(f"checksums for unknown files {unknown}; valid choices: {', '.join(source.files)}")
    folder = Path(root) / source.folder
    if name == "cifar10" and all((folder / _CIFAR_DIR / m).is_file() for m in _CIFAR_MEMBERS):
        return folder / _CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for file, digest in {**source.files, **(checksums or {})}.items():
        target = folder / file
        if not (target.is_file() and _digest_of(target, digest) == digest.lower()):
            _fetch(source, file, target, digest)
    if name != "cifar10":
        return folder
    out = folder / _CIFAR_DIR
    out.mkdir(exist_ok=True)
    archive = folder / next(iter(source.files))
    with tarfile.open(archive, "r:gz") as tar:
        for member in _CIFAR_MEMBERS:  # named members only: no path from the archive reaches the disk
            try:
                info = tar.getmember(f"{_CIFAR_DIR}/{member}")
            except KeyError:
                raise ValueError(f"{archive}: missing {_CIFAR_DIR}/{member}") from None
            stream = tar.extractfile(info) if info.isfile() else None
            if stream is None:
                raise ValueError(f"{archive}: {_CIFAR_DIR}/{member} is not a regular file")
            with stream:
                _write_atomic(out / member, stream)
    return out


def is_image_spec(spec: str) -> bool:
    """Whether ``load_images`` reads ``spec``: a built-in image set, a folder, an .npz or an IDX file."""
    name = spec.lower()
    return spec in IMAGE_DATASETS or Path(spec).is_dir() or name.endswith((".npz", "-ubyte", "-ubyte.gz"))
