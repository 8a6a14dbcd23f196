"""A new user's mishaps on the command line (issue #10, items 6 and 7): each gets a clear error naming the
problem and the valid choices, or the right behaviour, never a raw traceback (``catch_exceptions=False``
lets one fail the test) nor a silently wrong result.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from torchdiffusion.app.cli import IMAGE_NET, main

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--width", "32", "--depth", "1", "--batch-size", "64", "--no-progress"]
UNET = {"name": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
UNET = {**UNET, "dropout": 0.0, "groups": 8}
ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons") / "run"
    r = run("train", "--data", "moons", "--steps", 20, "--checkpoint-every", 10, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    """A tiny U-Net on the 16x16 digits."""
    from torchdiffusion.training.config import TrainConfig
    from torchdiffusion.training.loop import train

    out = tmp_path_factory.mktemp("d16") / "run"
    net = {**UNET, "attention_resolutions": [8]}  # levels 16 and 8
    train(TrainConfig(data="digits16", net=net, steps=2, batch_size=8, warmup=1), out, progress=False)
    return out


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if any sampler runs: checks that must come before the work."""
    import torchdiffusion.names as specs

    def refuse(name):
        raise AssertionError(f"sampler {name!r} was run before the error")

    monkeypatch.setattr(specs, "get_sampler", refuse)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder in which no file can be created: chmod 555, or for root (whom modes do not stop) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield folder
        folder.chmod(stat.S_IRWXU)
        return
    sys_dir = Path("/sys")
    try:
        (sys_dir / "torchdiffusion-write-test").touch()
    except OSError:
        yield sys_dir
        return
    pytest.skip("no read-only folder here (root, and /sys is writable)")


# -- raw tracebacks ------------------------------------------------------------------------------------------


def _device_args(command, moons, digits16, tmp_path):
    return {
        "sample": ["sample", "--checkpoint", moons, "--n", 5, "--steps", 2, "--out", tmp_path / "s.npy"],
        "likelihood": ["likelihood", "--checkpoint", moons, "--data", "moons", "--n", 5],
        "evaluate": ["evaluate", "--checkpoint", digits16, "--data", "digits16", "--n", 5, "--steps", 2],
        "train": ["train", "--steps", 2, "--out", tmp_path / "run", *TINY],
    }[command]


