"""Tests for torchdiffusion.data.images / image_files: every file a loader reads is written here, so each
expected tensor is known exactly (uint8 v -> v / 127.5 - 1). No test touches the network: downloads
run against a monkeypatched ``urllib.request.urlopen``.
"""

import builtins
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from torchdiffusion.data.image_files import load_cifar10, load_idx, load_image_folder, load_npz
from torchdiffusion.data.images import IMAGE_DATASETS, download, load_digits, load_images, random_flip


def _scaled(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)) / 127.5 - 1


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return load_digits()


# --- digits ------------------------------------------------------------------------------------------


def test_digits_shape_range_labels(digits):
    from sklearn.datasets import load_digits as sk_digits

    x, y = digits
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert y.dtype == torch.int64 and y.shape == (1797,) and set(y.tolist()) == set(range(10))
    expected = torch.as_tensor(sk_digits().images, dtype=torch.float32)[:, None] / 8 - 1  # 0..16 -> [-1, 1]
    assert torch.equal(x, expected)


def test_digits_resize_and_registry(digits):
    x16, y16 = load_digits(16)
    assert x16.shape == (1797, 1, 16, 16) and x16.min() >= -1 and x16.max() <= 1
    assert torch.equal(y16, digits[1])
    assert set(IMAGE_DATASETS) == {"digits", "digits16", "shapes16", "shapes32"}
    assert torch.equal(load_images("digits16")[0], x16)
    assert torch.equal(load_images("digits")[0], digits[0])


@pytest.mark.parametrize("size, pad_to", [(8, 16), (8, 13), (16, 32)])
def test_digits_pad_keeps_pixels_and_uses_minus_one(digits, size, pad_to):
    base = digits[0] if size == 8 else load_digits(size)[0]
    x, _ = load_digits(size, pad_to=pad_to)
    assert x.shape == (1797, 1, pad_to, pad_to)
    lo = (pad_to - size) // 2
    assert torch.equal(x[..., lo : lo + size, lo : lo + size], base)
    border = torch.ones(pad_to, pad_to, dtype=torch.bool)
    border[lo : lo + size, lo : lo + size] = False
    assert (x[..., border] == -1).all()


def test_digits_bad_pad():
    with pytest.raises(ValueError, match=r"pad_to must be >= size \(16\), got 8"):
        load_digits(16, pad_to=8)


# --- IDX ---------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path, data: bytes, compress: bool = False):
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    gz = ".gz" if compress else ""
    ip = _write(tmp_path / f"train-images-idx3-ubyte{gz}", _idx_bytes(images), compress)
    lp = _write(tmp_path / f"train-labels-idx1-ubyte{gz}", _idx_bytes(labels), compress)
    x, y = load_idx(ip, lp)
    assert x.shape == (5, 1, 4, 3) and x.dtype == torch.float32
    assert torch.equal(x, _scaled(images[:, None])) and x[0, 0, 0, 0] == -1 and x[0, 0, 0, 1] == 1
    assert y.dtype == torch.int64 and y.tolist() == [3, 1, 4, 1, 5]
    assert load_idx(ip)[1] is None
    for spec in (ip, tmp_path):  # the images file finds its labels; a folder reads the whole split
        xs, ys = load_images(spec)
        assert torch.equal(xs, x) and torch.equal(ys, y)


