"""Tests for the training loop (train.py) and checkpoints (checkpoint.py).

Small CPU runs: a 2-block MLP of width 32 on a few hundred points, a few dozen steps each. The
learning test compares against the Bayes-optimal eps-loss of Gaussian data, known in closed form.
"""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from torchdiffusion.core.denoiser import Preconditioned, as_denoiser
from torchdiffusion.core.predictions import EPS
from torchdiffusion.names import build_net
from torchdiffusion.objectives import denoising as losses
from torchdiffusion.training import checkpoint as ckpt_mod
from torchdiffusion.training.checkpoint import (
    FILES,
    FORMAT_VERSION,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_denoiser,
    save_checkpoint,
)
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.ema import ema_update
from torchdiffusion.training.loop import LOG_COLUMNS, train
from torchdiffusion.training.step import lr_at

NET = {"name": "mlp", "width": 32, "depth": 2, "emb_dim": 16}


def tiny(**kw) -> TrainConfig:
    base = dict(
        n_data=256, net=NET, steps=60, batch_size=32, warmup=5, lr=2e-3, checkpoint_every=20, log_every=5, ema_decay=0.9
    )
    return TrainConfig(**{**base, **kw})


def weights(*nets) -> list[torch.Tensor]:
    return [t for net in nets for t in net.state_dict().values()]


