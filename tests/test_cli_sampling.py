"""Sampling loaded checkpoints (issue #10, items 2 and 5): no autograd graph, batches, class labels.

* A loaded model is for inference: ``load_denoiser`` freezes its weights, so a sampler called without
  ``torch.no_grad`` records no graph (it held 2.7 GB for 2,000 samples x 50 steps), while gradients
  with respect to the input still flow (the likelihood's divergence needs them).
* ``sample`` / ``evaluate --batch-size B`` draw batch after batch from one seeded stream: the samples
  equal the same loop written out in Python, bit for bit, and B >= n is the single-batch draw.
* ``--class`` / ``--labels`` reach the network as ``class_labels``: the samples equal the Python call
  with those labels, bit for bit; a class-conditional model gets labels i mod K by default; an
  unconditional model and out-of-range labels are refused.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import torchdiffusion as td
from torchdiffusion.app.cli import main
from torchdiffusion.names import get_sampler
from torchdiffusion.training.checkpoint import load_denoiser
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--width", "32", "--depth", "1", "--batch-size", "64", "--no-progress"]
UNET = {"name": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
UNET = {**UNET, "dropout": 0.0, "groups": 8}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons") / "run"
    r = run("train", "--data", "moons", "--steps", 20, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A tiny class-conditional U-Net on the 8x8 digits (10 classes), 6 steps."""
    out = tmp_path_factory.mktemp("cond") / "run"
    cfg = TrainConfig(data="digits", net=UNET, steps=6, batch_size=8, warmup=2, class_conditional=True)
    train(cfg, out, progress=False)
    return out


# -- item 2: a loaded model records no graph -------------------------------------------------------------


def test_samples_of_a_loaded_checkpoint_carry_no_graph(moons):
    """The README's example without torch.no_grad: the samples have no grad_fn, the weights are frozen and in
    eval mode."""
    denoiser, process, _ = load_denoiser(moons)
    assert not any(p.requires_grad for p in denoiser.parameters())
    assert not any(m.training for m in denoiser.modules())
    gen = torch.Generator().manual_seed(0)
    x_T = process.prior_sample((64, 2), generator=gen)
    x0 = td.sample_ddpm(denoiser, process, x_T, td.grid_t(process, 10), generator=gen)
    assert x0.grad_fn is None and not x0.requires_grad
    for ema in (True, False):  # the raw weights too
        assert not any(p.requires_grad for p in load_denoiser(moons, ema=ema)[0].parameters())


