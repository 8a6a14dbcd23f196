"""Reading image data sets from files: IDX (MNIST), CIFAR-10 batches, image folders and ``.npz`` arrays.

Every loader returns float32 images of shape (N, C, H, W) scaled to [-1, 1] (uint8 0 -> -1, 255 -> 1)
and, where the format has them, int64 labels of shape (N,); a malformed file fails with an error that
names the path and what was expected. No loader touches the network or runs code stored in a file.
"""

from __future__ import annotations

import errno
import gzip
import operator
import os
import pickle
import stat
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS", "load_cifar10", "load_idx", "load_idx_folder", "load_image_folder", "load_npz", "read_image",
    "read_mask",
]  # fmt: skip

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(_SPLITS)}")


def _from_uint8(array: np.ndarray) -> Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1]: 0 -> -1, 255 -> 1 exactly."""
    return torch.from_numpy(array.astype(np.float32)).div_(127.5).sub_(1.0)  # astype copies: a writable array


# --- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------------
# Magic number: two zero bytes, the element type (0x08 = unsigned byte) and the number of dimensions,
# followed by one big-endian uint32 per dimension and the row-major data (LeCun et al., MNIST page).
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
_IDX_KINDS = {_IDX_IMAGES: "images: unsigned bytes, 3 dimensions", _IDX_LABELS: "labels: unsigned bytes, 1 dimension"}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip signature: detect by content, not by suffix
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:  # BadGzipFile is an OSError; a cut-off stream an EOFError
            raise ValueError(f"{path}: corrupt or truncated gzip file ({err})") from None
    want = f"0x{magic:08x} ({_IDX_KINDS[magic]})"
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes); expected a 4-byte magic number {want}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        other = f"; 0x{found:08x} is an IDX {_IDX_KINDS[found].split(':')[0]} file" if found in _IDX_KINDS else ""
        raise ValueError(f"{path}: wrong IDX magic number 0x{found:08x}, expected {want}{other}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes); expected {header} for {ndim} dimensions")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size, got = int(np.prod(dims)), len(raw) - header
    if got != size:
        what = "truncated IDX file" if got < size else "IDX file has trailing bytes"
        shape = " x ".join(map(str, dims))
        raise ValueError(f"{path}: {what}: the header declares {shape} = {size} data bytes, found {got}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(
    images_path: str | os.PathLike, labels_path: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor | None]:
    """MNIST-style IDX files, raw or gzip-compressed (detected by content).

    Returns ``(images (N, 1, H, W) float32 in [-1, 1], labels (N,) int64 or None)``.
    """
    images = _read_idx(Path(images_path), _IDX_IMAGES)
    x = _from_uint8(images[:, None])
    if labels_path is None:
        return x, None
    labels = _read_idx(Path(labels_path), _IDX_LABELS)
    if len(labels) != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return x, torch.from_numpy(labels.astype(np.int64))


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: missing {stem} (or {stem}.gz)")


def load_idx_folder(folder: str | os.PathLike, split: str = "train") -> tuple[Tensor, Tensor]:
    """A folder with the four MNIST / Fashion-MNIST files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``)."""
    _check_split(split)
    folder, prefix = Path(folder), "train" if split == "train" else "t10k"
    x, y = load_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"), _idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
    assert y is not None
    return x, y


# --- CIFAR-10 python batches -------------------------------------------------------------------------
def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to write bytes at pickle protocol <= 2, and nothing else."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core to numpy._core
    reconstruct, frombuffer = core.multiarray._reconstruct, core.numeric._frombuffer
    return {
        **{(f"numpy.{c}.multiarray", "_reconstruct"): reconstruct for c in ("core", "_core")},
        **{(f"numpy.{c}.numeric", "_frombuffer"): frombuffer for c in ("core", "_core")},  # protocol 5
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild dicts, lists, bytes and numpy arrays, and nothing else.

    ``pickle.load`` imports and calls any global a file names (``os.system``, ``builtins.eval``, ...), so
    a downloaded "data" file could run arbitrary code. Dicts, lists, ints and bytes need no globals at
    all; a numpy array needs only the reconstruction functions, ``numpy.ndarray`` and ``numpy.dtype``
    (plus ``_codecs.encode`` restricted to latin-1, which Python 3 uses for bytes at protocol <= 2).
    Every other global raises ``pickle.UnpicklingError`` before anything is called.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _allowed_globals()[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not a plain data object") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
    with open(path, "rb") as fh:
        try:
            # encoding="bytes": the batches were pickled by Python 2; its str keys become bytes.
            batch = _RestrictedUnpickler(fh, encoding="bytes").load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path}: not a CIFAR-10 batch: {err}") from None
        except Exception as err:  # a damaged pickle can fail in many ways (EOFError, KeyError, struct.error, ...)
            raise ValueError(f"{path}: corrupt or truncated CIFAR-10 batch ({type(err).__name__}: {err})") from None
    get = (lambda k: batch.get(k.encode(), batch.get(k))) if isinstance(batch, dict) else (lambda k: None)
    data, labels = get("data"), get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"shape {data.shape}, dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: expected b'data' as a uint8 array of shape (N, 3072), got {got}")
    n = len(labels) if isinstance(labels, (list, np.ndarray)) else type(labels).__name__
    if n != len(data) or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 9 for v in labels):
        got = f"{n} values" if n != len(data) else "a value that is not an integer in 0..9"
        raise ValueError(f"{path}: expected b'labels' as {len(data)} integers in 0..9, got {got}")
    return data, np.asarray(labels, dtype=np.int64)


def load_cifar10(folder: str | os.PathLike, split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-10 python batches (Krizhevsky 2009): ``data_batch_1..5`` (train) or ``test_batch`` (test).

    ``folder`` is ``cifar-10-batches-py`` or the folder that holds it. Returns
    ``(images (N, 3, 32, 32) float32 in [-1, 1], labels (N,) int64)``; N = 50000 / 10000.
    """
    _check_split(split)
    folder = Path(folder)
    if not (folder / "data_batch_1").is_file() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    batches = [_read_cifar_batch(folder / name) for name in names]
    data = np.concatenate([b[0] for b in batches])  # each row: 1024 R, 1024 G, 1024 B values, row-major
    labels = np.concatenate([b[1] for b in batches])
    return _from_uint8(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


# --- image folders -----------------------------------------------------------------------------------
def _stat(path: Path) -> os.stat_result | None:
    """``os.stat`` through symbolic links; None for a dangling link; a ValueError naming a link loop."""
    try:
        return path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"{path}: symbolic link loop (the link leads back to itself); remove or fix it") from None
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return None  # a dangling link (or a file removed meanwhile): not an image
        raise


