"""``td.load(run).sample(n)`` (issue #11, item 5): the loop a user would write, nothing more.

* ``Pipeline.sample`` equals the sampler called by hand on ``load_denoiser``'s denoiser (prior noise, then the
  sampler, from one generator), bit for bit, with the sampler's usual grid; a sampler by name equals the
  function; the command line's ``sample`` draws the same samples from the same seed.
* Batches consume one generator in turn: the samples equal the loop written out, B >= n is the single draw,
  and the first batch is always the single draw of its size. Another batch size draws the noise in another
  order, so it gives other samples (as ``sample --batch-size`` documents); that is not asserted either way.
* Class-conditional models get labels i mod K by default; an unconditional model refuses labels.
* With ``clip=True`` the samples end on x0_hat, which lies in the data's box.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import torchdiffusion as td
from torchdiffusion.app.cli import main
from torchdiffusion.names import GRID_FUNCTIONS, INFO, SAMPLERS
from torchdiffusion.samplers import DEFAULT_SAMPLER
from torchdiffusion.training.checkpoint import CheckpointError, load_denoiser
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

UNET = {"name": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
UNET = {**UNET, "dropout": 0.0, "groups": 8}


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons") / "run"
    cfg = TrainConfig(data="moons", net={"name": "mlp", "width": 16, "depth": 1}, steps=3, batch_size=64)
    train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A tiny class-conditional U-Net on the 8x8 digits (10 classes), 2 steps."""
    out = tmp_path_factory.mktemp("cond") / "run"
    cfg = TrainConfig(data="digits", net=UNET, steps=2, batch_size=8, warmup=1, class_conditional=True)
    train(cfg, out, progress=False)
    return out


def by_hand(run, sampler, n, ts, seed, shape=(2,), batch=None, labels=None, **kw):
    """What ``Pipeline.sample`` promises, written out: prior noise, then the sampler, batch after batch."""
    denoiser, process, _ = load_denoiser(run)
    gen, out, batch = torch.Generator().manual_seed(seed), [], batch or n
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = process.prior_sample((b, *shape), generator=gen)
        cond = {} if labels is None else {"class_labels": labels[start : start + b]}
        with torch.no_grad():
            out.append(sampler(denoiser, process, x, ts, generator=gen, **kw, **cond))
    return torch.cat(out)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_load_holds_the_run(moons):
    pipe = td.load(moons)
    _, process, config = load_denoiser(moons)
    assert isinstance(pipe, td.Pipeline) and pipe.shape == (2,) and pipe.num_classes is None
    assert pipe.config == config and repr(pipe.process) == repr(process) and pipe.step == 3 and pipe.target == "eps"
    assert pipe.sigma_data == config["sigma_data"] and list(pipe.data_box) == config["data_box"]
    assert not any(p.requires_grad for p in pipe.denoiser.parameters())
    text = repr(pipe)
    for word in (repr(process), "'eps'", "shape=(2,)", "step=3", "'cpu'"):
        assert word in text, text


def test_samples_have_the_shape_and_no_graph(moons):
    x0 = td.load(moons).sample(7, steps=3, generator=seeded(0))
    assert x0.shape == (7, 2) and x0.dtype == torch.float32 and x0.grad_fn is None and not x0.requires_grad
    assert bool(x0.isfinite().all())


@pytest.mark.parametrize("name", ["unipc_3", "ddpm", "heun"])
def test_sample_is_the_sampler_called_by_hand(moons, name):
    """The default sampler by name (UniPC-3 on grid_lam), a stochastic one (DDPM on grid_t), one on grid_karras.
    (With no sampler and no grid: UniPC-3 on grid_optimized, tests/test_optimized_grid.py.)"""
    pipe, info = td.load(moons), INFO[name]
    ts = GRID_FUNCTIONS[info.grid](pipe.process, 4)
    expected = by_hand(moons, info.fn, 12, ts, seed=5)
    got = pipe.sample(12, sampler=name, steps=4, generator=seeded(5))
    assert torch.equal(got, expected)


