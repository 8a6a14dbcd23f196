"""Sampling precision (issue 15, item 1): ``Pipeline.sample(precision=...)``, ``sample --precision`` and
``AutocastDenoiser``.

"auto" is checked against a faked capability (``native_bf16`` monkeypatched), never against the machine the tests
run on. bf16 is checked against float32 with the rounding bound of bfloat16 (8 significant bits), derived below.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import torchdiffusion as td
import torchdiffusion.training.distributed as dist_mod
from torchdiffusion.app.cli import main
from torchdiffusion.core.denoiser import AutocastDenoiser
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.distributed import resolve_precision
from torchdiffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
UNET = {"name": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
UNET = {**UNET, "dropout": 0.0, "groups": 4}
U_BF16 = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits, round to nearest
EPS_FP32 = 2.0**-24


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    """A tiny U-Net on the 8x8 digits, 2 steps in float32 (its weights, not its quality, matter here)."""
    out = tmp_path_factory.mktemp("unet") / "run"
    cfg = TrainConfig(data="digits", net=UNET, steps=2, batch_size=8, warmup=1, precision="fp32")
    train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp") / "run"
    train(TrainConfig(data="moons", net={"name": "mlp", "width": 16, "depth": 1}, steps=2), out, progress=False)
    return out


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# -- "auto" -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_auto_is_bf16_for_the_unet_on_native_bf16_at_any_thread_count(monkeypatch, native, threads):
    monkeypatch.setattr(dist_mod, "native_bf16", lambda device: native)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert resolve_precision("auto", CPU, "unet") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", CPU, "mlp") == "fp32"


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*auto.*fp32.*bf16.*fp16"):
        resolve_precision("fp8", CPU, "unet")


# -- AutocastDenoiser ---------------------------------------------------------------------------------------------


def test_the_network_runs_under_autocast_and_returns_x_dtype():
    seen = []

    def denoiser(x, t, **cond):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), cond))
        return x * 0.5

    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 2, dtype=dtype)
        out = AutocastDenoiser(denoiser, "cpu", torch.bfloat16)(x, torch.ones(3), class_labels=1)
        assert out.dtype == dtype and torch.equal(out, x * 0.5)  # elementwise work is not lowered
    assert all(on and d == torch.bfloat16 and c == {"class_labels": 1} for on, d, c in seen)
    assert not torch.is_autocast_enabled("cpu")  # and autocast ends with the call


def test_a_linear_network_in_bf16_is_float32_within_bf16_rounding():
    """y = W x + b under autocast: x, W and b are rounded to bf16 (relative error <= u each), the products summed
    in float32 (<= n eps_32 of sum |W||x|), the result rounded to bf16 (<= u |y|). So
    |y_bf16 - y_32| <= (2u + u^2 + n eps_32)(|W||x| + |b|)(1 + u) + u |y_32| (1 + ...), bounded here with a 2x
    margin for the second-order terms; the difference must also be nonzero (the product really was lowered)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(16, 64)
    exact = net(x)
    low = AutocastDenoiser(lambda x, t: net(x), "cpu", torch.bfloat16)(x, torch.ones(16))
    n = net.in_features
    scale = x.abs() @ net.weight.abs().T + net.bias.abs()
    bound = 2 * ((2 * U_BF16 + U_BF16**2 + n * EPS_FP32) * scale + U_BF16 * exact.abs())
    err = (low - exact).abs()
    assert low.dtype == torch.float32
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float(err.max()) > 0


# -- Pipeline.sample and the command line -------------------------------------------------------------------------


def _draw(run, precision, **kw):
    return td.load(run).sample(6, steps=3, generator=seeded(), precision=precision, **kw)


def test_fp32_is_the_loaded_denoiser_and_bf16_its_autocast_wrap(unet_run):
    pipe = td.load(unet_run)
    den, p32 = pipe.sampling_denoiser("fp32")
    assert den is pipe.denoiser and p32 == "fp32"
    den, p16 = pipe.sampling_denoiser("bf16")
    assert isinstance(den, AutocastDenoiser) and den.denoiser is pipe.denoiser and den.dtype == torch.bfloat16
    a, b = _draw(unet_run, "fp32"), _draw(unet_run, "bf16")
    assert a.dtype == b.dtype == torch.float32 and torch.isfinite(b).all()
    assert not torch.equal(a, b)  # the network did run in bf16
    by_hand = td.load(unet_run)
    by_hand = td.app.pipeline.draw_samples(
        td.names.get_sampler("unipc_3"), AutocastDenoiser(by_hand.denoiser, "cpu", torch.bfloat16), by_hand.process,
        by_hand.shape, 6, td.grid_optimized(by_hand.process, 3), generator=seeded(), final_denoise=False,
    )  # fmt: skip
    assert torch.equal(b, by_hand)


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_for_a_unet_and_fp32_for_an_mlp(unet_run, mlp_run, monkeypatch, native):
    monkeypatch.setattr(dist_mod, "native_bf16", lambda device: native)
    assert td.load(unet_run).sampling_denoiser("auto")[1] == ("bf16" if native else "fp32")
    assert torch.equal(_draw(unet_run, "auto"), _draw(unet_run, "bf16" if native else "fp32"))
    assert td.load(mlp_run).sampling_denoiser("auto")[1] == "fp32"
    assert torch.equal(_draw(mlp_run, "auto"), _draw(mlp_run, "fp32"))


def test_a_bad_precision_is_refused_by_sample(unet_run):
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        td.load(unet_run).sample(2, steps=2, precision="half")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_command_line_equals_python_and_says_bf16(unet_run, tmp_path, precision):
    out = tmp_path / "s.npy"
    args = ["sample", "--checkpoint", unet_run, "--steps", 3, "--n", 6, "--out", out, "--no-progress"]
    r = CliRunner().invoke(main, [str(a) for a in [*args, "--precision", precision]], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert ("network in bf16 autocast" in r.output) is (precision == "bf16")
    assert np.array_equal(np.load(out), _draw(unet_run, precision).numpy())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluate_samples_in_the_precision_sample_uses(unet_run, monkeypatch, precision):
    """``evaluate`` measures what ``sample`` draws: the same ``at_precision`` wrap (its feature net and metrics are
    stubbed out here; the sampling call is where the denoiser is seen)."""
    import torchdiffusion.app.cli.evaluate as evaluate_mod
    import torchdiffusion.evaluation.features as features_mod

    seen = []

    class Stop(Exception):
        pass

    def spy(sampler, denoiser, *args, **kwargs):
        seen.append(denoiser)
        raise Stop

    monkeypatch.setattr(features_mod, "feature_net_for", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(evaluate_mod, "_draw", spy)
    args = ["evaluate", "--checkpoint", unet_run, "--data", "digits", "--n", 4, "--steps", 2, "--precision", precision]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert isinstance(r.exception, Stop), r.output
    assert isinstance(seen[0], AutocastDenoiser) is (precision == "bf16")
    assert ("network in bf16 autocast" in r.output) is (precision == "bf16")
