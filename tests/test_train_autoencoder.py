"""Training the latent-diffusion autoencoder (training/autoencoder.py, app/cli/train_autoencoder.py): a tiny
KLAutoencoder (channels 8) on the 16 x 16 digits for a handful of steps.

Exactness checks: interrupted + resumed equals uninterrupted bit for bit (weights, EMA, log); a loaded checkpoint
gives the trained model's outputs exactly; the stored scale factor is ``latent_scale_factor`` of the loaded
model's latents drawn with the stored seed, and it gives the scaled latents unit standard deviation to float32
rounding; with a linear (PCA) autoencoder, decode_latents(encode_dataset(x)) is the orthogonal projection onto
the principal subspace (closed form). Errors name the problem and the valid choices.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from torchdiffusion.app.cli import main
from torchdiffusion.data import load_digits
from torchdiffusion.nets.autoencoder import KLAutoencoder, LinearAutoencoder
from torchdiffusion.objectives.autoencoder import latent_scale_factor
from torchdiffusion.training import autoencoder as ae_training
from torchdiffusion.training.autoencoder import (
    AutoencoderConfig,
    decode_latents,
    encode_dataset,
    load_autoencoder,
    parse_latent,
    train_autoencoder,
)
from torchdiffusion.training.checkpoint import CheckpointError, find_checkpoint
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")
F32_EPS = torch.finfo(torch.float32).eps


def tiny(**kw) -> AutoencoderConfig:
    base = dict(data="digits16", latent=(4, 4, 4), channels=8, steps=6, batch_size=8, warmup=2, log_every=2,
                checkpoint_every=3)  # fmt: skip
    return AutoencoderConfig(**{**base, **kw})


def weights(*nets) -> list[torch.Tensor]:
    return [t for net in nets for t in net.state_dict().values()]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ae") / "run"
    rng = torch.get_rng_state()
    result = train_autoencoder(tiny(ema_decay=0.9), run_dir, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is left as it was
    return result


class Stop(Exception):
    pass


@pytest.mark.parametrize("how, saved_at", [("error after step 4", 3), ("ctrl-c in step 5", 4)])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, monkeypatch, how, saved_at):
    """Flips, the EMA and the encoder's noise all draw from the saved state: a run cut after step 4 (an error from
    the callback: the checkpoint of step 3 stands) or by Ctrl-C inside step 5 (saved at step 4, the step's draws
    undone) and resumed ends with the uninterrupted run's weights, EMA, log rows and measurements (here on a fixed
    subset of 64 images, for speed)."""
    monkeypatch.setattr(ae_training, "MEASURE_EXAMPLES", 64)
    cfg = tiny(flip=True, ema_decay=0.9)
    full = train_autoencoder(cfg, tmp_path / "full", progress=False)
    assert [h["step"] for h in full.history] == [2, 4, 6]

    def stop_at_4(step, info):
        if step == 4:
            raise Stop

    real, calls = ae_training.autoencoder_loss, []

    def ctrl_c_in_call_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    if how.startswith("ctrl-c"):
        monkeypatch.setattr(ae_training, "autoencoder_loss", ctrl_c_in_call_5)
    with pytest.raises(KeyboardInterrupt if how.startswith("ctrl-c") else Stop):
        train_autoencoder(cfg, tmp_path / "cut", progress=False, callback=None if how.startswith("ctrl") else stop_at_4)
    monkeypatch.setattr(ae_training, "autoencoder_loss", real)
    stored = json.loads((find_checkpoint(tmp_path / "cut") / "config.json").read_text())
    assert stored["step"] == saved_at
    resumed = train_autoencoder(cfg, tmp_path / "cut", resume=True, progress=False)
    for a, b in zip(weights(resumed.autoencoder, resumed.ema), weights(full.autoencoder, full.ema), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(resumed.history, full.history, strict=True):
        assert {k: v for k, v in a.items() if k != "steps_per_s"} == {k: v for k, v in b.items() if k != "steps_per_s"}
    assert resumed.config == full.config and full.config["measured_on"] == 64


def test_checkpoint_round_trip_gives_the_same_outputs(trained):
    x = load_digits(16)[0][:5]
    for ema, net in ((True, trained.ema), (False, trained.autoencoder)):
        ae, config = load_autoencoder(trained.run_dir, ema=ema)
        assert isinstance(ae, KLAutoencoder) and not ae.training
        assert not any(p.requires_grad for p in ae.parameters())
        assert ae.config == net.config and config["autoencoder"] == net.config
        mean, logvar = ae.encode(x)
        ref_mean, ref_logvar = net.encode(x)
        assert torch.equal(mean, ref_mean) and torch.equal(logvar, ref_logvar)
        assert torch.equal(ae.decode(mean), net.decode(ref_mean))
        assert config["kind"] == "autoencoder" and config["step"] == 6
        assert config["image_shape"] == [1, 16, 16] and config["latent_shape"] == [4, 4, 4]
        err = config["reconstruction_error"]
        assert set(err) == {"mae", "mse", "psnr"} and err["mae"] ** 2 <= err["mse"]  # Jensen: E|e|^2 <= E e^2
    # the checkpoint folder itself loads too, and its config rebuilds the run's config
    ae, config = load_autoencoder(trained.run_dir / "checkpoint")
    assert AutoencoderConfig.from_dict(config) == tiny(ema_decay=0.9)


def test_stored_scale_factor_is_recomputed_from_the_loaded_model(trained):
    """The scale factor (Rombach et al. 2022, Sec. 4.3.2) is 1 / std of draws z ~ q(z | x) of the training images with
    the stored seed: recomputed from the loaded model it is the same number; and it scales those latents to unit
    standard deviation, up to the float32 rounding of the products s z (relative eps / 2 each)."""
    images = load_digits(16)[0]
    for ema in (True, False):
        ae, config = load_autoencoder(trained.run_dir, ema=ema)
        assert config["measured_on"] == len(images)

        def draws(scale, ae=ae, seed=config["scale_seed"]):
            return encode_dataset(ae, images, scale, sample=True, generator=torch.Generator().manual_seed(seed))

        s = config["scale_factor"]
        assert latent_scale_factor(draws(1.0)) == s
        assert abs(latent_scale_factor(draws(s)) - 1) <= 4 * F32_EPS
        # the mean encodings scale by s exactly as the float32 product s * mean
        assert torch.equal(encode_dataset(ae, images[:9], s), s * ae.encode(images[:9])[0])


def test_linear_autoencoder_encodes_and_decodes_to_the_projection():
    """With z = P^T (x - mu) (PCA), decode_latents(encode_dataset(x, s), s) = P P^T (x - mu) + mu, the orthogonal
    projection onto the principal subspace, in float64 to a few eps times the size D of an image."""
    x = load_digits(8)[0].double().flatten(1)
    lin = LinearAutoencoder.pca(x, 10)
    s = 2.5
    z = encode_dataset(lin, x, s, batch_size=100)
    assert z.shape == (len(x), 10)
    P, mu = lin.basis, lin.mean
    assert torch.allclose(z, s * (x - mu) @ P, rtol=0, atol=16 * x.shape[1] * torch.finfo(torch.float64).eps)
    back = decode_latents(lin, z, s, batch_size=64)
    proj = (x - mu) @ P @ P.T + mu
    assert torch.allclose(back, proj, rtol=0, atol=16 * x.shape[1] * torch.finfo(torch.float64).eps)
    with pytest.raises(ValueError, match="scale_factor must be a finite number > 0"):
        decode_latents(lin, z, 0.0)


# -- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["4x4", "4x4x4x4", "axbxc", "0x4x4", "4*4*4"])
def test_bad_latent_string_names_the_form(text):
    with pytest.raises(ValueError, match="CxHxW"):
        parse_latent(text)
    assert parse_latent("4X8x8") == (4, 8, 8)


@pytest.mark.parametrize(
    "latent, words",
    [((4, 5, 5), "does not fit the 16 x 16 images"), ((4, 6, 6), "does not fit"), ((4, 4, 2), "must be square")],
)
def test_a_latent_that_does_not_fit_the_images_is_refused_before_any_file(tmp_path, latent, words):
    with pytest.raises(ValueError, match=words) as e:
        train_autoencoder(tiny(latent=latent), tmp_path / "run", progress=False)
    assert "16, 8, 4, 2, 1" in str(e.value)  # the sides that work
    assert not (tmp_path / "run").exists()


def test_config_errors_name_the_field_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"reconstruction='l3' \(choices: l1, l2\)"):
        tiny(reconstruction="l3")
    with pytest.raises(ValueError, match="kl_weight=-1"):
        tiny(kl_weight=-1)
    with pytest.raises(ValueError, match="unknown AutoencoderConfig keys"):
        AutoencoderConfig.from_dict({"latnet": [4, 4, 4]})
    with pytest.raises(ValueError, match="an autoencoder trains on images; 'moons' is not one"):
        train_autoencoder(tiny(data="moons"), tmp_path / "run", progress=False)


def test_loading_a_diffusion_run_or_a_damaged_one_is_a_clear_error(tmp_path, trained):
    cfg = TrainConfig(data="moons", n_data=64, net={"name": "mlp", "width": 16, "depth": 1}, steps=2, batch_size=16)
    train(cfg, tmp_path / "diffusion", progress=False)
    with pytest.raises(CheckpointError, match="this is a diffusion run .* not an autoencoder"):
        load_autoencoder(tmp_path / "diffusion")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_autoencoder(tmp_path / "nothing")
    bad = tmp_path / "bad"
    shutil.copytree(trained.run_dir, bad)
    ema = bad / "checkpoint" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="ema.safetensors: unreadable safetensors"):
        load_autoencoder(bad)
    (bad / "checkpoint" / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing state.pt"):
        load_autoencoder(bad)


def test_new_run_into_a_run_and_resume_with_another_config_are_refused(trained):
    with pytest.raises(FileExistsError, match="resume"):
        train_autoencoder(tiny(ema_decay=0.9), trained.run_dir, progress=False)
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in \['kl_weight'\]"):
        train_autoencoder(tiny(ema_decay=0.9, kl_weight=1e-3, steps=8), trained.run_dir, resume=True, progress=False)


# -- the command line ----------------------------------------------------------------------------------------------
def test_cli_trains_resumes_and_reports_the_scale_factor(tmp_path):
    out = tmp_path / "ae"
    args = ["--latent", "4x4x4", "--channels", 8, "--batch-size", 8, "--out", out, "--no-progress"]
    r = run("train-autoencoder", "--data", "digits16", "--steps", 3, *args)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["kind"] == "autoencoder" and config["step"] == 3
    assert f"latent scale factor {config['scale_factor']:.6g}" in r.output
    assert "reconstruction error on 1797 training images" in r.output
    r = run("train-autoencoder", "--data", "digits16", "--steps", 5, "--resume", *args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "checkpoint" / "config.json").read_text())["step"] == 5


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--latent", "4x4"], 2, "expected CxHxW"),
        (["--latent", "4x3x3"], 1, "does not fit the 16 x 16 images"),
        (["--data", "moons"], 1, "not one"),
        (["--resume"], 2, "nothing to resume"),
    ],
)
def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, args, code, words):
    out = tmp_path / "ae"
    r = run("train-autoencoder", "--steps", 2, "--channels", 8, "--out", out, "--no-progress", *args)
    assert r.exit_code == code and words in r.output, r.output
    assert not out.exists()
