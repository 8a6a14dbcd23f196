"""Inverse problems and editing on trained image models (issue #12, item 5): ``app.restore`` (measurements from
pictures, ``solve``) and the commands ``inpaint | outpaint | colorize | upscale | edit | interpolate``.

On tiny models trained for a few steps (what they draw is not the point), the checks are the exact ones:
data-consistent methods keep the observed pixels bit for bit (up to float32 rounding of y), the command line draws
what the Python function draws with the same seed, the outputs have the announced shapes, and bad inputs are
refused with a message naming the problem before any sampling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import torchdiffusion as td
from torchdiffusion.app.cli import main
from torchdiffusion.app.restore import DEFAULT_METHODS, colorization, inpainting, outpainting, solve, super_resolution
from torchdiffusion.data import load_digits, read_image, read_mask
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train
from torchdiffusion.utils.image_grid import save_image_grid

pytestmark = pytest.mark.usefixtures("single_thread")

UNET = {"name": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
UNET = {**UNET, "dropout": 0.0, "groups": 8}
EPS32 = torch.finfo(torch.float32).eps


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A tiny unconditional U-Net on the 8x8 digits, 6 steps, and two digit PNGs."""
    root = tmp_path_factory.mktemp("digits")
    train(TrainConfig(data="digits", net=UNET, steps=6, batch_size=8, warmup=2), root / "run", progress=False)
    x, _ = load_digits(8)
    save_image_grid(x[3:4], root / "a.png", nrow=1, padding=0)
    save_image_grid(x[4:5], root / "b.png", nrow=1, padding=0)
    save_image_grid(torch.nn.functional.avg_pool2d(x[3:4], 2), root / "low.png", nrow=1, padding=0)
    save_image_grid(x[3:4, :, 2:6, 2:6], root / "centre.png", nrow=1, padding=0)
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., 1:5, 2:7] = 1
    save_image_grid(hole * 2 - 1, root / "mask.png", nrow=1, padding=0)
    return root


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """A tiny unconditional U-Net on 64 random smooth 8x8 RGB images (an .npz), 4 steps, and one PNG."""
    root = tmp_path_factory.mktemp("rgb")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(64, 3, 16, 16, generator=g) * 2 - 1, 2)
    np.savez(root / "rgb.npz", images=x.numpy())
    train(TrainConfig(data=str(root / "rgb.npz"), net=UNET, steps=4, batch_size=8, warmup=2), root / "run",
          progress=False)  # fmt: skip
    save_image_grid(x[:1], root / "c.png", nrow=1, padding=0)
    return root


# -- measurements from pictures ---------------------------------------------------------------------------------


