"""The U-Net speed levers (issue 15, item 1): precision "auto", the bf16 layout, fp32 attention under autocast, and
the denoiser's per-time coefficients computed once per time.

"auto" is checked against a faked capability (``native_bf16`` and the CPU flags monkeypatched), never against the
machine the tests run on; a bf16 training run is checked for a finite loss, its recorded precision and a resume
that keeps it. The coefficient memo must give bit-identical results to computing the coefficients afresh.
"""

import math

import pytest
import torch

import torchdiffusion.training.distributed as dist_mod
from torchdiffusion import Discrete, Preconditioned, as_denoiser, beta_linear
from torchdiffusion.nets.unet import Attention, UNet
from torchdiffusion.training.checkpoint import load_checkpoint
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.distributed import native_bf16, resolve_precision, unet_layout
from torchdiffusion.training.loop import train

CPU = torch.device("cpu")
# 2 channels per GroupNorm group: the U-Net picks channels-last for itself in float32
UNET = {"name": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
UNET = {**UNET, "dropout": 0.0, "groups": 4}


def tiny(**kw) -> TrainConfig:
    base = dict(data="digits", net=UNET, steps=4, batch_size=8, warmup=1, lr=1e-3, log_every=2, checkpoint_every=2)
    return TrainConfig(**{**base, **kw})


# -- precision "auto" ----------------------------------------------------------------------------------------------


FLAGS = [({"avx512_bf16"}, False), ({"amx_bf16", "amx_tile"}, True), (set(), False)]


@pytest.mark.parametrize("flags, expected", FLAGS)
def test_native_bf16_reads_the_cpu_flags(monkeypatch, flags, expected):
    """AMX counts; AVX512_BF16 alone does not (measured slower than float32: README, "U-Net speed")."""
    monkeypatch.setattr(dist_mod, "_cpu_flags", lambda: flags | {"sse2", "avx512f"})
    assert native_bf16(CPU) is expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_for_the_unet_on_native_bf16(monkeypatch, native):
    monkeypatch.setattr(dist_mod, "native_bf16", lambda device: native)
    assert resolve_precision("auto", CPU, "unet") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", torch.device("cuda"), "unet") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", CPU, "mlp") == "fp32"  # measured: the MLP gains nothing from bf16
    for explicit in ("fp32", "bf16", "fp16"):  # an explicit choice is kept whatever the device
        assert resolve_precision(explicit, CPU, "unet") == explicit


def test_bf16_on_the_cpu_runs_the_unet_in_nchw():
    assert unet_layout("bf16", CPU) == torch.contiguous_format
    assert unet_layout("fp32", CPU) is None and unet_layout("bf16", torch.device("cuda")) is None


def test_config_defaults_to_auto_and_names_the_choices():
    assert TrainConfig().precision == "auto"
    with pytest.raises(ValueError, match=r"precision='fp8'.*precisions: auto, fp32, bf16, fp16"):
        TrainConfig(precision="fp8")


def test_auto_trains_in_bf16_with_a_finite_loss_and_a_resume_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(dist_mod, "native_bf16", lambda device: True)
    seen = []
    first = train(tiny(steps=2), tmp_path, progress=False, callback=lambda s, i: seen.append(i["loss"]))
    assert len(seen) == 2 and all(math.isfinite(v) and v > 0 for v in seen)
    assert first.config["precision"] == "bf16" and load_checkpoint(tmp_path).config["precision"] == "bf16"
    assert first.net.memory_format == torch.contiguous_format  # NCHW under bf16 on the CPU
    # The machine "loses" bf16: the resumed run keeps the precision it started with (no config-change refusal).
    monkeypatch.setattr(dist_mod, "native_bf16", lambda device: False)
    resumed = train(tiny(steps=4), tmp_path, resume=True, progress=False)
    assert resumed.config["precision"] == "bf16" and resumed.history[-1]["step"] == 4
    assert math.isfinite(resumed.history[-1]["loss"])


