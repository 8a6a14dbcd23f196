"""The noise-conditional image classifier (``nets.UNetClassifier``) and ``train-classifier`` on images.

Dhariwal & Nichol 2021 (Sec. 4.1) guide an unconditional image model with a classifier on noised images, the
U-Net's downsampling half with a pooled head. Checked here: shapes and the zero-initialised head (uniform logits,
an exact value), a rebuild from the spec, the command line from a labelled image file to guided samples (scale 0
must reproduce the unguided samples exactly), and that a short training on the coloured shapes learns: its
accuracy on held-out images at low noise is far above chance.
"""

import math

import numpy as np
import pytest
import torch

from conftest import Z, gen
from torchdiffusion import VP
from torchdiffusion.data import make_shapes
from torchdiffusion.names import NETS, build_net
from torchdiffusion.nets import UNetClassifier
from torchdiffusion.training.classifier import image_classifier_spec, train_classifier

pytestmark = pytest.mark.usefixtures("single_thread")


def _net(**kw) -> UNetClassifier:
    torch.manual_seed(0)
    return UNetClassifier(**{"in_channels": 3, "out_dim": 5, "image_size": 16, "channels": 8, **kw})


def _randomise(net: UNetClassifier) -> None:
    """Every parameter random: at initialisation the zero last layers (head, each ResBlock's conv2) hide the rest."""
    g = gen(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("size, mult", [(8, (1, 2)), (16, (1, 2, 2)), (32, (1, 2, 2, 2))])
def test_logits_shape_and_uniform_start(size, mult):
    """(B, C, H, W), (B,) -> (B, K); the head starts at zero, so every logit is exactly 0 (p = 1/K) at first."""
    net = _net(image_size=size, channel_mult=mult)
    x, c = torch.randn(4, 3, size, size, generator=gen(1)), torch.randn(4, generator=gen(2))
    out = net(x, c)
    assert out.shape == (4, 5) and torch.equal(out, torch.zeros_like(out))
    _randomise(net)
    out = net(x, c)
    assert (out != 0).any() and not torch.equal(out, net(x, c + 1))  # it reads the noise level


def test_gradient_reaches_every_parameter():
    net = _net(attention_resolutions=[8])
    _randomise(net)
    net(torch.randn(2, 3, 16, 16, generator=gen(1)), torch.rand(2, generator=gen(2))).square().sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_spec_builds_it_by_name_and_rebuilds_from_its_config():
    spec = image_classifier_spec(3, 16, 24, channels=8)
    assert spec["channel_mult"] == [1, 2, 2] and image_classifier_spec(1, 28, 10)["channel_mult"] == [1, 2, 2]
    net = build_net(spec)
    assert NETS["unet_classifier"] is UNetClassifier and isinstance(net, UNetClassifier)
    _randomise(net)
    again = build_net({"name": "unet_classifier", **net.config})
    again.load_state_dict(net.state_dict())
    x, c = torch.randn(3, 3, 16, 16, generator=gen(1)), torch.rand(3, generator=gen(2))
    assert torch.equal(again(x, c), net(x, c))


def test_bad_input_is_refused():
    net = _net()
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(2, 3, 10, 10), torch.zeros(2))
    with pytest.raises(ValueError, match="image_size"):
        UNetClassifier(image_size=18, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="out_dim"):
        UNetClassifier(out_dim=0)


def test_a_short_training_on_shapes_beats_chance():
    """80 steps on the coloured shapes noised at low levels (VP, t in [0.04, 0.06]: sigma 0.15 to 0.23 against
    colours 2 apart), then accuracy on 1000 held-out images at t = 0.05 must exceed chance 1/24 by Z binomial
    standard errors. (A narrow band of times learns in seconds; the full range needs minutes.) Knowing the colour
    alone gives 1/4; a head that loses each channel's mean, as a GroupNorm of one channel per group before the
    pool does, stays near chance here."""
    x, y = make_shapes(4000, 16, seed=0, return_labels="class")
    held, held_y = make_shapes(1000, 16, seed=1, return_labels="class")
    torch.manual_seed(0)
    net = build_net(image_classifier_spec(3, 16, 24, channels=16))
    band = VP(t_min=0.04, t_max=0.06)
    clf = train_classifier(net, band, x, y, steps=80, batch_size=32, lr=1e-2, generator=gen(4))
    t = torch.full((1000,), 0.05)
    xt = band.perturb(held, t, torch.randn(held.shape, generator=gen(5)))
    with torch.no_grad():
        acc = float((clf(xt, t).argmax(1) == held_y).double().mean())
    chance = 1 / 24
    assert acc > chance + Z * math.sqrt(chance * (1 - chance) / 1000), acc


def test_command_line_trains_on_images_and_guides_samples(tmp_path):
    """`train-classifier --data IMAGES.npz` writes a classifier that `sample --classifier` loads on an image model;
    at --classifier-scale 0 the guided denoiser is the model's own, so the samples equal the unguided ones."""
    from click.testing import CliRunner

    from torchdiffusion.app.cli import main
    from torchdiffusion.training import TrainConfig, train

    x, y = make_shapes(48, 16, seed=0, return_labels="shape")
    data = tmp_path / "shapes.npz"
    np.savez(data, images=x.numpy(), labels=y.numpy())
    runner = CliRunner()
    clf = tmp_path / "clf"
    r = runner.invoke(main, ["train-classifier", "--data", str(data), "--steps", "3", "--batch-size", "4",
                             "--width", "8", "--out", str(clf), "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "4-class classifier" in r.output and "4 held-out images" in r.output
    net = {"name": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": []}
    train(TrainConfig(data=str(data), net=net, steps=2, batch_size=4, warmup=1), tmp_path / "m", progress=False)
    common = ["sample", "--checkpoint", str(tmp_path / "m"), "--n", "4", "--steps", "3", "--sampler", "ddim",
              "--no-progress"]  # fmt: skip
    outs = {}
    for name, extra in (("plain", []), ("s0", ["--classifier-scale", "0"]), ("s5", ["--classifier-scale", "5"])):
        out = tmp_path / f"{name}.npy"
        guide = [] if name == "plain" else ["--classifier", str(clf), "--class", "2"]
        r = runner.invoke(main, [*common, *guide, *extra, "--out", str(out)])
        assert r.exit_code == 0, r.output
        outs[name] = np.load(out)
        assert outs[name].shape == (4, 3, 16, 16) and np.isfinite(outs[name]).all()
        assert out.with_suffix(".png").is_file()
    assert np.array_equal(outs["s0"], outs["plain"]) and not np.array_equal(outs["s5"], outs["plain"])
    r = runner.invoke(main, ["train-classifier", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "missing.npz" in r.output