def test_measurements_observe_what_they_say():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, 8, 8, generator=g) * 2 - 1
    hole = torch.zeros(8, 8, dtype=torch.bool)
    hole[2:5, 1:7] = True
    m = inpainting(img, hole)
    assert torch.equal(m.y[0], torch.where(hole, 0.0, img).to(torch.float64)) and m.sigma_y == 0
    m = outpainting(img[:, 2:6, 3:7], (3, 8, 10))
    outside = m.y[0].clone()
    outside[:, 2:6, 3:7] = 0
    assert torch.equal(m.y[0, :, 2:6, 3:7], img[:, 2:6, 3:7].to(torch.float64)) and not bool(outside.any())
    m = colorization(img, (3, 8, 8))
    torch.testing.assert_close(m.y[0], img.mean(0, keepdim=True).to(torch.float64), rtol=0, atol=4 * EPS32)
    m = super_resolution(img[:, ::2, ::2], (3, 8, 8), 0.1)
    assert m.operator.factor == 2 and m.sigma_y == 0.1


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: inpainting(torch.zeros(1, 8, 8), torch.zeros(8, 8, dtype=torch.bool)), "mark some pixels"),
        (lambda: inpainting(torch.zeros(1, 8, 8), torch.ones(4, 4, dtype=torch.bool)), "the hole mask has shape"),
        (lambda: inpainting(torch.zeros(8, 8), torch.ones(8, 8)), "one image"),
        (lambda: outpainting(torch.zeros(1, 8, 8), (1, 8, 8)), "extends a smaller image"),
        (lambda: colorization(torch.zeros(1, 8, 8), (1, 8, 8)), "needs an RGB model"),
        (lambda: super_resolution(torch.zeros(1, 3, 3), (1, 8, 8)), "integer factor"),
    ],
)
def test_bad_pictures_are_refused(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_read_mask_is_white_for_generate(tmp_path):
    m = torch.full((1, 1, 4, 5), -1.0)
    m[..., 1, 2:4] = 1.0
    save_image_grid(m, tmp_path / "m.png", nrow=1, padding=0)
    hole = read_mask(tmp_path / "m.png")
    assert hole.shape == (4, 5) and hole.sum() == 2 and bool(hole[1, 2:4].all())


# -- solve ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["projection", "ddnm", "ddrm", "repaint", "smc"])
def test_data_consistent_methods_keep_the_observed_pixels(digits, method):
    """Projection, DDNM, DDRM, RePaint at sigma_y = 0 copy y into the kept pixels at the last step; SMC's last step
    conditions on A x0 = y exactly: the observed pixels equal the picture's to float32 rounding."""
    pipe = td.load(digits / "run")
    img = read_image(digits / "a.png", 1)
    hole = read_mask(digits / "mask.png")
    x = solve(pipe, inpainting(img, hole), 3, method=method, nfe=12, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and not x.requires_grad
    kept = ~hole
    assert float((x[:, 0][:, kept] - img[0][kept]).abs().max()) <= 8 * EPS32


def test_noisy_measurements_are_refused_by_noiseless_methods(digits):
    pipe = td.load(digits / "run")
    m = super_resolution(torch.zeros(1, 4, 4), pipe.shape, 0.1)
    with pytest.raises(ValueError, match=r"assumes a noiseless measurement .* use one of \['ddrm', 'dps'"):
        solve(pipe, m, 2, method="projection", nfe=5)
    with pytest.raises(ValueError, match="the measurement is of"):
        solve(pipe, super_resolution(torch.zeros(1, 4, 4), (1, 16, 16)), 2, nfe=5)


# -- the commands -----------------------------------------------------------------------------------------------


def test_inpaint_on_the_command_line_is_solve_in_python(digits, tmp_path):
    out = tmp_path / "inp"
    r = run("inpaint", "--checkpoint", digits / "run", "--image", digits / "a.png", "--mask", digits / "mask.png",
            "--n", 3, "--steps", 10, "--seed", 4, "--out", out, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"input.png", "mask.png", "samples.png", "samples.npy"}
    x = np.load(out / "samples.npy")
    pipe = td.load(digits / "run")
    m = inpainting(read_image(digits / "a.png", 1), read_mask(digits / "mask.png"))
    expect = solve(pipe, m, 3, method=DEFAULT_METHODS["inpaint"], nfe=10, generator=torch.Generator().manual_seed(4))
    assert np.array_equal(x, expect.numpy())
    assert torch.equal(read_mask(out / "mask.png"), read_mask(digits / "mask.png"))


@pytest.mark.parametrize(
    "args, shape",
    [
        (["inpaint", "--image", "a.png", "--box", "2,2,3,3", "--method", "dps"], (2, 1, 8, 8)),
        (["outpaint", "--image", "centre.png"], (2, 1, 8, 8)),
        (["outpaint", "--image", "a.png", "--box", "4,4", "--method", "repaint"], (2, 1, 8, 8)),
        (["upscale", "--image", "low.png", "--method", "pigdm", "--sigma-y", "0.05"], (2, 1, 8, 8)),
    ],
)
def test_every_task_writes_its_samples(digits, tmp_path, args, shape):
    args = [digits / a if str(a).endswith(".png") else a for a in args]
    r = run(*args, "--checkpoint", digits / "run", "--n", 2, "--steps", 8, "--out", tmp_path / "o", "--no-progress")
    assert r.exit_code == 0, r.output
    x = np.load(tmp_path / "o" / "samples.npy")
    assert x.shape == shape and np.isfinite(x).all()
    assert read_image(tmp_path / "o" / "samples.png", 1).shape[-1] > shape[-1] * (shape[0] + 1)  # input + samples


def test_colorize_keeps_the_gray(rgb, tmp_path):
    """DDRM at sigma_y = 0 sets the measured singular components to y: the channel mean of every colouring equals
    the input's gray (to float32 rounding of the 8-bit PNG values)."""
    r = run("colorize", "--checkpoint", rgb / "run", "--image", rgb / "c.png", "--n", 2, "--steps", 6,
            "--out", tmp_path / "o", "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    x = torch.from_numpy(np.load(tmp_path / "o" / "samples.npy"))
    gray = read_image(rgb / "c.png", 3).mean(0)
    assert x.shape == (2, 3, 8, 8)
    assert float((x.mean(1) - gray).abs().max()) <= 16 * EPS32


def test_edit_and_interpolate_write_their_frames(digits, tmp_path):
    r = run("edit", "--checkpoint", digits / "run", "--image", digits / "a.png", "--n", 3, "--steps", 5,
            "--strength", 0.3, "--out", tmp_path / "e")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "e" / "edits.npy").shape == (3, 1, 8, 8)
    r = run("interpolate", "--checkpoint", digits / "run", "--image", digits / "a.png", "--image2", digits / "b.png",
            "--frames", 5, "--steps", 4, "--out", tmp_path / "i")  # fmt: skip
    assert r.exit_code == 0, r.output
    f = np.load(tmp_path / "i" / "frames.npy")
    assert f.shape == (5, 1, 8, 8) and np.abs(f[0] - f[-1]).max() > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["inpaint", "--image", "a.png"], "give the hole as --mask PNG"),
        (["inpaint", "--image", "a.png", "--box", "1,1,2,2", "--mask", "mask.png"], "one of them"),
        (["inpaint", "--image", "low.png", "--box", "1,1,2,2"], "the model makes"),
        (["upscale", "--image", "a.png"], "integer factor"),
        (["upscale", "--image", "low.png", "--method", "repaint", "--sigma-y", "0.1"], "assumes a noiseless"),
        (["colorize", "--image", "a.png"], "needs an RGB model"),
        (["inpaint", "--image", "missing.png", "--box", "1,1,2,2"], "image not found"),
    ],
)
def test_bad_requests_are_refused(digits, tmp_path, args, words):
    args = [digits / a if str(a).endswith(".png") else a for a in args]
    r = run(*args, "--checkpoint", digits / "run", "--n", 2, "--steps", 4, "--out", tmp_path / "o")
    assert r.exit_code != 0 and words in r.output, r.output
    assert not (tmp_path / "o" / "samples.npy").exists()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_class_conditional_model_conditions_on_the_picture_through_its_null_class(tmp_path, dropout):
    """Without a class, the posterior is given y alone: the model's null class K, which exists only when label
    dropout trained it; otherwise a class must be named."""
    cfg = TrainConfig(data="digits", net=UNET, steps=3, batch_size=8, warmup=1, class_conditional=True,
                      label_dropout=dropout)  # fmt: skip
    train(cfg, tmp_path / "run", progress=False)
    pipe = td.load(tmp_path / "run")
    seen = []
    den = pipe.denoiser

    def spy(x, t, **cond):
        seen.append(cond["class_labels"])
        return den(x, t, **cond)

    from dataclasses import replace

    pipe = replace(pipe, denoiser=spy)
    hole = torch.zeros(8, 8, dtype=torch.bool)
    hole[2:5, 2:5] = True
    m = inpainting(torch.zeros(1, 8, 8), hole)
    if dropout == 0:
        with pytest.raises(ValueError, match="no unconditional part: give a class"):
            solve(pipe, m, 2, nfe=3)
        return
    solve(pipe, m, 2, nfe=3)
    assert all(bool((lab == pipe.num_classes).all()) for lab in seen) and seen
    seen.clear()
    solve(pipe, m, 2, nfe=3, labels=4)
    assert all(bool((lab == 4).all()) for lab in seen) and seen