def test_auto_without_native_bf16_is_fp32_in_the_nets_own_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(dist_mod, "native_bf16", lambda device: False)
    run = train(tiny(steps=1, checkpoint_every=1), tmp_path, progress=False)
    assert run.config["precision"] == "fp32" and run.net.memory_format == torch.channels_last


# -- attention under autocast --------------------------------------------------------------------------------------


def test_attention_under_bf16_autocast_matches_float32_within_bf16_rounding():
    """Under autocast the projections' inputs, weights and outputs round to bf16 (unit roundoff u = 2^-8), at most
    6 roundings in series (qkv: input, weight, output; proj: the same); the softmax attention runs in float32. An
    inner product of C terms with relative errors u in its factors errs by u |w||x|, and |w||x| / |w.x| is about
    sqrt(C) for random weights (Higham 2002, Sec. 3.1): the output errs by at most ~6 u sqrt(C) of its scale."""
    torch.manual_seed(0)
    C = 64
    att = Attention(C, heads=2, groups=32)
    torch.nn.init.normal_(att.proj.weight, std=C**-0.5)  # proj starts at zero: give it weights
    x = torch.randn(4, C, 4, 4)
    ref = att(x) - x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = att(x) - x
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 6 * 2.0**-8 * math.sqrt(C) * ref.abs().max()


# -- the denoiser's coefficients, once per time --------------------------------------------------------------------


def _denoiser():
    torch.manual_seed(0)
    net = UNet(1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), groups=4)
    for p in net.out[-1].parameters():  # the last convolution starts at zero: give the output a dependence on x
        torch.nn.init.normal_(p, std=0.1)
    process = Discrete.from_schedule(beta_linear, 1000)
    return as_denoiser(Preconditioned(net.eval(), process), process), process


def test_remembered_coefficients_give_bit_identical_outputs():
    den, _ = _denoiser()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        fresh = den(x, torch.full((5,), 417.0))  # per-example times (stride 1): computed afresh
        scalar = [den(x, 417.0), den(x, torch.tensor(417.0)), den(x, torch.tensor(417.0).expand(5))]
        again = den(x, torch.tensor(417.0, dtype=torch.float32).expand(5))  # the same time: from the memo
    for out in (*scalar, again):
        assert torch.equal(out, fresh)
    assert den.model._memo and all(k[0] == 417.0 for k in den.model._memo)


def test_a_new_time_or_sigma_data_is_not_served_from_the_memo():
    den, _ = _denoiser()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        a = den(x, 300.0)
        den.model.sigma_data = 0.5  # changes c_in: a different key
        b = den(x, 300.0)
        c = den(x, torch.full((3,), 300.0))
        d = den(x, 301.0)
    assert not torch.equal(a, b) and torch.equal(b, c) and not torch.equal(b, d)


def test_another_process_is_not_served_from_the_memo():
    """The memo belongs to the process it was filled for: after ``.process`` is replaced, the coefficients are the
    new process's (the memo held the old one's id once, and an id can be reused after the old object is freed)."""
    den, process = _denoiser()
    pre, x = den.model, torch.randn(3, 1, 8, 8)
    t = torch.full((3,), 300.0, dtype=torch.float64)
    key = (300.0, 3, 4, x.dtype, False)
    first = pre.coefficients(t, x, key)
    pre.process = Discrete.from_schedule(beta_linear, 500)  # another schedule: other alpha, sigma at t = 300
    second, fresh = pre.coefficients(t, x, key), pre.coefficients(t, x)
    assert all(torch.equal(a, b) for a, b in zip(second, fresh, strict=True))
    assert not torch.equal(first[0], second[0])


def test_inference_mode_coefficients_do_not_leak_into_a_gradient():
    """Guidance differentiates the denoiser in x after sampling in inference mode: tensors made in inference mode
    cannot be saved for backward, so the memo keeps the two apart."""
    den, _ = _denoiser()
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        den(x, 250.0)
    xg = x.clone().requires_grad_(True)
    den(xg, 250.0).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