def assert_bit_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def read_log(run_dir) -> tuple[list[str], list[dict]]:
    with open(run_dir / "log.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def snapshot(directory) -> dict:
    """Path -> bytes of every file below ``directory``."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- checkpoints -----------------------------------------------------------------------------------


def make_nets(seed=0, **spec):
    torch.manual_seed(seed)
    net = build_net({**NET, "dim": 2, **spec})
    for p in net.parameters():  # the output layer starts at zero: make every tensor distinctive
        torch.nn.init.normal_(p)
    return net, build_net({**NET, "dim": 2, **spec})


CONFIG = {"process": {"name": "vp"}, "net": {**NET, "dim": 2}, "target": "eps", "sigma_data": 0.7}


def save(run_dir, net, ema, step=3):
    state = {"step": step, "rng": torch.Generator().manual_seed(5).get_state(), "pos": 7, "x": [1.5, "a"]}
    save_checkpoint(run_dir, net=net, ema_net=ema, config=CONFIG, state=state)
    return state


def test_checkpoint_round_trip(tmp_path):
    net, ema = make_nets()
    state = save(tmp_path, net, ema)
    assert sorted(os.listdir(tmp_path / "checkpoint")) == sorted(FILES)
    for path in (tmp_path, tmp_path / "checkpoint"):  # run dir or checkpoint dir
        ck = load_checkpoint(path)
        assert_bit_equal(weights(ck.net, ck.ema_net), weights(net, ema))
        assert ck.config == {**CONFIG, "step": 3, "format_version": FORMAT_VERSION} and ck.step == 3
        assert torch.equal(ck.state["rng"], state["rng"]) and ck.state["pos"] == 7 and ck.state["x"] == [1.5, "a"]
    denoiser, process, config = load_denoiser(tmp_path)
    assert not denoiser.training and config["target"] == "eps"
    x, t = torch.randn(5, 2), torch.rand(5) * 0.9 + 0.05
    expected = as_denoiser(Preconditioned(ema, process, 0.7), process, EPS)(x, t)
    assert torch.equal(denoiser(x, t), expected)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    net, ema = make_nets()
    save(tmp_path, net, ema, step=1)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, *make_nets(seed=1), step=2)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1
    assert_bit_equal(weights(ck.net, ck.ema_net), weights(net, ema))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # no temp dir, no checkpoint.old


def test_crash_between_renames_falls_back_to_checkpoint_old(tmp_path, monkeypatch):
    net, ema = make_nets()
    save(tmp_path, net, ema, step=1)
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):  # checkpoint -> checkpoint.old succeeds, temp -> checkpoint "crashes"
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, *make_nets(seed=1), step=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.old"]
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1
    assert_bit_equal(weights(ck.net), weights(net))
    save(tmp_path, *make_nets(seed=1), step=2)  # the next save recovers a clean layout
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"] and load_checkpoint(tmp_path).step == 2


@pytest.mark.parametrize("name", FILES)
def test_truncated_file_is_reported(tmp_path, name):
    save(tmp_path, *make_nets())
    path = tmp_path / "checkpoint" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(tmp_path)


def test_missing_path_missing_files_and_wrong_version(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    save(tmp_path, *make_nets())
    (tmp_path / "checkpoint" / "ema.safetensors").unlink()
    (tmp_path / "checkpoint" / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing ema.safetensors, state.pt"):
        load_checkpoint(tmp_path)
    save(tmp_path, *make_nets())
    path = tmp_path / "checkpoint" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"width": 16}, r"key 'inp\.weight' has shape \(32, 2\), the network expects \(16, 2\)"),
        ({"depth": 3}, r"missing key 'blocks\.2\."),
        ({"depth": 1}, r"unexpected key 'blocks\.1\."),
    ],
)
def test_weights_that_do_not_match_the_config(tmp_path, change, message):
    save(tmp_path, *make_nets())
    path = tmp_path / "checkpoint" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "net": {**config["net"], **change}}))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


# -- the training loop -----------------------------------------------------------------------------


class Stop(Exception):
    pass


def stop_at(step, exc):
    def callback(s, info):
        if s == step:
            raise exc

    return callback


def ctrl_c_inside_step(monkeypatch, step):
    """Ctrl-C after the loss of ``step`` drew its batch, times and noise, before the weights change."""
    real, calls = losses.denoising_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) == step:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(losses, "denoising_loss", loss)


@pytest.mark.parametrize("how, saved_at", [("error", 20), ("ctrl-c", 33), ("ctrl-c inside step 34", 33)])
def test_resume_equals_uninterrupted_run_bit_exactly(tmp_path, monkeypatch, how, saved_at):
    full = train(tiny(), tmp_path / "full", progress=False)
    # An error in the callback keeps the step-20 checkpoint; Ctrl-C saves the last completed step.
    callback = {"error": stop_at(33, Stop), "ctrl-c": stop_at(33, KeyboardInterrupt)}.get(how)
    if callback is None:
        ctrl_c_inside_step(monkeypatch, 34)
    with pytest.raises(Stop if how == "error" else KeyboardInterrupt):
        train(tiny(), tmp_path / "cut", progress=False, callback=callback)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut").step == saved_at
    resumed = train(tiny(), tmp_path / "cut", resume=True, progress=False)
    assert_bit_equal(weights(resumed.net, resumed.ema_net), weights(full.net, full.ema_net))
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert_bit_equal(weights(a.net, a.ema_net), weights(b.net, b.ema_net))
    header, rows = read_log(tmp_path / "cut")
    assert tuple(header) == LOG_COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(5, 61, 5))  # truncated, then continued once
    _, full_rows = read_log(tmp_path / "full")
    for r, f in zip(rows, full_rows, strict=True):  # windows align here, so the losses agree too
        assert float(r["loss"]) == float(f["loss"]) and float(r["lr"]) == float(f["lr"])
    assert [h["step"] for h in resumed.history] == list(range(5, 61, 5))


def test_existing_run_is_not_overwritten(tmp_path):
    train(tiny(steps=10), tmp_path, progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(tiny(steps=10), tmp_path, progress=False)
    assert snapshot(tmp_path) == before


def test_resume_with_a_changed_config_is_refused_but_more_steps_are_fine(tmp_path):
    train(tiny(steps=10, checkpoint_every=10), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"\['batch_size', 'lr'\]"):
        train(tiny(steps=20, checkpoint_every=10, lr=1e-3, batch_size=16), tmp_path, resume=True, progress=False)
    result = train(tiny(steps=20, checkpoint_every=10), tmp_path, resume=True, progress=False)
    assert load_checkpoint(tmp_path).step == 20 and result.config["steps"] == 20


def test_resume_without_checkpoint_starts_afresh(tmp_path):
    (tmp_path / "log.csv").write_text("step,loss,lr,grad_norm,steps_per_s\n5,1,1,1,1\n")
    result = train(tiny(steps=5), tmp_path, resume=True, progress=False)
    assert [h["step"] for h in result.history] == [5]
    assert len(read_log(tmp_path)[1]) == 1


def test_seeded_runs_are_deterministic_and_leave_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = train(tiny(steps=15), tmp_path / "a", progress=False)
    assert torch.equal(torch.rand(3), expected)  # the run drew nothing from the caller's RNG
    b = train(tiny(steps=15), tmp_path / "b", progress=False)
    c = train(tiny(steps=15, seed=1), tmp_path / "c", progress=False)
    assert_bit_equal(weights(a.net, a.ema_net), weights(b.net, b.ema_net))
    assert not torch.equal(a.net.inp.weight, c.net.inp.weight)


def test_config_is_resolved_and_round_trips(tmp_path):
    result = train(tiny(steps=3, data="moons"), tmp_path, progress=False)
    assert result.config["net"]["dim"] == 2 and result.config["sigma_data"] > 0
    stored = load_checkpoint(tmp_path).config
    assert TrainConfig.from_dict(stored).to_dict() == result.config
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"lrr": 1.0})
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        TrainConfig(lr_schedule="linear")


def test_ema_with_zero_decay_equals_the_net(tmp_path):
    result = train(tiny(steps=10, ema_decay=0.0), tmp_path, progress=False)
    assert_bit_equal(weights(result.ema_net), weights(result.net))


def test_ema_update_matches_its_closed_form():
    # With constant weights p, k updates give e_k = p + d^k (e_0 - p).
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    e0 = [p.detach().clone() for p in ema.parameters()]
    d, k = 0.9, 7
    for _ in range(k):
        ema_update(ema, net, d)
    for e, p, start in zip(ema.parameters(), net.parameters(), e0, strict=True):
        torch.testing.assert_close(e, p + d**k * (start - p), rtol=0, atol=1e-6)


def test_learning_rate_schedule(tmp_path):
    cfg = tiny(steps=20, warmup=4, lr=1e-2)
    assert [lr_at(k, cfg) for k in range(4)] == [cfg.lr * (k + 1) / 4 for k in range(4)]
    assert lr_at(4, cfg) == cfg.lr and lr_at(12, cfg) == pytest.approx(cfg.lr / 2)
    assert lr_at(20, cfg) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(k, tiny(lr_schedule="constant", warmup=4, lr=1e-2)) == cfg.lr for k in range(4, 60))
    seen = []
    train(cfg, tmp_path, progress=False, callback=lambda s, info: seen.append(info["lr"]))
    assert seen == [lr_at(k, cfg) for k in range(20)]


def test_non_finite_loss_stops_and_keeps_finite_checkpoint(tmp_path, monkeypatch):
    real = losses.denoising_loss
    calls = []

    def nan_at_step_5(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out * math.nan if len(calls) == 5 else out

    monkeypatch.setattr(losses, "denoising_loss", nan_at_step_5)
    with pytest.raises(FloatingPointError, match="at step 5"):
        train(tiny(steps=10, checkpoint_every=2), tmp_path, progress=False)
    ck = load_checkpoint(tmp_path)
    assert ck.step == 4 and all(torch.isfinite(t).all() for t in weights(ck.net, ck.ema_net))


def test_training_approaches_the_bayes_optimal_loss_on_gaussian_data(tmp_path):
    """For x0 ~ N(m, diag(v)), E[eps | x_t] = sigma (x_t - alpha m) / (alpha^2 v + sigma^2) exactly."""
    mean, std = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    gen = torch.Generator().manual_seed(0)
    np.save(tmp_path / "gauss.npy", (mean + std * torch.randn(4096, 2, generator=gen)).numpy())
    cfg = tiny(
        data=tmp_path / "gauss.npy",
        net={**NET, "width": 64},
        steps=300,
        batch_size=256,
        warmup=20,
        checkpoint_every=300,
        log_every=50,
    )
    seen = []
    result = train(cfg, tmp_path / "run", progress=False, callback=lambda s, info: seen.append(info["loss"]))
    # Fresh data, times and noise; the trained network and the exact posterior mean see the same ones.
    x0 = mean + std * torch.randn(20000, 2, generator=gen)
    t = losses.sample_t(result.process, len(x0), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    model = Preconditioned(result.net, result.process, result.config["sigma_data"])
    with torch.no_grad():
        trained = losses.denoising_loss(model, result.process, x0, t=t, noise=noise).mean().item()
    a, s = result.process.alpha(t)[:, None], result.process.sigma(t)[:, None]
    xt = a * x0.double() + s * noise.double()
    eps_hat = s * (xt - a * mean.double()) / (a**2 * std.double() ** 2 + s**2)
    bayes = ((eps_hat - noise.double()) ** 2).mean().item()
    assert trained < 0.5 * np.mean(seen[:5])  # well below the loss at the start
    assert bayes <= trained < 1.05 * bayes  # and within 5% of the best possible