def _identity(st: os.stat_result) -> tuple[int, int]:
    """What makes two paths the same folder, whatever links lead there."""
    return st.st_dev, st.st_ino


def _image_files(
    folder: Path, extensions: Sequence[str], recursive: bool, ancestors: dict[tuple[int, int], Path] | None = None
) -> list[Path]:
    """The image files in ``folder`` (and, if ``recursive``, below it), sorted; symbolic links are followed.

    A link to a folder that contains it (``cat/up -> ..``) would make a recursive walk endless, or list the same
    images again under another name: it is refused, naming the link and the folder it leads back to.
    ``ancestors`` maps the (device, inode) of every folder on the way down to its path.
    """
    key = _identity(folder.stat())
    if ancestors and key in ancestors:
        raise ValueError(
            f"{folder}: symbolic link loop: it leads back to {ancestors[key]}, which contains it; "
            "remove the link or point it outside the image folder"
        )
    ancestors = {**(ancestors or {}), key: folder}
    files = []
    for path in folder.iterdir():
        st = _stat(path)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                files += _image_files(path, extensions, True, ancestors)
        elif stat.S_ISREG(st.st_mode) and path.suffix.lower() in extensions:
            files.append(path)
    return sorted(files)


def _load_image(path: Path, size: int, mode: str) -> np.ndarray:
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise ImportError("load_image_folder needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # palette transparency: convert via RGBA, as PIL asks
            im = ImageOps.exif_transpose(im).convert(mode)  # camera photos store their rotation in EXIF
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from None
    # Resize the shorter side to `size` (bicubic, antialiased when shrinking), then center-crop.
    w, h = im.size
    scale = size / min(w, h)
    new = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
    im = im.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8).reshape(size, size, -1)


