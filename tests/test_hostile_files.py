"""Hostile input files (issue #15, item 3): each is refused with an error that names the file and the problem,
and none runs code.

Every payload below, if a loader ran it, would create a marker file (``os.system("touch ...")`` or
``Path.touch``); each test checks the refusal's message and that the marker does not exist.
"""

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from torchdiffusion.data import load_array, load_cifar10, load_image_folder, load_npz
from torchdiffusion.names import build_net
from torchdiffusion.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from torchdiffusion.training.config import TrainConfig


class RunsCode:
    """Pickles as a call of ``os.system``: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a hostile file ran code"


def a_pickle(module: str, name: str) -> bytes:
    """A protocol-2 pickle that calls ``module.name("x")``: the unpickler meets the global before any call."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x00x\x85R."


# -- .npz and .npy arrays ------------------------------------------------------------------------------------------


def test_an_npz_with_a_pickled_object_array_is_refused(tmp_path, marker):
    path = tmp_path / "data.npz"
    np.savez(path, images=np.array([RunsCode(marker)], dtype=object))  # np.save pickles object arrays
    with pytest.raises(ValueError, match=rf"^{path}: array 'images' is not plain numeric data: .*pickled Python"):
        load_npz(path)


@pytest.mark.parametrize("member", ["images.npy", "images.pkl"])
def test_an_npz_with_a_raw_pickle_member_is_refused(tmp_path, marker, member):
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, pickle.dumps(RunsCode(marker), protocol=4))
    name = member.removesuffix(".npy")  # np.load names a .npy member without its suffix
    with pytest.raises(ValueError, match=rf"^{path}: member '{name}' is not a \.npy array but a pickle"):
        load_npz(path)


def test_a_pickle_named_npz_is_refused(tmp_path, marker):
    path = tmp_path / "data.npz"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match=rf"^{path}: not an \.npz archive"):
        load_npz(path)


@pytest.mark.parametrize("how", ["object array", "raw pickle"])
def test_an_npy_holding_a_pickle_is_refused(tmp_path, marker, how):
    path = tmp_path / "points.npy"
    if how == "object array":
        np.save(path, np.array([RunsCode(marker), 1.0], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match=rf"^{path}: not a plain numeric \.npy array: it holds pickled Python"):
        load_array(path)


# -- YAML configs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    ["!!python/object/apply:os.system", "!!python/object/new:os.system", "!!python/name:os.system", "!custom"],
)
def test_a_yaml_config_with_a_python_tag_is_refused(tmp_path, marker, tag):
    path = tmp_path / "config.yaml"
    path.write_text(f"steps: 10\nnet: {tag} ['touch {marker}']\n")
    long_tag = tag.replace("!!", "tag:yaml.org,2002:")
    with pytest.raises(ValueError, match=r"^\S+config\.yaml \(line 2, column 6\): refusing a YAML tag: ") as info:
        TrainConfig.from_yaml(path)
    assert str(path) in str(info.value) and f"'{long_tag}'" in str(info.value)


def test_a_binary_file_given_as_a_config_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"steps: \xff\xfe\x00")
    with pytest.raises(ValueError, match=rf"^{path}: not a YAML config: not UTF-8 text"):
        TrainConfig.from_yaml(path)


# -- image folders -------------------------------------------------------------------------------------------------


def image_folder(root: Path) -> Path:
    """``root/imgs/{cat,dog}/a.png``, 4 x 4 black images."""
    from PIL import Image

    for name in ("cat", "dog"):
        (root / "imgs" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "imgs" / name / "a.png")
    return root / "imgs"


@pytest.mark.parametrize(
    "link, target, leads_back_to",
    [("cat/up", "..", ""), ("cat/deeper/here", "../..", ""), ("self", ".", ""), ("cat/me", ".", "cat")],
)
def test_a_symlink_loop_to_a_folder_is_refused(tmp_path, link, target, leads_back_to):
    imgs = image_folder(tmp_path)
    (imgs / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, imgs / link)
    pattern = rf"^{imgs / link}: symbolic link loop: it leads back to {imgs / leads_back_to if leads_back_to else imgs}"
    with pytest.raises(ValueError, match=pattern + ", which contains it"):
        load_image_folder(imgs, 4)


def test_a_symlink_loop_between_files_is_refused(tmp_path):
    imgs = image_folder(tmp_path)
    os.symlink("b.png", imgs / "dog" / "c.png")
    os.symlink("c.png", imgs / "dog" / "b.png")
    with pytest.raises(ValueError, match=rf"^{imgs / 'dog'}/[bc]\.png: symbolic link loop"):
        load_image_folder(imgs, 4)