def test_a_grid_of_times_and_final_denoise_reach_the_sampler(moons):
    pipe = td.load(moons)
    ts = torch.tensor([pipe.process.t_max, 0.5, 0.2, 0.05], dtype=torch.float64)
    expected = by_hand(moons, DEFAULT_SAMPLER, 9, ts, seed=1, final_denoise=False)
    assert torch.equal(pipe.sample(9, grid=ts, final_denoise=False, generator=seeded(1)), expected)
    assert torch.equal(pipe.sample(9, grid=ts.tolist(), final_denoise=False, generator=seeded(1)), expected)


def test_a_sampler_by_name_equals_the_function(moons):
    pipe = td.load(moons)
    for name in ("dpmpp_2m", "ddim_eta1"):  # ddim_eta1 draws noise: the generator reaches it the same way
        by_name = pipe.sample(10, sampler=name, steps=3, generator=seeded(2))
        by_fn = pipe.sample(10, sampler=SAMPLERS[name], steps=3, generator=seeded(2))
        assert torch.equal(by_name, by_fn)


def test_a_function_outside_the_table_gets_grid_lam(moons):
    """Heun's usual grid is karras; the same function wrapped (unknown to names.INFO) runs on grid_lam."""

    def my_heun(*args, **kwargs):
        return INFO["heun"].fn(*args, **kwargs)

    pipe = td.load(moons)
    got = pipe.sample(8, sampler=my_heun, steps=3, generator=seeded(4))
    assert torch.equal(got, pipe.sample(8, sampler="heun", grid="lam", steps=3, generator=seeded(4)))
    assert not torch.equal(got, pipe.sample(8, sampler="heun", steps=3, generator=seeded(4)))


def test_sampler_options_reach_the_sampler(moons):
    pipe = td.load(moons)
    ts = GRID_FUNCTIONS["lam"](pipe.process, 3)
    expected = by_hand(moons, INFO["ald"].fn, 6, ts, seed=0, n_steps_each=2)
    assert torch.equal(pipe.sample(6, sampler="ald", steps=3, n_steps_each=2, generator=seeded(0)), expected)


@pytest.mark.parametrize("batch", [4, 7, 30])
def test_batches_are_the_loop_written_out(moons, batch):
    """DDPM (noise in every step): each batch draws its prior and its steps' noise from the one generator."""
    pipe, ts = td.load(moons), GRID_FUNCTIONS["t"](td.load(moons).process, 5)
    got = pipe.sample(30, sampler="ddpm", steps=5, batch_size=batch, generator=seeded(3))
    assert torch.equal(got, by_hand(moons, INFO["ddpm"].fn, 30, ts, seed=3, batch=batch))
    # the first batch is the single draw of its size; B >= n is the single draw
    assert torch.equal(got[:batch], pipe.sample(batch, sampler="ddpm", steps=5, generator=seeded(3)))
    assert torch.equal(pipe.sample(30, sampler="ddpm", steps=5, batch_size=99, generator=seeded(3)),
                       pipe.sample(30, sampler="ddpm", steps=5, generator=seeded(3)))  # fmt: skip


