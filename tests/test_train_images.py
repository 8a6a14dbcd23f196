"""Training on images (train.py, image_grid.py): a tiny U-Net on the bundled 8x8 digits, a few steps each.

Exactness checks: interrupted + resumed equals uninterrupted bit for bit; gradient accumulation of 2
micro-batches of B equals one batch of 2B (same examples, times, noise: the global batch is drawn
first and then split); a grid has the pixel size its layout implies; bf16 autocast's first loss is
fp32's within bf16 rounding; the 35.7M parameters of Ho et al.'s CIFAR-10 U-Net from configs/cifar10.yaml.
"""

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchdiffusion.names import NETS
from torchdiffusion.nets.unet import UNet
from torchdiffusion.objectives import denoising as losses
from torchdiffusion.training.checkpoint import load_checkpoint, load_denoiser
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train
from torchdiffusion.utils.image_grid import grid_size, make_grid, save_image_grid

NETS.setdefault("unet", UNet)  # until nets/__init__ registers it
ROOT = Path(__file__).resolve().parents[1]
UNET = {"name": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
UNET = {**UNET, "dropout": 0.0, "groups": 8}


def tiny(**kw) -> TrainConfig:
    base = dict(data="digits", net=UNET, steps=6, batch_size=8, warmup=2, lr=1e-3, log_every=2, checkpoint_every=3)
    base["precision"] = "fp32"  # the exactness checks are float32's; "auto" would pick bf16 where the CPU has it
    return TrainConfig(**{**base, "ema_decay": 0.9, **kw})


def weights(*nets) -> list[torch.Tensor]:
    return [t for net in nets for t in net.state_dict().values()]


class Stop(Exception):
    pass


@pytest.mark.parametrize("how, saved_at", [("error after step 4", 3), ("ctrl-c in step 5's 2nd micro-batch", 4)])
def test_unet_on_digits_logs_samples_and_resumes_bit_exactly(tmp_path, monkeypatch, how, saved_at):
    net = {**UNET, "dropout": 0.1}  # the dropout RNG is part of the saved state
    cfg = tiny(net=net, sample_every=3, sample_count=10, flip=True, class_conditional=True, grad_accum=2)
    full = train(cfg, tmp_path / "full", progress=False)
    assert full.config["net"] == {**net, "in_channels": 1, "image_size": 8, "num_classes": 10}
    assert [h["step"] for h in full.history] == [2, 4, 6] and all(math.isfinite(h["loss"]) for h in full.history)
    grids = sorted((tmp_path / "full" / "samples").iterdir())
    assert [p.name for p in grids] == ["step_000003.png", "step_000006.png"]
    with Image.open(grids[-1]) as im:
        im.verify()  # a complete, valid PNG
    with Image.open(grids[-1]) as im:  # 10 images of 8x8 shown at 32x32, 4 per row (ceil sqrt 10): 3 rows
        assert im.format == "PNG" and im.mode == "L" and im.size == (4 * 34 + 2, 3 * 34 + 2)

    def stop_at_4(step, info):
        if step == 4:
            raise Stop

    real, calls = losses.denoising_loss, []

    def ctrl_c_in_call_10(*args, **kwargs):  # 2 micro-batches per step: call 10 is step 5's second
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    if how.startswith("ctrl-c"):
        monkeypatch.setattr(losses, "denoising_loss", ctrl_c_in_call_10)
    with pytest.raises(KeyboardInterrupt if how.startswith("ctrl-c") else Stop):
        train(cfg, tmp_path / "cut", progress=False, callback=None if how.startswith("ctrl-c") else stop_at_4)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut").step == saved_at
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    for a, b in zip(weights(resumed.net, resumed.ema_net), weights(full.net, full.ema_net), strict=True):
        assert torch.equal(a, b)
    for name in ("step_000003.png", "step_000006.png"):  # sampling leaves the training RNGs alone
        assert (tmp_path / "cut" / "samples" / name).read_bytes() == (tmp_path / "full" / "samples" / name).read_bytes()
    denoiser, process, config = load_denoiser(tmp_path / "full")
    x = torch.randn(3, 1, 8, 8)
    assert denoiser(x, torch.full((3,), 0.5), class_labels=torch.tensor([0, 1, 2])).shape == (3, 1, 8, 8)


def test_grad_accum_equals_one_batch_of_the_same_examples(tmp_path):
    """(1/2) (mean over B + mean over B) = mean over 2B: same draws, so the weights agree up to float rounding."""
    one = train(tiny(batch_size=8, grad_accum=2, steps=4), tmp_path / "accum", progress=False)
    two = train(tiny(batch_size=16, steps=4), tmp_path / "batch", progress=False)
    diff = max((a - b).abs().max().item() for a, b in zip(weights(one.net), weights(two.net), strict=True))
    assert diff < 1e-5
    assert [h["loss"] for h in one.history] == pytest.approx([h["loss"] for h in two.history], rel=1e-5)


def test_bf16_autocast_on_cpu_runs_with_a_float32_loss_close_to_fp32(tmp_path, monkeypatch):
    real, dtypes = losses.denoising_loss, []

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(losses, "denoising_loss", recording)
    seen = {p: [] for p in ("fp32", "bf16")}
    for precision, record in seen.items():
        train(
            tiny(steps=2, precision=precision),
            tmp_path / precision,
            progress=False,
            callback=lambda s, i, r=record: r.append(i),
        )
    assert all(math.isfinite(i["loss"]) and math.isfinite(i["grad_norm"]) for i in seen["bf16"])
    assert dtypes == [torch.float32] * 4  # the loss is computed in float32 under bf16 too
    # Step 1: the U-Net's last convolution starts at zero, so both output exactly 0 and the losses agree.
    # Step 2: after one Adam step of the same size in every weight (lr * sign(g) for nearly all of them),
    # the same examples and noise; bf16 keeps 8 mantissa bits (relative rounding 2^-8 = 0.4% per operation).
    assert seen["bf16"][0]["loss"] == seen["fp32"][0]["loss"]
    assert seen["bf16"][1]["loss"] != seen["fp32"][1]["loss"]
    assert seen["bf16"][1]["loss"] == pytest.approx(seen["fp32"][1]["loss"], rel=0.02)


def test_non_finite_loss_names_the_step(tmp_path, monkeypatch):
    real, calls = losses.denoising_loss, []

    def nan_in_third_micro_batch(*args, **kwargs):  # grad_accum = 2: step 2's first micro-batch
        calls.append(1)
        out = real(*args, **kwargs)
        return out * math.nan if len(calls) == 3 else out

    monkeypatch.setattr(losses, "denoising_loss", nan_in_third_micro_batch)
    with pytest.raises(FloatingPointError, match="non-finite loss nan .* at step 2;"):
        train(tiny(grad_accum=2, checkpoint_every=1), tmp_path, progress=False)
    assert load_checkpoint(tmp_path).step == 1


def test_from_yaml_reads_every_config_and_names_unknown_keys(tmp_path):
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"digits", "moons", "mnist", "cifar10"}
    for path in configs:
        TrainConfig.from_yaml(path)
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "digits.yaml", steps="10", **{"net.channels": 8})
    assert cfg.steps == 10 and cfg.net["channels"] == 8 and cfg.net["name"] == "unet"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: digits\nlerning_rate: 1.0e-3\nstepz: 3\n")
    with pytest.raises(
        ValueError, match=r"bad\.yaml: unknown TrainConfig keys \['lerning_rate', 'stepz'\]; valid keys: .*'lr'"
    ):
        TrainConfig.from_yaml(bad)
    bad.write_text("lr: fast\n")
    with pytest.raises(ValueError, match="lr='fast' is not a number"):
        TrainConfig.from_yaml(bad)


