"""Cascaded diffusion (Ho et al. 2022): super-resolution U-Nets conditioned on an upsampled low-resolution image with
Gaussian conditioning augmentation, trained by the loop, and the cascade pipeline base -> upsamplers.

Exact checks: the conditioning is avgpool_f(x0) + s n with s = u * low_res_noise, element for element; the U-Net
sees [x, bilinear upsampling of low_res] (a U-Net whose weights read only the low-res channels reproduces the
upsampling's effect); an interrupted and resumed super-resolution run equals an uninterrupted one bit for bit (the
augmentation's draws are part of the saved random state); errors name what is missing.
"""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import torchdiffusion as td
from torchdiffusion.app.cli import main
from torchdiffusion.app.pipeline import cascade
from torchdiffusion.nets.unet import UNet
from torchdiffusion.training.checkpoint import load_checkpoint
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train
from torchdiffusion.training.step import low_res_condition

NET = {"name": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
       "dropout": 0.0, "groups": 8}  # fmt: skip


def sr_config(**kw) -> TrainConfig:
    base = dict(data="digits16", net=NET, steps=4, batch_size=8, warmup=1, log_every=2, checkpoint_every=2,
                super_resolution=2)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_low_res_condition_is_pooled_image_plus_scaled_noise():
    g = torch.Generator().manual_seed(0)
    x0, u, noise = (
        torch.randn(5, 1, 8, 8, generator=g),
        torch.rand(5, generator=g),
        torch.randn(5, 1, 4, 4, generator=g),
    )
    cond = low_res_condition(x0, 2, 0.3, u, noise)
    pooled = (x0[..., 0::2, 0::2] + x0[..., 1::2, 0::2] + x0[..., 0::2, 1::2] + x0[..., 1::2, 1::2]) / 4
    assert torch.allclose(cond["aug_level"], 0.3 * u)
    expected = pooled + (0.3 * u).view(-1, 1, 1, 1) * noise
    # a handful of float32 roundings (4-term mean in either order, one product, one sum), each <= eps |largest term|
    scale = x0.abs().max() + (0.3 * noise).abs().max()
    assert torch.allclose(cond["low_res"], expected, rtol=0, atol=8 * torch.finfo().eps * float(scale))
    assert torch.equal(low_res_condition(x0, 2, 0.0, u, noise)["low_res"], F.avg_pool2d(x0, 2))


def test_sr_unet_reads_the_upsampled_low_res_image():
    net = UNet(in_channels=1, image_size=8, channels=16, channel_mult=(1, 2), attention_resolutions=(), groups=8,
               cond_channels=1, dropout=0.0)  # fmt: skip
    x, c = torch.zeros(2, 1, 8, 8), torch.zeros(2)
    low = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    # conv_in weights that read only the low-res channel: its output is the upsampled image convolved
    with torch.no_grad():
        net.inp.weight.zero_()
        net.inp.weight[0, 1, 1, 1] = 1.0  # the centre tap of input channel 1 (low_res) into feature 0
        net.inp.bias.zero_()
    seen = {}
    net.inp.register_forward_hook(lambda m, i, o: seen.update(out=o))
    net(x, c, low_res=low)
    up = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    # a 3 x 3 convolution (oneDNN may use transforms that mix the 9 taps' values) errs by <= 9 eps x its inputs' size
    assert torch.allclose(seen["out"][:, 0], up[:, 0], rtol=0, atol=9 * torch.finfo().eps * float(up.abs().max()))
    with pytest.raises(ValueError, match="needs low_res"):
        net(x, c)
    with pytest.raises(ValueError, match="low_res must have shape"):
        net(x, c, low_res=torch.zeros(2, 3, 4, 4))
    plain = UNet(in_channels=1, image_size=8, channels=16, channel_mult=(1, 2), attention_resolutions=(), groups=8)
    with pytest.raises(ValueError, match="not a super-resolution model"):
        plain(x, c, low_res=low)


class Stop(Exception):
    pass


def test_sr_run_resumes_bit_exactly_and_samples_given_low_res(tmp_path):
    full = train(sr_config(), tmp_path / "full", progress=False)
    assert full.config["net"]["cond_channels"] == 1 and full.config["super_resolution"] == 2

    def stop_at_2(step, info):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        train(sr_config(), tmp_path / "cut", progress=False, callback=stop_at_2)
    resumed = train(sr_config(), tmp_path / "cut", resume=True, progress=False)
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    pipe = td.load(tmp_path / "full")
    assert pipe.super_resolution == 2 and pipe.shape == (1, 16, 16)
    low = F.avg_pool2d(td.data.load_digits(16)[0][:3], 2)
    x = pipe.sample(3, low_res=low, steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="needs low_res"):
        pipe.sample(3, steps=3)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\)"):
        pipe.sample(3, steps=3, low_res=torch.zeros(3, 1, 4, 4))
    assert load_checkpoint(tmp_path / "full").config["low_res_noise"] == 0.2


def test_cascade_runs_base_then_upsampler_in_python_and_on_the_command_line(tmp_path):
    base_net = {**NET, "attention_resolutions": [4]}
    train(TrainConfig(data="digits", net=base_net, steps=2, batch_size=8, warmup=1, checkpoint_every=2),
          tmp_path / "base", progress=False)  # fmt: skip
    train(sr_config(steps=2), tmp_path / "up", progress=False)
    base, up = td.load(tmp_path / "base"), td.load(tmp_path / "up")
    x = cascade([base, up], 4, steps=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 16, 16)
    with pytest.raises(ValueError, match="first stage"):
        cascade([up], 2)
    with pytest.raises(ValueError, match="not a super-resolution model"):
        cascade([base, base], 2)
    out = tmp_path / "c.npy"
    args = ["sample", "--cascade", f"{tmp_path / 'base'},{tmp_path / 'up'}", "--n", "3", "--steps", "2",
            "--aug-level", "0.1", "--out", str(out), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    import numpy as np

    assert np.load(out).shape == (3, 1, 16, 16) and "cascade 8x8 -> 16x16" in result.output
    bad = CliRunner().invoke(main, ["sample", "--checkpoint", str(tmp_path / "up"), "--out", str(out)])
    assert bad.exit_code != 0 and "--cascade BASE," in bad.output


def test_bad_super_resolution_settings_are_named():
    with pytest.raises(ValueError, match="super_resolution=3"):
        TrainConfig(data="digits16", super_resolution=3)
    with pytest.raises(ValueError, match="objective 'denoising'"):
        TrainConfig(data="digits16", super_resolution=2, objective="consistency")
    from torchdiffusion.training.resolve import resolve_config

    with pytest.raises(ValueError, match="not images whose size is a multiple of 4"):
        resolve_config(TrainConfig(data="moons", super_resolution=4), torch.zeros(10, 2), None)


def test_super_resolution_models_predict_v_unless_told_otherwise():
    # eps amplifies its error by 1 / alpha near the noise end, where an SR model's x0 is nearly known (config.py)
    assert TrainConfig(data="digits16", super_resolution=2).target == "v"
    assert TrainConfig(data="digits16").target == "eps"
    assert TrainConfig(data="digits16", super_resolution=2, target="eps").target == "eps"