def test_the_command_line_draws_the_same_samples(moons, tmp_path):
    out = tmp_path / "s.npy"
    args = ["sample", "--checkpoint", moons, "--sampler", "ddpm", "--steps", 5, "--n", 20, "--batch-size", 8,
            "--seed", 6, "--out", out, "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = td.load(moons).sample(20, sampler="ddpm", steps=5, batch_size=8, generator=seeded(6))
    assert np.array_equal(np.load(out), got.numpy())


def test_progress_bar_counts_every_batch_step(moons, monkeypatch):
    import torchdiffusion.samplers as samplers

    totals, real, steps_seen = [], samplers.progress_callback, []

    def counting(total, *args, **kwargs):
        totals.append(total)
        return real(total, *args, **kwargs)

    monkeypatch.setattr(samplers, "progress_callback", counting)
    td.load(moons).sample(10, sampler="ddim", steps=4, batch_size=3, progress=True, callback=steps_seen.append)
    assert totals == [4 * 4] and len(steps_seen) == 4 * 4 and {"i", "t", "x"} <= set(steps_seen[0])


def test_clipped_samples_end_in_the_data_box(moons):
    """The last step returns x0_hat (sigma(t_min) > 0), which clip=True projects onto the box."""
    pipe = td.load(moons)
    low, high = (torch.tensor(v) for v in pipe.data_box)
    x0 = pipe.sample(200, sampler="euler", steps=2, generator=seeded(0))
    assert bool(((x0 >= low) & (x0 <= high)).all())


def test_class_labels(conditional):
    pipe = td.load(conditional)
    assert pipe.shape == (1, 8, 8) and pipe.num_classes == 10 and "num_classes=10" in repr(pipe)
    ts = GRID_FUNCTIONS["lam"](pipe.process, 2)
    n, fn = 12, INFO["dpmpp_2m"].fn
    listed = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2]
    cases = [(None, torch.arange(n) % 10), (3, torch.full((n,), 3)), (listed, torch.tensor(listed))]
    for labels, expected_labels in cases:  # the default: every class evenly, as on the command line
        expected = by_hand(conditional, fn, n, ts, seed=0, shape=(1, 8, 8), batch=5, labels=expected_labels)
        # by hand is float32; "auto" would be bf16 on a CPU with AMX (tests/test_sampling_precision.py)
        got = pipe.sample(n, sampler="dpmpp_2m", steps=2, batch_size=5, labels=labels, generator=seeded(0),
                          precision="fp32")  # fmt: skip
        assert got.shape == (n, 1, 8, 8) and torch.equal(got, expected)


@pytest.mark.parametrize(
    "labels, words",
    [(10, ["out of range", "0..9"]), ([1, -1, 2], ["out of range"]), ([1, 2], ["3 integers", "(2,)"]),
     ([0.5, 1.0, 2.0], ["integers", "float"])],
)  # fmt: skip
def test_bad_labels_are_refused(conditional, labels, words):
    with pytest.raises(ValueError) as e:
        td.load(conditional).sample(3, steps=1, labels=labels)
    for w in words:
        assert w in str(e.value)


def test_an_unconditional_model_refuses_labels(moons):
    with pytest.raises(ValueError, match="not class-conditional"):
        td.load(moons).sample(3, labels=0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n": 0}, ["n must be a positive integer", "0"]),
        ({"n": 2.5}, ["n must be a positive integer", "2.5"]),
        ({"n": True}, ["n must be a positive integer"]),
        ({"steps": 0}, ["steps must be a positive integer"]),
        ({"batch_size": -1}, ["batch_size must be a positive integer"]),
        ({"sampler": "nope"}, ["unknown sampler 'nope'", "unipc_3", "ddpm"]),
        ({"sampler": 3}, ["sampler must be a sampler function"]),
        ({"grid": "fit"}, ["unknown grid 'fit'", "karras"]),
        ({"grid": [1.0, 0.5], "steps": 1}, ["not both"]),
        ({"grid": [0.5, 1.0]}, ["decreasing"]),
        ({"class_labels": torch.zeros(3)}, ["labels="]),
    ],
)
def test_bad_inputs_are_named(moons, kwargs, words):
    kwargs = {"n": 3, **kwargs}
    with pytest.raises(ValueError) as e:
        td.load(moons).sample(kwargs.pop("n"), **kwargs)
    for w in words:
        assert w in str(e.value)


def test_a_missing_run_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        td.load(tmp_path / "nothing")


def test_import_stays_light():
    """``td.load`` is at the top level, but importing the package loads neither the plots nor the command line."""
    code = "import sys, torchdiffusion; print(sorted({'matplotlib', 'click'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