def test_cifar10_config_builds_ho_et_al_35_7m_unet():
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "cifar10.yaml")
    assert (cfg.lr, cfg.batch_size, cfg.ema_decay, cfg.warmup, cfg.steps) == (2e-4, 128, 0.9999, 5000, 800_000)
    net = UNet(**{k: v for k, v in cfg.net.items() if k != "name"}, in_channels=3, image_size=32)
    assert net.num_parameters() == 35_746_307 and cfg.net["dropout"] == 0.1 and cfg.flip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_or_fp16_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
        train(tiny(device="cuda"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"precision=.fp16. \(autocast \+ GradScaler\) is for CUDA"):
        train(tiny(precision="fp16"), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="precision='fp8'"):
        tiny(precision="fp8")


def test_tensorboard_logs_or_skips_with_a_notice(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    train(tiny(steps=2, tensorboard=True, sample_every=2, sample_count=4), tmp_path / "tb", progress=False)
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # import fails
    train(tiny(steps=2, tensorboard=True), tmp_path / "none", progress=False)
    assert "notice: tensorboard not installed" in capsys.readouterr().err
    assert not (tmp_path / "none" / "tensorboard").exists()


def test_image_grid_layout_and_png(tmp_path):
    x = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 3, 2)  # image i is constant
    pixels = make_grid(x, nrow=2, padding=1, pad_value=-1.0)
    assert pixels.shape == grid_size(5, 3, 2, nrow=2, padding=1) == (3 * 4 + 1, 2 * 3 + 1)
    for i in range(5):  # image i at row i // 2, column i % 2, value (x + 1) * 127.5
        top, left = 1 + (i // 2) * 4, 1 + (i % 2) * 3
        assert (pixels[top : top + 3, left : left + 2] == round((x[i, 0, 0, 0].item() + 1) * 127.5)).all()
    assert pixels[0].max() == 0 and pixels[-4:, 4:].max() == 0  # padding and the empty last cell
    rgb = torch.rand(3, 3, 4, 4) * 2 - 1
    path = save_image_grid(rgb, tmp_path / "g.png", nrow=3, scale=2)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (3 * (8 + 2) + 2, 8 + 2 + 2)
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporary file left
    with pytest.raises(ValueError, match="C = 1 or 3"):
        make_grid(torch.zeros(2, 2, 4, 4))