# -- precision (issue #15: the inverse commands run the network as `sample` does) --------------------------------


@pytest.mark.parametrize("method", ["ddrm", "dps"])  # one without and one with gradients through the network
def test_solve_runs_the_network_in_the_precision_asked(digits, method):
    """fp32 is the loaded denoiser itself; bf16 its ``AutocastDenoiser`` wrap, with the same noise: the same call
    as the method's own with that wrap, bit for bit, and not fp32's (the network did run in bf16)."""
    from torchdiffusion.core.denoiser import AutocastDenoiser
    from torchdiffusion.core.timesteps import grid_lam
    from torchdiffusion.names import get_inverse

    pipe = td.load(digits / "run")
    m = inpainting(read_image(digits / "a.png", 1), read_mask(digits / "mask.png"))

    def by_solve(precision):
        return solve(pipe, m, 2, method=method, nfe=6, generator=torch.Generator().manual_seed(1), precision=precision)

    def by_hand(denoiser):
        g = torch.Generator().manual_seed(1)
        x = pipe.process.prior_sample((2, *pipe.shape), generator=g)
        with torch.no_grad():
            return get_inverse(method).fn(denoiser, pipe.process, x, grid_lam(pipe.process, 5), m, generator=g)

    a, b = by_solve("fp32"), by_solve("bf16")
    assert torch.equal(a, by_hand(pipe.denoiser))
    assert torch.equal(b, by_hand(AutocastDenoiser(pipe.denoiser, "cpu", torch.bfloat16)))
    assert b.dtype == torch.float32 and torch.isfinite(b).all() and not torch.equal(a, b)


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_rule_of_sample(digits, monkeypatch, native):
    import torchdiffusion.training.distributed as dist_mod

    monkeypatch.setattr(dist_mod, "native_bf16", lambda device: native)
    pipe = td.load(digits / "run")
    m = inpainting(read_image(digits / "a.png", 1), read_mask(digits / "mask.png"))

    def draw(precision):
        return solve(pipe, m, 2, nfe=5, generator=torch.Generator().manual_seed(2), precision=precision)

    assert torch.equal(draw("auto"), draw("bf16" if native else "fp32"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_commands_pass_their_precision(digits, tmp_path, monkeypatch, precision):
    """inpaint draws what ``solve`` draws in that precision; edit and interpolate hand the wrapped denoiser on."""
    import torchdiffusion.inverse.editing as editing
    from torchdiffusion.core.denoiser import AutocastDenoiser

    r = run("inpaint", "--checkpoint", digits / "run", "--image", digits / "a.png", "--box", "2,2,3,3", "--n", 2,
            "--steps", 6, "--out", tmp_path / "o", "--no-progress", "--precision", precision)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert ("network in bf16 autocast" in r.output) is (precision == "bf16")  # said, as `sample` says it
    hole = torch.zeros(8, 8, dtype=torch.bool)
    hole[2:5, 2:5] = True
    m = inpainting(read_image(digits / "a.png", 1), hole)
    expect = solve(td.load(digits / "run"), m, 2, nfe=6, generator=torch.Generator().manual_seed(0),
                   precision=precision)  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "o" / "samples.npy"), expect.numpy())
    for command, fn, extra in (
        ("edit", "sdedit", ["--image", digits / "a.png", "--steps", 2]),
        ("interpolate", "ddim_interpolate", ["--image", digits / "a.png", "--image2", digits / "b.png", "--steps", 2]),
    ):
        seen, real = [], getattr(editing, fn)

        def spy(denoiser, *args, real=real, seen=seen, **kwargs):
            seen.append(denoiser)
            return real(denoiser, *args, **kwargs)

        monkeypatch.setattr(editing, fn, spy)
        r = run(command, "--checkpoint", digits / "run", *extra, "--out", tmp_path / command, "--precision", precision)
        assert r.exit_code == 0, r.output
        assert isinstance(seen[0], AutocastDenoiser) is (precision == "bf16")
        assert ("network in bf16 autocast" in r.output) is (precision == "bf16")