def test_idx_errors_name_path_and_expectation(tmp_path):
    images = np.zeros((2, 3, 3), dtype=np.uint8)
    labels = _write(tmp_path / "labels-idx1-ubyte", _idx_bytes(np.zeros(2, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte: wrong IDX magic number 0x00000801, expected 0x00000803"):
        load_idx(labels)
    bad = _write(tmp_path / "bad-ubyte", b"\x12\x34\x56\x78" + _idx_bytes(images)[4:])
    with pytest.raises(ValueError, match=r"bad-ubyte: wrong IDX magic number 0x12345678, expected 0x00000803"):
        load_idx(bad)
    cut = _write(tmp_path / "cut-ubyte.gz", _idx_bytes(images)[:-1], compress=True)
    with pytest.raises(ValueError, match=r"cut-ubyte.gz: truncated IDX file: .* 2 x 3 x 3 = 18 data bytes, found 17"):
        load_idx(cut)
    broken_gzip = _write(tmp_path / "broken-ubyte.gz", gzip.compress(_idx_bytes(images))[:-8])
    with pytest.raises(ValueError, match=r"broken-ubyte.gz: corrupt or truncated gzip"):
        load_idx(broken_gzip)
    three = _write(tmp_path / "images-idx3-ubyte", _idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"2 labels for 3 images"):
        load_idx(three, labels)


# --- CIFAR-10 ----------------------------------------------------------------------------------------


def _cifar_folder(tmp_path, protocol=2, n=3):
    """Batches shaped like the originals (dict with bytes keys; protocol 2 as Python 2 wrote them)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(n)]
        batch = {b"batch_label": name.encode(), b"data": rows, b"labels": labels, b"filenames": [b"a.png"] * n}
        blob = pickle.dumps(batch, protocol=2 if protocol == "numpy1" else protocol)
        if protocol == "numpy1":  # the name numpy < 2 (and so the original files) use for the same function
            blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        (folder / name).write_bytes(blob)
        data[name] = (rows, labels)
    return folder, data


@pytest.mark.parametrize("protocol", [2, 4, 5, "numpy1"])
def test_cifar10_batches(tmp_path, protocol):
    folder, data = _cifar_folder(tmp_path, protocol)
    x, y = load_cifar10(folder, "train")
    rows = np.concatenate([data[f"data_batch_{k}"][0] for k in range(1, 6)])
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == sum((data[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each 32 x 32 row-major.
    assert x[4, 1, 2, 5] == _scaled(rows[4, 1024 + 2 * 32 + 5])
    assert torch.equal(x, _scaled(rows).view(15, 3, 32, 32))
    xt, yt = load_images(tmp_path, split="test")  # the parent folder is found too
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == data["test_batch"][1]
    with pytest.raises(ValueError, match="unknown split 'val'; valid choices: train, test"):
        load_cifar10(folder, "val")


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func", [os.system, builtins.exec], ids=["os.system", "exec"])
def test_cifar10_refuses_code_in_pickle(tmp_path, func):
    folder, _ = _cifar_folder(tmp_path)
    marker = tmp_path / "pwned"
    code = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    payload = {b"data": _Evil(func, code), b"labels": []}
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1: not a CIFAR-10 batch: refusing to load global"):
        load_cifar10(folder)
    assert not marker.exists()


def test_cifar10_wrong_content(tmp_path):
    folder, _ = _cifar_folder(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"test_batch: expected b'data' as a uint8 array of shape \(N, 3072\)"):
        load_cifar10(folder, "test")
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(folder)


# --- image folders -----------------------------------------------------------------------------------


@pytest.fixture
def PIL():
    return pytest.importorskip("PIL.Image")


def _png(PIL, path, w, h, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.new("RGB", (w, h), color).save(path)


def test_image_folder_classes_labels_shapes(tmp_path, PIL):
    _png(PIL, tmp_path / "dog" / "a.png", 6, 4, (0, 0, 255))
    _png(PIL, tmp_path / "cat" / "b.png", 5, 5, (255, 0, 0))
    _png(PIL, tmp_path / "cat" / "sub" / "c.PNG", 3, 9, (255, 0, 0))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    x, y, classes = load_image_folder(tmp_path, 4)
    assert classes == ["cat", "dog"] and y.tolist() == [0, 0, 1]
    assert x.shape == (3, 3, 4, 4) and x.dtype == torch.float32
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    assert torch.allclose(x[:2], red.view(1, 3, 1, 1).expand(2, 3, 4, 4), atol=1 / 127.5)
    assert torch.allclose(x[2], blue.view(3, 1, 1).expand(3, 4, 4), atol=1 / 127.5)
    xg, yg, _ = load_image_folder(tmp_path, 2, channels=1)
    assert xg.shape == (3, 1, 2, 2) and torch.equal(yg, y)
    xs, ys = load_images(tmp_path, size=4)
    assert torch.equal(xs, x) and torch.equal(ys, y)


def test_image_folder_center_crop_and_flat_layout(tmp_path, PIL):
    stripes = np.zeros((2, 6, 3), dtype=np.uint8)  # 6 wide x 2 high: two red, two green, two blue columns
    stripes[:, 0:2, 0], stripes[:, 2:4, 1], stripes[:, 4:6, 2] = 255, 255, 255
    PIL.fromarray(stripes).save(tmp_path / "s.png")
    x, y, classes = load_image_folder(tmp_path, 2)  # shorter side is already 2: only the crop acts
    assert y is None and classes == []
    assert torch.equal(x[0], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 2, 2))
    _png(PIL, tmp_path / "cls" / "a.png", 2, 2, (0, 0, 0))
    with pytest.raises(ValueError, match="both images and class subfolders"):
        load_image_folder(tmp_path, 2)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=r"none: no images found; expected files ending in \.png"):
        load_image_folder(tmp_path / "none", 2)
    with pytest.raises(ValueError, match="channels must be 1 .* or 3"):
        load_image_folder(tmp_path / "cls", 2, channels=4)
    with pytest.raises(TypeError, match="needs size="):
        load_images(tmp_path / "cls")


# --- npz ---------------------------------------------------------------------------------------------


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(2)
    nchw = rng.integers(0, 256, size=(2, 3, 5, 4), dtype=np.uint8)
    expected = _scaled(nchw)
    cases = {"nchw": nchw, "nhwc": nchw.transpose(0, 2, 3, 1), "float01": nchw / 255.0}
    for name, array in cases.items():
        np.savez(tmp_path / f"{name}.npz", images=array, labels=np.array([7, 2]))
        x, y = load_npz(tmp_path / f"{name}.npz")
        assert x.shape == (2, 3, 5, 4) and torch.allclose(x, expected, atol=1e-6), name
        assert y.tolist() == [7, 2] and y.dtype == torch.int64
    np.savez(tmp_path / "gray.npz", x_train=nchw[:, 0], y_train=np.array([1, 0]))
    x, y = load_npz(tmp_path / "gray.npz", "x_train", labels_key="y_train")
    assert torch.equal(x, expected[:, :1]) and y.tolist() == [1, 0]
    signed = expected.numpy()
    np.savez(tmp_path / "signed.npz", signed)  # floats already in [-1, 1] stay as they are
    x, y = load_images(tmp_path / "signed.npz")
    assert torch.equal(x, expected) and y is None


def test_npz_errors_name_shape(tmp_path):
    np.savez(tmp_path / "amb.npz", np.zeros((2, 3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"ambiguous image layout for shape \(2, 3, 4, 3\); pass layout="):
        load_npz(tmp_path / "amb.npz")
    assert load_npz(tmp_path / "amb.npz", layout="NHWC")[0].shape == (2, 3, 3, 4)
    np.savez(tmp_path / "flat.npz", np.zeros((2, 5), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2, 5\) as images; expected \(N, H, W\)"):
        load_npz(tmp_path / "flat.npz")
    np.savez(tmp_path / "c5.npz", np.zeros((2, 5, 4, 6), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2, 5, 4, 6\)"):
        load_npz(tmp_path / "c5.npz")
    np.savez(tmp_path / "big.npz", np.full((1, 2, 2), 300.0))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] or \[-1, 1\], got values in \[300, 300\]"):
        load_npz(tmp_path / "big.npz")
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 2, 2)), b=np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"none named 'images'; pass key=<one of a, b>"):
        load_npz(tmp_path / "two.npz")


# --- augmentation ------------------------------------------------------------------------------------


def test_random_flip_deterministic_and_exact():
    x = torch.arange(64 * 2 * 3 * 4, dtype=torch.float32).view(64, 2, 3, 4)  # no example is symmetric
    before = x.clone()
    out = random_flip(x, torch.Generator().manual_seed(5))
    assert torch.equal(out, random_flip(x, torch.Generator().manual_seed(5))) and torch.equal(x, before)
    chosen = torch.rand(64, generator=torch.Generator().manual_seed(5)) < 0.5  # the documented rule
    assert 0 < chosen.sum() < 64
    assert torch.equal(out[chosen], x[chosen].flip(-1)) and torch.equal(out[~chosen], x[~chosen])
    assert torch.equal(random_flip(x, p=0.0), x) and torch.equal(random_flip(x, p=1.0), x.flip(-1))


# --- dispatcher --------------------------------------------------------------------------------------


def test_load_images_unknown_names_valid_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown image data set 'mnist' \(not found\); built-in names: digits, "):
        load_images("mnist")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"not a built-in name or a supported file.*\.npz file or an IDX file"):
        load_images(tmp_path / "a.csv")


# --- downloads (no network: urlopen is monkeypatched) -------------------------------------------------


def _serve(monkeypatch, payloads):
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in payloads:
            raise urllib.error.URLError("network is unreachable")
        return io.BytesIO(payloads[name])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return calls


def test_download_offline_error_leaves_nothing(tmp_path, monkeypatch):
    calls = _serve(monkeypatch, {})
    with pytest.raises(ConnectionError) as err:
        download("mnist", tmp_path)
    message = str(err.value)
    assert "could not reach https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz: " in message
    assert "network is unreachable" in message and "download the files by hand" in message
    assert len(calls) == 2  # both mirrors tried
    assert list((tmp_path / "mnist").iterdir()) == []


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    _serve(monkeypatch, {"train-images-idx3-ubyte.gz": b"not the real file"})
    with pytest.raises(ValueError, match=r"checksum mismatch for .*: expected md5 f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        download("mnist", tmp_path)
    assert list((tmp_path / "mnist").iterdir()) == []
    with pytest.raises(ValueError, match="valid choices: mnist, fashion-mnist, cifar10"):
        download("svhn", tmp_path)


def test_download_verifies_and_loads(tmp_path, monkeypatch):
    images, labels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3), np.array([4, 9], dtype=np.uint8)
    payloads = {}
    for prefix in ("train", "t10k"):
        payloads[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(_idx_bytes(images))
        payloads[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(_idx_bytes(labels))
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in payloads.items()}
    calls = _serve(monkeypatch, payloads)
    folder = download("fashion-mnist", tmp_path, checksums=sha)
    assert sorted(p.name for p in folder.iterdir()) == sorted(payloads) and len(calls) == 4
    x, y = load_images(folder, split="test")
    assert torch.equal(x, _scaled(images[:, None])) and y.tolist() == [4, 9]
    assert download("fashion-mnist", tmp_path, checksums=sha) == folder and len(calls) == 4  # nothing re-fetched


def test_download_cifar10_extracts_batches(tmp_path, monkeypatch):
    source, _ = _cifar_folder(tmp_path / "src")
    (source / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    archive = buffer.getvalue()
    _serve(monkeypatch, {"cifar-10-python.tar.gz": archive})
    md5 = {"cifar-10-python.tar.gz": hashlib.md5(archive).hexdigest()}
    folder = download("cifar10", tmp_path / "root", checksums=md5)
    assert folder == tmp_path / "root" / "cifar-10-batches-py"
    assert torch.equal(load_cifar10(folder, "test")[0], load_cifar10(source, "test")[0])