def read_image(path: str | os.PathLike, channels: int) -> Tensor:
    """One image file at its own size, as float32 (channels, H, W) in [-1, 1] (1: gray, 3: RGB; converted as
    PIL converts: gray = ITU-R 601 luma, gray to RGB by repetition)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise ImportError("read_image needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            im = ImageOps.exif_transpose(im).convert("RGB" if channels == 3 else "L")
            array = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from None
    array = array.reshape(*array.shape[:2], -1).transpose(2, 0, 1)
    return _from_uint8(array[None])[0]


def read_mask(path: str | os.PathLike) -> Tensor:
    """A mask image as (H, W) booleans: True where the gray level is at least half (white), False where dark."""
    return read_image(path, 1)[0] >= 0


def load_image_folder(
    folder: str | os.PathLike, size: int, *, channels: int = 3, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[Tensor, Tensor | None, list[str]]:
    """Every image in ``folder``, resized (shorter side to ``size``) and center-cropped to ``size x size``.

    Either the images lie directly in ``folder`` (unlabelled) or in class subfolders, searched
    recursively (``folder/cat/*.png``, ...): labels are indices into the sorted subfolder names,
    counting only subfolders that hold images. Files are read in sorted path order.

    Returns ``(images (N, channels, size, size) float32 in [-1, 1], labels (N,) int64 or None, classes)``.
    """
    folder, size = Path(folder), operator.index(size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    st = _stat(folder)  # a ValueError if `folder` is itself a link loop
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise FileNotFoundError(f"image folder not found: {folder}")
    extensions = tuple(e.lower() for e in extensions)
    files, classes, labels = _image_files(folder, extensions, recursive=False), [], None
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = {_identity(folder.stat()): folder}  # a class folder may not lead back here either
    per_class = {d.name: _image_files(d, extensions, recursive=True, ancestors=top) for d in subdirs}
    per_class = {name: paths for name, paths in per_class.items() if paths}
    if files and per_class:
        raise ValueError(f"{folder}: holds both images and class subfolders ({', '.join(per_class)}); use one layout")
    if per_class:
        classes = list(per_class)
        files = [p for paths in per_class.values() for p in paths]
        labels = torch.tensor([i for i, paths in enumerate(per_class.values()) for _ in paths], dtype=torch.int64)
    if not files:
        raise ValueError(f"{folder}: no images found; expected files ending in {', '.join(extensions)}")
    mode = "RGB" if channels == 3 else "L"
    array = np.stack([_load_image(p, size, mode) for p in files])  # (N, size, size, C)
    return _from_uint8(array.transpose(0, 3, 1, 2)), labels, classes


# --- .npz arrays -------------------------------------------------------------------------------------
def _to_unit_range(path: Path, array: np.ndarray) -> Tensor:
    """Integers 0..255 -> [-1, 1]; floats in [0, 1] -> [-1, 1]; floats already in [-1, 1] kept."""
    if array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"{path}: integer images must lie in 0..255, got {array.min()}..{array.max()}")
        return _from_uint8(array.astype(np.uint8))
    if array.dtype.kind != "f":
        raise ValueError(f"{path}: expected uint8 or float images, got dtype {array.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{path}: images contain NaN or inf")
    lo, hi = (x.min().item(), x.max().item()) if x.numel() else (0.0, 0.0)
    if lo >= 0 and hi <= 1:
        return x.mul_(2).sub_(1)
    if lo >= -1 and hi <= 1:
        return x
    raise ValueError(f"{path}: float images must lie in [0, 1] or [-1, 1], got values in [{lo:g}, {hi:g}]")


def _to_nchw(path: Path, array: np.ndarray, layout: str | None) -> np.ndarray:
    shape = tuple(array.shape)
    expected = "expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3"
    if layout not in (None, "NCHW", "NHWC"):
        raise ValueError(f"unknown layout {layout!r}; valid choices: NCHW, NHWC")
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{path}: cannot read an array of shape {shape} as images; {expected}")
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if layout is None and first and last:
        raise ValueError(f"{path}: ambiguous image layout for shape {shape}; pass layout='NCHW' or layout='NHWC'")
    layout = layout or ("NCHW" if first else "NHWC" if last else None)
    if layout is None or not (first if layout == "NCHW" else last):
        raise ValueError(f"{path}: cannot read an array of shape {shape} as {layout or 'images'}; {expected}")
    return array if layout == "NCHW" else array.transpose(0, 3, 1, 2)


def load_npz(
    path: str | os.PathLike, key: str | None = None, *, labels_key: str | None = None, layout: str | None = None
) -> tuple[Tensor, Tensor | None]:
    """Images from an ``.npz`` file: (N, H, W), (N, H, W, C) or (N, C, H, W), C = 1 or 3.

    ``key`` names the image array; by default the only array, else the one named ``"images"``.
    ``labels_key`` names a 1-D integer label array; by default ``"labels"`` if the file has one.
    The layout is detected from where a size of 1 or 3 sits; pass ``layout="NCHW"`` / ``"NHWC"`` when
    both fit, e.g. shape (N, 3, 4, 3). uint8 (or integer 0..255) maps to [-1, 1]; float arrays in
    [0, 1] map to [-1, 1], float arrays in [-1, 1] (with a negative value) are kept as they are.

    Returns ``(images (N, C, H, W) float32 in [-1, 1], labels (N,) int64 or None)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    if not zipfile.is_zipfile(path):  # np.load would try an .npy array or a pickle instead
        raise ValueError(f"{path}: not an .npz archive (as written by np.savez)")
    arrays, name = {}, None
    try:
        # allow_pickle=False: an .npz file from elsewhere must not be able to run code on load.
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                arrays[name] = npz[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        what = f"array {name!r} is not" if name is not None else "not"
        if "pickle" in str(err):  # numpy's message suggests allow_pickle=True, which would run any code in it
            raise ValueError(
                f"{path}: {what} plain numeric data: it holds pickled Python objects, which are never loaded "
                "(unpickling can run code)"
            ) from None
        raise ValueError(f"{path}: {what} plain numeric data ({type(err).__name__}: {err})") from None
    for name, array in arrays.items():  # np.load hands over the raw bytes of a member that is no .npy array
        if not isinstance(array, np.ndarray):
            kind = "a pickle" if array[:1] == b"\x80" else f"bytes starting {array[:8]!r}"
            raise ValueError(
                f"{path}: member {name!r} is not a .npy array but {kind}; an .npz file holds only the arrays "
                "np.savez writes, and this one is not read"
            )
    if key is None:
        key = next(iter(arrays)) if len(arrays) == 1 else "images" if "images" in arrays else None
    if key not in arrays:
        what = f"no array {key!r}" if key is not None else "several arrays and none named 'images'"
        raise ValueError(f"{path}: {what}; pass key=<one of {', '.join(arrays)}>" if arrays else f"{path}: no arrays")
    images = _to_nchw(path, arrays[key], layout)
    if labels_key is None:
        labels_key = "labels" if "labels" in arrays and key != "labels" else None
    if labels_key is None:
        return _to_unit_range(path, images), None
    if labels_key not in arrays:
        raise ValueError(f"{path}: no array {labels_key!r}; valid choices: {', '.join(arrays)}")
    labels = arrays[labels_key]
    if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        got = f"shape {labels.shape}, dtype {labels.dtype}"
        raise ValueError(f"{path}: expected {labels_key!r} as {len(images)} integer labels, got {got}")
    return _to_unit_range(path, images), torch.from_numpy(labels.astype(np.int64))