@pytest.mark.parametrize("command", ["sample", "likelihood", "evaluate", "train"])
@pytest.mark.parametrize("device", ["cuda:99", "cuda", "gpu"])
def test_a_device_this_machine_lacks_names_the_devices_it_has(moons, digits16, tmp_path, no_sampling, command, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = run(*_device_args(command, moons, digits16, tmp_path), "--device", device, "--no-progress")
    assert r.exit_code == 2
    assert repr(device) in r.output and "devices on this machine: cpu" in r.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("option", ["--out", "--png", "--figure"])
def test_sample_checks_its_outputs_before_sampling(moons, tmp_path, readonly_dir, no_sampling, option):
    paths = {"--out": tmp_path / "s.npy", "--png": tmp_path / "s.png", "--figure": tmp_path / "f.png"}
    paths[option] = readonly_dir / Path(paths[option]).name
    args = [a for k, v in paths.items() for a in (k, v)]
    r = run("sample", "--checkpoint", moons, "--n", 5, "--steps", 2, "--no-progress", *args)
    assert r.exit_code == 2
    assert option in r.output and "cannot write" in r.output and str(readonly_dir) in r.output


def test_an_output_below_a_file_is_refused_before_sampling(moons, tmp_path, no_sampling):
    (tmp_path / "afile").write_text("x")
    r = run("sample", "--checkpoint", moons, "--n", 5, "--steps", 2, "--out", tmp_path / "afile" / "s.npy")
    assert r.exit_code == 2 and "is a file, not a folder" in r.output


def test_an_output_in_a_missing_folder_is_written_there(moons, tmp_path):
    out = tmp_path / "new" / "deeper" / "s.npy"
    r = run("sample", "--checkpoint", moons, "--n", 5, "--steps", 2, "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert np.load(out).shape == (5, 2)


def test_evaluate_checks_its_output_before_sampling(digits16, readonly_dir, no_sampling):
    r = run("evaluate", "--checkpoint", digits16, "--data", "digits16", "--n", 5, "--out", readonly_dir / "e.json")
    assert r.exit_code == 2 and "--out" in r.output and "cannot write" in r.output


def test_likelihood_of_data_of_another_dimension(moons, tmp_path):
    np.save(tmp_path / "x3.npy", np.random.default_rng(0).normal(size=(20, 3)))
    r = run("likelihood", "--checkpoint", moons, "--data", tmp_path / "x3.npy", "--no-progress")
    assert r.exit_code == 2
    assert "2-D points" in r.output and "(3,)" in r.output and "'moons'" in r.output


def test_evaluate_a_point_model_is_refused(moons, no_sampling):
    r = run("evaluate", "--checkpoint", moons, "--data", "digits16", "--n", 5)
    assert r.exit_code == 2 and "2-D points" in r.output and "image models" in r.output


def test_a_config_with_a_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nnet: {name: mlp\n")
    r = run("train", "--config", bad, "--out", tmp_path / "run", "--no-progress")
    assert r.exit_code == 1
    assert "bad.yaml: not valid YAML" in r.output and "line 3" in r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value", [("--atol", 0), ("--rtol", -1), ("--rtol", 0), ("--atol", -1e-9)])
def test_likelihood_tolerances_must_be_positive(moons, option, value):
    r = run("likelihood", "--checkpoint", moons, "--data", "moons", option, value)
    assert r.exit_code == 2 and option in r.output and "x>0" in r.output


# -- silently wrong ----------------------------------------------------------------------------------------------


def test_evaluate_refuses_images_of_another_size_and_names_the_fix(digits16, no_sampling):
    r = run("evaluate", "--checkpoint", digits16, "--data", "digits", "--n", 5)
    assert r.exit_code == 2
    assert "1x16x16" in r.output and "1x8x8" in r.output and "--data digits16" in r.output


@pytest.mark.parametrize("option", [["--schedule", "cosine"], ["--T", "50"]])
def test_ddpm_options_with_another_process_are_refused(tmp_path, option):
    r = run("train", "--process", "vp", *option, "--steps", 2, "--out", tmp_path / "run", *TINY)
    assert r.exit_code == 2
    assert f"{option[0]} applies to --process ddpm only" in r.output and "'vp'" in r.output
    assert not (tmp_path / "run").exists()


def test_ddpm_options_are_used_with_ddpm(tmp_path):
    out = tmp_path / "run"
    r = run("train", "--process", "ddpm", "--schedule", "cosine", "--T", 50, "--steps", 2, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "checkpoint" / "config.json").read_text())["process"] == {
        "name": "ddpm",
        "schedule": "cosine",
        "T": 50,
    }


def test_typed_options_override_a_config_and_refuse_what_it_cannot_take(tmp_path):
    """--config's help promises that typed options override the file: --process and --depth do; --schedule
    on the file's VP process cannot and is refused."""
    config = ROOT / "configs" / "moons.yaml"
    out = tmp_path / "run"
    r = run("train", "--config", config, "--process", "edm", "--depth", 2, "--steps", 2, "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    stored = json.loads((out / "checkpoint" / "config.json").read_text())
    assert stored["process"] == {"name": "edm"} and stored["net"]["depth"] == 2
    r = run("train", "--config", config, "--schedule", "cosine", "--out", tmp_path / "b", "--no-progress")
    assert r.exit_code == 2 and "--process ddpm only" in r.output


def test_resume_of_a_missing_run_is_an_error_not_a_new_run(tmp_path):
    out = tmp_path / "typo"
    r = run("train", "--resume", "--out", out, "--steps", 2, *TINY)
    assert r.exit_code == 2
    assert "nothing to resume" in r.output and "does not exist" in r.output
    assert not out.exists()
    out.mkdir()
    r = run("train", "--resume", "--out", out, "--steps", 2, *TINY)
    assert r.exit_code == 2 and "holds no checkpoint" in r.output


def test_train_on_built_in_images_without_a_config(tmp_path):
    """--data digits trains the U-Net of configs/digits.yaml with its batch and learning rate (unless typed)."""
    import yaml

    out = tmp_path / "run"
    r = run("train", "--data", "digits", "--steps", 1, "--batch-size", 8, "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    stored = json.loads((out / "checkpoint" / "config.json").read_text())
    assert stored["net"] == {**IMAGE_NET, "in_channels": 1, "image_size": 8}
    assert stored["batch_size"] == 8 and stored["lr"] == 1e-3
    digits_yaml = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    assert IMAGE_NET == digits_yaml["net"]
    r = run("train", "--data", "digits", "--width", 64, "--out", tmp_path / "b", "--no-progress")
    assert r.exit_code == 2 and "--width sizes the MLP of point data" in r.output


# -- minor -------------------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_resumed_run_removes_temp_folders_of_dead_processes(moons, tmp_path):
    """A save killed by kill -9 or SIGTERM leaves .checkpoint-tmp-<its pid>; resuming removes it (but not that
    of a live process)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(moons, run_dir)
    dead, live = run_dir / f".checkpoint-tmp-{_dead_pid()}", run_dir / f".checkpoint-tmp-{os.getppid()}"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"half written")
    r = run("train", "--data", "moons", "--steps", 30, "--checkpoint-every", 10, "--out", run_dir, "--resume", *TINY)
    assert r.exit_code == 0, r.output
    assert not dead.exists() and live.exists()


def test_resume_with_more_steps_says_what_the_learning_rate_does(tmp_path):
    """Documented in --help and announced: the rate follows the longer cosine schedule from the checkpoint on
    (after the warm-up, which does not depend on --steps)."""
    from torchdiffusion.training.config import TrainConfig
    from torchdiffusion.training.step import lr_at

    config = tmp_path / "c.yaml"
    config.write_text("data: moons\nnet: {name: mlp, width: 16, depth: 1}\nbatch_size: 32\nwarmup: 4\n")
    run_dir, args = tmp_path / "run", ["--config", config, "--out", tmp_path / "run", "--no-progress"]
    assert run("train", *args, "--steps", 10).exit_code == 0
    r = run("train", *args, "--steps", 30, "--resume")
    assert r.exit_code == 0, r.output
    new = TrainConfig.from_dict(json.loads((run_dir / "checkpoint" / "config.json").read_text()))
    old = TrainConfig.from_dict({**new.to_dict(), "steps": 10})
    assert "--steps 10 -> 30" in r.output and f"step 11 runs at lr {lr_at(10, new):.3g}" in r.output
    assert f"last step ran at {lr_at(9, old):.3g}" in r.output
    assert lr_at(10, new) > lr_at(9, old)  # (1 + cos(pi 6/26)) / 2 = 0.87 after (1 + cos(pi 5/6)) / 2 = 0.07
    assert "rises again" in run("train", "--help").output


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_respect_the_umask(moons, tmp_path, umask):
    """Samples, pictures and checkpoint files get 0666 less the umask, as any file the user writes."""
    old = os.umask(umask)
    try:
        out = tmp_path / "s.npy"
        assert (
            run("sample", "--checkpoint", moons, "--n", 5, "--steps", 2, "--out", out, "--no-progress").exit_code == 0
        )
        r = run("train", "--steps", 2, "--out", tmp_path / "run", *TINY)
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    files = [out, out.with_suffix(".png"), *(tmp_path / "run" / "checkpoint").iterdir(), tmp_path / "run" / "log.csv"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}


def test_messages_name_the_command_line_option(moons, tmp_path):
    r = run("train", "--steps", 5, "--out", moons, *TINY)
    assert r.exit_code == 1 and "--resume" in r.output
    r = run("likelihood", "--checkpoint", moons, "--data", "moons", "--n", 5, "--method", "vlb", "--no-progress")
    assert r.exit_code == 2 and "--method elbo" in r.output and "elbo()" not in r.output
    ddpm = tmp_path / "ddpm"
    assert run("train", "--process", "ddpm", "--T", 20, "--steps", 2, "--out", ddpm, *TINY).exit_code == 0
    r = run("likelihood", "--checkpoint", ddpm, "--data", "moons", "--n", 5, "--method", "elbo", "--no-progress")
    assert r.exit_code == 2 and "--method vlb" in r.output and "vlb()" not in r.output


def test_the_sample_figure_title_fits_the_figure():
    """A long title (the process with its parameters) is wrapped, not cut at the figure's edges."""
    import matplotlib.pyplot as plt

    from torchdiffusion.app.plotting import samples_figure

    title = "dpmpp_2m, 21 levels, " + "VP(beta_min=0.1, beta_max=20.0, t_min=0.001, t_max=1.0) " * 2
    fig = samples_figure(torch.randn(100, 2), title)
    fig.canvas.draw()
    box, frame = fig.axes[0].title.get_window_extent(), fig.bbox
    plt.close(fig)
    assert box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1


def test_the_figure_of_an_image_model_shows_images(digits16, tmp_path, monkeypatch):
    """sample --figure on images draws x_t of the first images (not a scatter of two pixel values)."""
    import torchdiffusion.app.plotting as plotting

    seen = []

    def points_figure(*args, **kwargs):
        raise AssertionError("the 2-D figure was drawn for an image model")

    real = plotting.reverse_process_images
    monkeypatch.setattr(plotting, "reverse_process_figure", points_figure)
    monkeypatch.setattr(plotting, "reverse_process_images", lambda rec, *a: (seen.append(rec), real(rec, *a)))
    fig = tmp_path / "f.png"
    r = run("sample", "--checkpoint", digits16, "--sampler", "ddim", "--steps", 3, "--n", 20, "--out",
            tmp_path / "s.npy", "--figure", fig, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [tuple(s.shape) for s in seen[0].states] == [(8, 16 * 16)] * 4  # 8 images, x_T and 3 steps


def test_a_failed_run_leaves_no_folder_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    r = run("train", "--lr", 1e30, "--steps", 3, "--out", out, *TINY)
    assert r.exit_code == 1 and "non-finite loss" in r.output and "--lr" in r.output
    assert not (tmp_path / "a").exists()
    out.mkdir(parents=True)  # a folder that was there before stays, without the log.csv this run began
    (out / "notes.txt").write_text("mine")
    r = run("train", "--lr", 1e30, "--steps", 3, "--out", out, *TINY)
    assert r.exit_code == 1 and [p.name for p in out.iterdir()] == ["notes.txt"]
    r = run("train", "--steps", 3, "--out", out, *TINY)  # so the next try is not refused as an existing run
    assert r.exit_code == 0, r.output


# -- item 6: threads -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "sample", "likelihood", "evaluate", "demo"])
def test_every_working_command_takes_threads(command):
    r = run(command, "--help")
    assert "--threads" in r.output


def test_threads_sets_torch_threads(moons, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # keep this process's own setting
    r = run("sample", "--checkpoint", moons, "--n", 5, "--steps", 2, "--out", tmp_path / "s.npy", "--threads", 1)
    assert r.exit_code == 0, r.output
    assert calls == [1]
    assert run("sample", "--checkpoint", moons, "--threads", 0).exit_code == 2


@pytest.mark.parametrize("preset", [None, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "5"}])
def test_importing_the_library_first_makes_openmp_threads_spin_briefly(preset):
    """libgomp reads its wait policy when torch loads it: the package sets a short spin (GOMP_SPINCOUNT=3000) before
    that, and KMP_BLOCKTIME=0 for LLVM's / Intel's OpenMP, unless the user chose a policy or a spin count."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env.update(preset or {})
    code = "import os, torchdiffusion; print([os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    expected = [None, "3000"] if preset is None else [preset.get("OMP_WAIT_POLICY"), preset.get("GOMP_SPINCOUNT")]
    assert out.strip() == str(expected)