def test_the_gradient_with_respect_to_the_input_still_flows(moons):
    """J v by autograd equals the central difference (f(x + h v) - f(x - h v)) / 2h in float64: truncation
    h^2 |f'''| / 6 and rounding eps |f| / h are both below 1e-8 for h = 1e-5 and a smooth MLP of unit-scale
    outputs, so 1e-6 (relative to |J v| + 1) can only fail if the gradient is wrong or missing."""
    denoiser, process, _ = load_denoiser(moons, clip=False)  # the clamp's kinks would make f non-smooth
    denoiser = denoiser.double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    v = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    t = torch.full((16,), 0.4, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    out = denoiser(xg, t)
    assert out.grad_fn is not None
    (jv,) = torch.autograd.functional.jvp(lambda y: denoiser(y, t), (x,), (v,))[1:]
    h = 1e-5
    with torch.no_grad():
        fd = (denoiser(x + h * v, t) - denoiser(x - h * v, t)) / (2 * h)
    assert float((jv - fd).abs().max()) <= 1e-6 * (float(jv.abs().max()) + 1)
    assert float(jv.abs().max()) > 0


def test_a_training_time_denoiser_keeps_its_gradients(tmp_path):
    """Freezing is for loaded checkpoints only: the net train() returns, wrapped as a denoiser, still trains."""
    cfg = TrainConfig(data="moons", net={"name": "mlp", "width": 16, "depth": 1}, steps=2)
    res = train(cfg, tmp_path / "r", progress=False)
    assert all(p.requires_grad for p in res.net.parameters())
    denoiser = td.as_denoiser(td.Preconditioned(res.net, res.process, res.config["sigma_data"]), res.process, td.EPS)
    out = denoiser(torch.randn(8, 2), torch.full((8,), 0.5))
    assert out.grad_fn is not None
    load_denoiser(tmp_path / "r")
    assert all(p.requires_grad for p in res.net.parameters())  # loading the run does not touch the user's net


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_likelihood_of_a_loaded_checkpoint_still_differentiates(moons, trace):
    """The ODE likelihood needs d x0_hat / d x (the divergence): with frozen weights it still runs."""
    args = ["likelihood", "--checkpoint", moons, "--data", "moons", "--n", 8, "--rtol", 1e-3, "--atol", 1e-3]
    r = run(*args, "--no-progress", *(["--hutchinson"] if trace == "hutchinson" else []))
    assert r.exit_code == 0, r.output
    nll = float(r.output.split("NLL = ")[1].split()[0])
    assert math.isfinite(nll)


# -- --batch-size --------------------------------------------------------------------------------------------


def _python_draw(denoiser, process, sampler, n, batch, steps, seed, shape, labels=None, grid=td.grid_t):
    """What `sample --batch-size` promises, written out: prior noise then the sampler, batch after batch."""
    gen, ts, out = torch.Generator().manual_seed(seed), grid(process, steps), []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = process.prior_sample((b, *shape), generator=gen)
        cond = {} if labels is None else {"class_labels": labels[start : start + b]}
        with torch.no_grad():
            out.append(get_sampler(sampler)(denoiser, process, x, ts, generator=gen, **cond))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("batch", [7, 20, 50, 1000])
def test_sample_in_batches_is_the_same_loop_as_in_python(moons, tmp_path, monkeypatch, batch):
    """Bit-equal to the loop of ``_python_draw``; one progress bar over every batch's steps."""
    import torchdiffusion.samplers as samplers

    totals = []
    real = samplers.progress_callback

    def counting(total, *args, **kwargs):
        totals.append(total)
        return real(total, *args, **kwargs)

    monkeypatch.setattr(samplers, "progress_callback", counting)
    out = tmp_path / "s.npy"
    r = run("sample", "--checkpoint", moons, "--n", 50, "--steps", 6, "--grid", "t", "--batch-size", batch,
            "--out", out, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    denoiser, process, _ = load_denoiser(moons)
    expected = _python_draw(denoiser, process, "ddpm", 50, batch, 6, 0, (2,))
    assert np.array_equal(np.load(out), expected)
    assert totals == [6 * math.ceil(50 / batch)]


def test_default_batch_is_the_single_draw_for_points(moons, tmp_path):
    """Points are drawn in one batch by default: the same samples as --batch-size n."""
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    common = ("sample", "--checkpoint", moons, "--n", 30, "--steps", 4, "--no-progress")
    assert run(*common, "--out", a).exit_code == 0
    assert run(*common, "--out", b, "--batch-size", 30).exit_code == 0
    assert np.array_equal(np.load(a), np.load(b))


# -- item 5: class labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, labels",
    [
        ([], torch.arange(12) % 10),  # the default: every class evenly
        (["--class", "3"], torch.full((12,), 3)),
        (["--labels", "0,3,7"], torch.tensor([0, 3, 7] * 4)),
        (["--labels", "npy"], torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2])),
    ],
    ids=["default", "class", "list", "npy"],
)
def test_labels_reach_the_network(conditional, tmp_path, option, labels):
    """The CLI's samples equal the Python call with the expected class_labels, bit for bit (in float32: the
    precision "auto" would choose depends on the CPU, tests/test_sampling_precision.py)."""
    if option == ["--labels", "npy"]:
        np.save(tmp_path / "labels.npy", labels.numpy())
        option = ["--labels", tmp_path / "labels.npy"]
    out = tmp_path / "s.npy"
    r = run("sample", "--checkpoint", conditional, "--sampler", "dpmpp_2m", "--steps", 3, "--grid", "lam",
            "--n", 12, "--batch-size", 5, "--out", out, "--no-progress", "--precision", "fp32", *option)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "class-conditional model" in r.output
    denoiser, process, _ = load_denoiser(conditional)
    expected = _python_draw(denoiser, process, "dpmpp_2m", 12, 5, 3, 0, (1, 8, 8), labels, grid=td.grid_lam)
    assert np.array_equal(np.load(out), expected)