def test_the_image_folder_itself_a_symlink_loop_is_refused(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'loop'}: symbolic link loop"):
        load_image_folder(tmp_path / "loop", 4)


def test_links_that_do_not_loop_are_followed_and_dangling_ones_skipped(tmp_path):
    imgs = image_folder(tmp_path)
    os.symlink("cat", imgs / "kitten")  # a sibling: the same images under a second class, no loop
    os.symlink("../../elsewhere", imgs / "dog" / "more")  # a folder outside the image folder
    (tmp_path / "elsewhere").mkdir()
    os.symlink(imgs / "cat" / "a.png", tmp_path / "elsewhere" / "b.png")
    os.symlink("missing.png", imgs / "dog" / "gone.png")  # dangling: no image there
    x, labels, classes = load_image_folder(imgs, 4)
    assert classes == ["cat", "dog", "kitten"] and labels.tolist() == [0, 1, 1, 2] and x.shape == (4, 3, 4, 4)


# -- safetensors weights whose header lies -------------------------------------------------------------------------


def header_lie(path: Path, how: str) -> None:
    """Rewrite a safetensors file (8-byte little-endian header length, JSON header, data) with a lying header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    name = next(k for k in header if k != "__metadata__")
    if how == "header length beyond the file":
        path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
        return
    if how == "data beyond the file":
        header[name]["data_offsets"][1] += 4 * 10**6
    elif how == "shape larger than its data":
        header[name]["shape"] = [s * 1000 for s in header[name]["shape"]]
    elif how == "overlapping tensors":
        other = next(k for k in header if k not in ("__metadata__", name))
        header[other]["data_offsets"] = header[name]["data_offsets"]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    "how",
    ["header length beyond the file", "data beyond the file", "shape larger than its data", "overlapping tensors"],
)
@pytest.mark.parametrize("file", ["model.safetensors", "ema.safetensors"])
def test_a_safetensors_header_that_lies_about_sizes_is_refused(tmp_path, file, how):
    spec = {"name": "mlp", "dim": 2, "width": 8, "depth": 1, "emb_dim": 8}
    config = {"process": {"name": "vp"}, "net": spec, "target": "eps", "sigma_data": 1.0}
    save_checkpoint(tmp_path, net=build_net(spec), ema_net=build_net(spec), config=config, state={"step": 1})
    path = tmp_path / "checkpoint" / file
    header_lie(path, how)
    with pytest.raises(CheckpointError, match=rf"^{path}: unreadable safetensors file, .*deserializing header"):
        load_checkpoint(tmp_path)


def test_a_training_state_holding_a_pickled_call_is_refused(tmp_path, marker):
    spec = {"name": "mlp", "dim": 2, "width": 8, "depth": 1, "emb_dim": 8}
    config = {"process": {"name": "vp"}, "net": spec, "target": "eps", "sigma_data": 1.0}
    save_checkpoint(tmp_path, net=build_net(spec), ema_net=build_net(spec), config=config, state={"step": 1})
    path = tmp_path / "checkpoint" / "state.pt"
    torch.save({"step": 1, "payload": RunsCode(marker)}, path)
    refused = rf"^{path}: refused: the training state names the Python object {os.system.__module__}\.system; "
    with pytest.raises(CheckpointError, match=refused):
        load_checkpoint(tmp_path)


def test_safetensors_never_unpickles(tmp_path):
    """The format itself: a header is JSON and the data raw bytes, so a loaded file is tensors only."""
    blob = save_safetensors({"w": torch.arange(3.0)})
    assert b"\x80" not in blob[: 8 + struct.unpack("<Q", blob[:8])[0]]


# -- CIFAR-10 batches ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, name",
    [(os.system.__module__, "system"), ("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load")],
)
def test_a_cifar_batch_naming_a_forbidden_global_is_refused(tmp_path, module, name):
    (tmp_path / "data_batch_1").write_bytes(a_pickle(module, name))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'data_batch_1'}: not a CIFAR-10 batch: refusing to load "):
        load_cifar10(tmp_path)
    with pytest.raises(ValueError, match=rf"global {module}\.{name}: not a plain data object$"):
        load_cifar10(tmp_path)


def test_a_cifar_batch_with_a_pickled_call_inside_its_dict_is_refused(tmp_path, marker):
    batch = {b"data": RunsCode(marker), b"labels": [0]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'data_batch_1'}: not a CIFAR-10 batch: .*system"):
        load_cifar10(tmp_path)
