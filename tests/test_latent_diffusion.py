"""Latent diffusion through the library (Rombach et al. 2022): a `train-autoencoder` run, a diffusion model trained
on its scaled latents, and pipelines and commands that decode. The closed-form proof of latent sampling is in
tests/test_latent.py; here: the plumbing holds its promises (shapes, decoding, a run that keeps its autoencoder
and loads after a move, clear errors)."""

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import torchdiffusion as td
from torchdiffusion.app.cli import main
from torchdiffusion.training.autoencoder import AutoencoderConfig, encode_dataset, load_autoencoder, train_autoencoder
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train

NET = {"name": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [2],
       "dropout": 0.0, "groups": 8}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    cfg = AutoencoderConfig(data="digits16", latent=(4, 4, 4), channels=8, steps=3, batch_size=8, checkpoint_every=3)
    train_autoencoder(cfg, root / "ae", progress=False)
    ldm = TrainConfig(data="digits16", autoencoder=str(root / "ae"), net=NET, steps=3, batch_size=8, warmup=1,
                      checkpoint_every=3, sample_every=3, sample_count=4)  # fmt: skip
    train(ldm, root / "ldm", progress=False)
    return root


def test_the_model_trains_on_the_scaled_latents_and_samples_decode(runs):
    pipe = td.load(runs / "ldm")
    ae, meta = load_autoencoder(runs / "ae")
    assert pipe.shape == (4, 4, 4) and pipe.image_shape == (1, 16, 16)
    assert pipe.config["net"]["in_channels"] == 4 and pipe.config["net"]["image_size"] == 4
    assert pipe.autoencoder.scale_factor == meta["scale_factor"]
    images = td.data.load_digits(16)[0]
    z = encode_dataset(ae, images, meta["scale_factor"])
    assert pipe.sigma_data == pytest.approx(z.double().std().item(), rel=1e-6)  # measured on those latents
    gen = torch.Generator().manual_seed(0)
    latents = pipe.sample(3, steps=3, decode=False, generator=gen)
    decoded = pipe.sample(3, steps=3, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (3, 4, 4, 4) and decoded.shape == (3, 1, 16, 16)
    assert torch.allclose(decoded, pipe.autoencoder.decode(latents))  # the same draw, decoded
    assert (runs / "ldm" / "samples" / "step_000003.png").is_file()  # training's grids show decoded images


def test_a_moved_run_decodes_with_its_own_copy_of_the_autoencoder(runs, tmp_path):
    shutil.copytree(runs / "ldm", tmp_path / "moved")
    shutil.copytree(runs / "ae", tmp_path / "ae-elsewhere")
    pipe = td.load(tmp_path / "moved")
    assert pipe.autoencoder.path == str(tmp_path / "moved" / "autoencoder")
    assert pipe.sample(2, steps=2).shape == (2, 1, 16, 16)


def test_sample_command_writes_images_and_likelihood_says_latents(runs, tmp_path):
    out = tmp_path / "s.npy"
    r = CliRunner().invoke(main, ["sample", "--checkpoint", str(runs / "ldm"), "--n", "3", "--steps", "2",
                                  "--sampler", "ddim", "--out", str(out), "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert np.load(out).shape == (3, 1, 16, 16)
    r = CliRunner().invoke(main, ["likelihood", "--checkpoint", str(runs / "ldm"), "--data", "moons"])
    assert r.exit_code != 0 and "latent model" in r.output


def test_data_the_autoencoder_was_not_trained_for_is_named(runs, tmp_path):
    cfg = TrainConfig(data="digits", autoencoder=str(runs / "ae"), net=NET, steps=1, batch_size=8)
    with pytest.raises(ValueError, match=r"encodes images of shape \(1, 16, 16\)"):
        train(cfg, tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="trains on images"):
        train(TrainConfig(data="moons", autoencoder=str(runs / "ae")), tmp_path / "bad2", progress=False)
    with pytest.raises(ValueError, match="cannot also be one"):
        TrainConfig(data="digits16", autoencoder=str(runs / "ae"), super_resolution=2)