def test_labels_change_the_samples(conditional, tmp_path):
    """Same seed, another class: other images (the labels are not ignored)."""
    outs = [tmp_path / f"{k}.npy" for k in (1, 2)]
    for k, out in zip((1, 2), outs, strict=True):
        r = run("sample", "--checkpoint", conditional, "--sampler", "ddim", "--steps", 3, "--n", 4, "--class", k,
                "--out", out, "--no-progress")  # fmt: skip
        assert r.exit_code == 0, r.output
    assert not np.array_equal(np.load(outs[0]), np.load(outs[1]))


@pytest.mark.parametrize(
    "model, option, words",
    [
        ("moons", ["--class", "1"], ["not class-conditional", "--class"]),
        ("moons", ["--labels", "0,1"], ["not class-conditional", "--labels"]),
        ("conditional", ["--class", "10"], ["out of range", "0..9"]),
        ("conditional", ["--labels", "1,-1"], ["out of range", "0..9"]),
        ("conditional", ["--labels", "one,two"], ["comma-separated", "0,3,7"]),
        ("conditional", ["--labels", "1,2", "--class", "1"], ["not both"]),
        ("conditional", ["--labels", ",".join(["1"] * 9)], ["9 labels for 8 samples"]),
        ("conditional", ["--labels", "floats"], ["integer labels", "float64"]),
    ],
)
def test_bad_labels_are_refused_before_sampling(request, tmp_path, model, option, words):
    if option == ["--labels", "floats"]:
        np.save(tmp_path / "f.npy", np.array([1.0, 2.0]))
        option = ["--labels", tmp_path / "f.npy"]
    out = tmp_path / "s.npy"
    r = run("sample", "--checkpoint", request.getfixturevalue(model), "--n", 8, "--steps", 2, "--out", out,
            "--no-progress", *option)  # fmt: skip
    assert r.exit_code == 2
    for w in words:
        assert w in r.output
    assert not out.exists()


def test_evaluate_samples_with_labels_in_batches(conditional, tmp_path, monkeypatch):
    """evaluate draws its images like sample (labels, batches); the metric itself is stubbed out here."""
    import torchdiffusion.evaluation.features as features
    import torchdiffusion.evaluation.image_metrics as image_metrics

    seen = {}

    def fake_metrics(fake, real, **kw):
        seen["fake"] = fake
        return {"features": "stub", "fid": 0.0, "kid_mean": 0.0, "kid_std": 0.0, "precision": 1.0, "recall": 1.0,
                "n_fake": len(fake), "n_real": len(real)}  # fmt: skip

    monkeypatch.setattr(features, "feature_net_for", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(image_metrics, "evaluate_images", fake_metrics)
    r = run("evaluate", "--checkpoint", conditional, "--data", "digits", "--n", 9, "--steps", 3, "--sampler", "ddim",
            "--labels", "4,5", "--batch-size", 4, "--no-progress", "--precision", "fp32")  # fmt: skip
    assert r.exit_code == 0, r.output
    denoiser, process, _ = load_denoiser(conditional)  # float32, as asked ("auto" depends on the CPU)
    labels = torch.tensor([4, 5] * 5)[:9]
    # grid_lam: evaluate runs each sampler on its usual grid
    expected = _python_draw(denoiser, process, "ddim", 9, 4, 3, 0, (1, 8, 8), labels, grid=td.grid_lam)
    assert np.array_equal(seen["fake"].numpy(), expected)
