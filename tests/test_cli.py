"""The command line end to end in a temporary folder, and its errors on bad input.

Every error case checks two things: a clear message (naming the problem and the valid
choices) and that files already there are left exactly as they were.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from torchdiffusion.app.cli import main

TINY = ["--width", "32", "--depth", "1", "--batch-size", "64", "--no-progress", "--checkpoint-every", "10"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = run("train", "--data", "moons", "--steps", 20, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    return out


def test_help_lists_every_option_with_default():
    r = run("train", "--help")
    assert r.exit_code == 0
    for opt in ("--data", "--process", "--target", "--weighting", "--steps", "--resume", "--width"):
        assert opt in r.output
    assert "default: vp" in r.output


def test_train_writes_checkpoint_and_log(trained):
    ckpt = trained / "checkpoint"
    assert {"model.safetensors", "ema.safetensors", "config.json", "state.pt"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "config.json").read_text())["step"] == 20
    assert (trained / "log.csv").read_text().startswith("step,")


@pytest.mark.parametrize("sampler, extra", [("ddpm", []), ("ald", ["--n-steps-each", "2"])])
def test_sample_writes_npy_and_png(trained, tmp_path, sampler, extra):
    out = tmp_path / "s.npy"
    r = run("sample", "--checkpoint", trained, "--sampler", sampler, "--steps", 5, "--n", 50, "--out", out, *extra)
    assert r.exit_code == 0, r.output
    x = np.load(out)
    assert x.shape == (50, 2) and np.isfinite(x).all()
    assert out.with_suffix(".png").stat().st_size > 0


def test_sample_on_a_fitted_grid(trained, tmp_path):
    """--grid fit fits the grid to the checkpoint first (``grid_fit``) and says what it found; a stochastic
    sampler is refused with a message that says why."""
    out = tmp_path / "s.npy"
    args = ("sample", "--checkpoint", trained, "--steps", 4, "--n", 20, "--out", out, "--grid", "fit", "--no-progress")
    r = run(*args, "--sampler", "dpmpp_2m", "--fit-pilot", 16)
    assert r.exit_code == 0, r.output
    assert "fitted a 4-step grid" in r.output and np.isfinite(np.load(out)).all()
    r = run(*args, "--sampler", "ddpm")
    assert r.exit_code != 0 and "deterministic" in r.output


def test_fit_objective_spread_reports_the_log_density_gap(trained, tmp_path):
    """--grid fit uses ``grid_fit.SPREAD`` by default and reports the log-density gap; distance does not."""
    out = tmp_path / "s.npy"
    args = ("sample", "--checkpoint", trained, "--steps", 3, "--n", 20, "--out", out, "--no-progress", "--grid", "fit")
    r = run(*args, "--sampler", "dpmpp_2m", "--fit-pilot", 16)
    assert r.exit_code == 0, r.output
    assert "log-density gap" in r.output and np.isfinite(np.load(out)).all()
    r = run(*args, "--sampler", "dpmpp_2m", "--fit-pilot", 16, "--fit-objective", "distance")
    assert r.exit_code == 0 and "fitted a 3-step grid" in r.output and "log-density gap" not in r.output


def test_resume_continues_to_more_steps(tmp_path):
    out = tmp_path / "run"
    assert run("train", "--steps", 10, "--out", out, *TINY).exit_code == 0
    r = run("train", "--steps", 20, "--out", out, "--resume", *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "checkpoint" / "config.json").read_text())["step"] == 20


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "--process", "nope"], ["nope", "vp", "ve", "edm"]),
        (["train", "--target", "nope"], ["eps", "x0", "v"]),
        (["train", "--data", "nope"], ["nope", "moons", "swiss_roll", ".npy"]),
        (["sample", "--checkpoint", "x", "--sampler", "nope"], ["nope", "ddpm", "ald"]),
        (["sample", "--checkpoint", "x", "--grid", "nope"], ["nope", "karras", "lam"]),
    ],
)
def test_unknown_names_list_the_choices(args, words):
    r = run(*args)
    assert r.exit_code == 2
    for w in words:
        assert w in r.output


def test_data_with_nan_names_the_row(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("x,y\n0.1,0.2\n0.3,nan\n0.5,0.6\n")
    out = tmp_path / "run"
    r = run("train", "--data", f, "--steps", 5, "--out", out, *TINY)
    assert r.exit_code == 2
    assert "NaN" in r.output and "row 3" in r.output
    assert not out.exists()


def _snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_training_into_existing_run_refuses_and_keeps_files(trained):
    before = _snapshot(trained)
    r = run("train", "--steps", 5, "--out", trained, *TINY)
    assert r.exit_code == 1
    assert "--resume" in r.output or "resume" in r.output
    assert _snapshot(trained) == before


@pytest.mark.parametrize("damage", ["truncate", "mismatch", "missing"])
def test_bad_checkpoint_is_a_clear_error_and_keeps_output(trained, tmp_path, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    ckpt = bad / "checkpoint"
    if damage == "truncate":
        data = (ckpt / "ema.safetensors").read_bytes()
        (ckpt / "ema.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "mismatch":
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["net"]["width"] = 48
        (ckpt / "config.json").write_text(json.dumps(cfg))
    else:
        (ckpt / "config.json").unlink()
    out = tmp_path / "samples.npy"
    np.save(out, np.arange(4.0))
    before = out.read_bytes()
    r = run("sample", "--checkpoint", bad, "--n", 10, "--steps", 3, "--out", out)
    assert r.exit_code == 1
    assert "Error" in r.output and str(bad.name) in r.output
    assert out.read_bytes() == before


def test_samplers_lists_the_registry():
    from torchdiffusion.names import DEFAULT_SAMPLER_NAME, SAMPLERS

    r = run("samplers")
    assert r.exit_code == 0
    for name in SAMPLERS:
        assert name in r.output
    assert "without a fit: `sample --steps N` runs optimized" in r.output  # Pipeline.sample's few-step default
    assert f"With a fit: {DEFAULT_SAMPLER_NAME}" in r.output


def test_sample_draws_the_reverse_process(trained, tmp_path):
    fig = tmp_path / "reverse.png"
    r = run("sample", "--checkpoint", trained, "--steps", 6, "--n", 40, "--out", tmp_path / "s.npy", "--figure", fig)
    assert r.exit_code == 0, r.output
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["ode", "elbo"])
def test_likelihood_prints_nats_and_bits(trained, method):
    r = run(
        "likelihood",
        "--checkpoint",
        trained,
        "--data",
        "moons",
        "--n",
        20,
        "--method",
        method,
        "--no-progress",
        "--rtol",
        "1e-3",
        "--atol",
        "1e-3",
    )
    assert r.exit_code == 0, r.output
    assert "nats per example" in r.output and "bits/dim" in r.output


def test_likelihood_vlb_on_a_continuous_process_is_a_clear_error(trained):
    r = run("likelihood", "--checkpoint", trained, "--data", "moons", "--n", 10, "--method", "vlb", "--no-progress")
    assert r.exit_code == 2  # a usage error, found before any work
    assert "--method elbo" in r.output


def test_image_config_trains_samples_a_grid_and_evaluates(tmp_path):
    """The image path end to end: configs/digits.yaml (2 steps), a sample grid, FID with own features."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    out = tmp_path / "run"
    r = run("train", "--config", config, "--steps", 2, "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    s = tmp_path / "s.npy"
    r = run("sample", "--checkpoint", out, "--sampler", "dpmpp_2m", "--steps", 3, "--n", 8, "--out", s, "--no-progress")
    assert r.exit_code == 0, r.output
    assert np.load(s).shape == (8, 1, 16, 16)
    assert s.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run(
        "evaluate",
        "--checkpoint",
        out,
        "--data",
        "digits16",
        "--n",
        40,
        "--steps",
        3,
        "--kid-subsets",
        5,
        "--cache-dir",
        tmp_path / "features",
        "--no-progress",
        "--out",
        tmp_path / "eval.json",
    )
    assert r.exit_code == 0, r.output
    assert "not comparable to published FID" in r.output
    assert json.loads((tmp_path / "eval.json").read_text())["n_fake"] == 40


def test_downloadable_data_needs_download_flag_and_fails_clearly_offline(tmp_path, monkeypatch):
    """Nothing downloads unless asked; asked while offline, the error names the URL and what to do."""
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    r = run("train", "--data", "mnist", "--steps", 1, "--out", tmp_path / "run", "--no-progress")
    assert r.exit_code == 2 and "--download" in r.output
    r = run("train", "--data", "mnist", "--download", "--steps", 1, "--out", tmp_path / "run", "--no-progress")
    assert r.exit_code == 1 and "could not reach" in r.output and "by hand" in r.output
    assert not (tmp_path / "run").exists()
