"""The command line: ``torchdiffusion train | sample | likelihood | evaluate | demo | samplers``.

Names given on the command line become objects through ``specs`` (processes, networks,
samplers); everything else is the Python API. Errors are reported as one clear line, found
before the work where they can be (devices, outputs, shapes, labels), and never leave a
half-written file behind. OpenMP threads sleep when idle (``OMP_WAIT_POLICY=PASSIVE``, set in
``torchdiffusion/__init__.py`` before torch loads); ``--threads`` sets torch's thread count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np
import torch

from ..names import GRIDS, PRECISIONS, PROCESSES, SAMPLERS, SCHEDULES, WEIGHTINGS
from ..names import PREDICTIONS as TARGETS


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e)) from None


def _set_threads(ctx, param, value):
    if value is not None:
        torch.set_num_threads(value)
    return value


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    expose_value=False,
    callback=_set_threads,
    help="CPU threads for torch (torch.set_num_threads) [default: torch's, one per core]. On a CPU shared with "
    "other jobs fewer threads are faster; 1 avoids thread hand-offs altogether.",
)


def _available_devices() -> list[str]:
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return found + (["mps"] if mps is not None and mps.is_available() else [])


def _device(name: str) -> torch.device:
    """``name`` as a device of this machine, or a usage error naming the devices there are."""
    here = f"devices on this machine: {', '.join(_available_devices())}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise click.BadParameter(f"{name!r} is not a torch device name; {here}", param_hint="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise click.BadParameter(f"{name!r}: CUDA is not available ({why}); {here}", param_hint="--device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise click.BadParameter(f"{name!r}: no such GPU; {here}", param_hint="--device")
    if device.type not in ("cpu", "cuda") and name not in _available_devices():
        raise click.BadParameter(f"{name!r} is not available; {here}", param_hint="--device")
    return device


def _writable(path: str | None, option: str) -> None:
    """Check before the work that ``path`` can be written (at the end, after minutes of sampling)."""
    from ..utils.io import check_writable

    if path is not None:
        try:
            check_writable(path, option)
        except OSError as e:
            raise click.BadParameter(str(e), param_hint=option) from None


def _example_shape(cfg: dict) -> tuple[int, ...]:
    """The shape of one example of the checkpoint's model: (D,) for points, (C, H, H) for images."""
    from .pipeline import example_shape

    return example_shape(cfg)


def _class_labels(cfg: dict, ckpt: str, klass: int | None, labels: str | None, n: int):
    """``(labels (n,) or None, description)`` for --class / --labels (or their default) on this checkpoint.

    A class-conditional net was trained on labels 0..K-1 only; its extra "unconditional" embedding K was
    never trained, so sampling it without labels gives noise. By default such a model gets labels spread
    evenly, i mod K; a model without classes refuses labels.
    """
    classes = cfg["net"].get("num_classes")
    if klass is None and labels is None:
        if not classes:
            return None, ""
        return torch.arange(n) % classes, f"labels i mod {classes} (all classes evenly; choose with --class/--labels)"
    option = "--class" if labels is None else "--labels"
    if klass is not None and labels is not None:
        raise click.BadParameter("give --class K or --labels L1,L2,..., not both", param_hint=option)
    if not classes:
        raise click.BadParameter(
            f"{ckpt} is not class-conditional (trained without labels, class_conditional: false); drop {option}",
            param_hint=option,
        )
    if klass is not None:
        values = torch.tensor([klass])
    elif labels.endswith(".npy"):
        try:
            arr = np.load(labels, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"cannot read {labels}: {e}", param_hint=option) from None
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise click.BadParameter(
                f"{labels} must hold a 1-D array of integer labels, got {arr.dtype} of shape {arr.shape}",
                param_hint=option,
            )
        values = torch.from_numpy(arr.astype(np.int64))
    else:
        try:
            values = torch.tensor([int(v) for v in labels.split(",")])
        except ValueError:
            raise click.BadParameter(
                f"{labels!r} is not a comma-separated list of integers (e.g. 0,3,7) or a .npy file", param_hint=option
            ) from None
    bad = values[(values < 0) | (values >= classes)]
    if len(bad):
        raise click.BadParameter(
            f"label {int(bad[0])} is out of range: this model knows classes 0..{classes - 1}", param_hint=option
        )
    if len(values) > n:
        raise click.BadParameter(f"{len(values)} labels for {n} samples (--n); give at most {n}", param_hint=option)
    how = f"class {klass}" if klass is not None else f"labels {labels} (label i = L[i mod {len(values)}])"
    return values.repeat(-(-n // len(values)))[:n], how


def _draw(sampler, denoiser, process, shape, n, batch_size, ts, gen, device, labels, no_progress, kwargs, record):
    """``n`` samples of ``shape`` in batches of ``batch_size``: each batch draws its prior noise and then runs
    the sampler, both from ``gen``, so one seed and batch size always give the same samples (another batch
    size consumes the stream in another order). ``record`` (or None) is called on the first batch's start
    and returns a sampler callback that records it. The loop is ``pipeline.draw_samples``, which
    ``td.load(run).sample`` runs too: one seed gives the same samples here and in Python."""
    from ..names import get_sampler
    from .pipeline import draw_samples

    return draw_samples(get_sampler(sampler), denoiser, process, shape, n, ts, batch_size=batch_size, generator=gen,
                        device=device, labels=labels, progress=not no_progress, desc=f"{sampler} ({n} samples)",
                        watch_first=record, **kwargs)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="torchdiffusion")
def main():
    """Diffusion models from the ground up: train, sample and measure them on your own data."""


def _process_spec(process: str, schedule: str, T: int) -> dict:
    return {"name": "ddpm", "schedule": schedule, "T": T} if process == "ddpm" else {"name": process}


# What `train --data <images>` trains without --config: the U-Net and batch of configs/digits.yaml (1.1M
# parameters at 16x16; ~8 steps/s on 2 quiet cores), which suits the small built-in and 28x28 sets.
IMAGE_NET = {
    "name": "unet",
    "channels": 32,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [4],
    "dropout": 0.0,
}
IMAGE_DEFAULTS = {"batch_size": 64, "lr": 1e-3}


def _parse_overrides(ctx, param, values) -> tuple[tuple[str, object], ...]:
    """``KEY=VALUE`` strings -> (key, value parsed as YAML: numbers, true/false, null, [lists], {dicts})."""
    import yaml

    parsed = []
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE (e.g. steps=2000 or net.channels=64), got {text!r}")
        try:
            parsed.append((key.strip(), yaml.safe_load(value)))
        except yaml.YAMLError as e:
            raise click.BadParameter(f"{text!r}: the value is not valid YAML ({e})") from None
    return tuple(parsed)


def _typed(ctx, name: str) -> bool:
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _train_config(ctx, config, fields, process, schedule, T, width, depth, sets=()):
    """The TrainConfig of `train`'s options: a --config file with the options typed after it, or the options alone.

    Options that could not take effect are refused rather than ignored: --schedule / --T (ddpm only),
    --width / --depth (the MLP of point data).
    """
    from ..training.config import TrainConfig, merge_overrides
    from ..training.resolve import is_image_spec

    typed = {k: v for k, v in fields.items() if _typed(ctx, k)}
    base = TrainConfig.from_yaml(config, **typed, **dict(sets)) if config else None
    proc = dict(base.process) if base is not None and not _typed(ctx, "process") else {"name": process}
    for name, value in (("schedule", schedule), ("T", T)):
        if _typed(ctx, name):
            if proc["name"] != "ddpm":
                raise click.BadParameter(
                    f"--{name} applies to --process ddpm only (the discrete-time DDPM); the process here is "
                    f"{proc['name']!r}, whose noise levels are continuous curves: drop --{name} or use --process ddpm",
                    param_hint=f"--{name}",
                )
            proc[name] = value
    if proc["name"] == "ddpm" and base is None:
        proc = _process_spec("ddpm", schedule, T)
    images = is_image_spec(base.data if base is not None else fields["data"])
    net = dict(base.net) if base is not None else dict(IMAGE_NET if images else TrainConfig().net)
    for name, value in (("width", width), ("depth", depth)):
        if _typed(ctx, name):
            if net["name"] != "mlp":
                raise click.BadParameter(
                    f"--{name} sizes the MLP of point data; this run trains a {net['name']} "
                    f"({'image data' if images else 'from the config'}): set its size under net: in a --config file",
                    param_hint=f"--{name}",
                )
            net[name] = value
        elif base is None and not images:
            net[name] = value
    if base is not None:
        return TrainConfig.from_dict({**base.to_dict(), "process": proc, "net": net})
    if images:  # the batch and rate of the image net's config, unless typed
        fields = {**fields, **{k: v for k, v in IMAGE_DEFAULTS.items() if not _typed(ctx, k)}}
    cfg = TrainConfig(process=proc, net=net, **fields)
    return TrainConfig.from_dict(merge_overrides(cfg.to_dict(), dict(sets))) if sets else cfg


def _resume_notice(out: Path, steps: int) -> str | None:
    """What a resume with another --steps does to the cosine learning rate, or None."""
    import json

    from ..training.checkpoint import CONFIG, find_checkpoint
    from ..training.config import TrainConfig
    from ..training.step import lr_at

    try:
        stored = json.loads((find_checkpoint(out) / CONFIG).read_text(encoding="utf-8"))
        old = TrainConfig.from_dict(stored)
        step = int(stored["step"])
    except (OSError, ValueError, TypeError, KeyError):
        return None  # train() reports a bad checkpoint itself
    if old.steps == steps or old.lr_schedule != "cosine" or step < old.warmup:
        return None
    new = TrainConfig.from_dict({**old.to_dict(), "steps": steps})
    return (
        f"note: --steps {old.steps} -> {steps}: the cosine learning rate now decays over {steps} steps, so "
        f"step {step + 1} runs at lr {lr_at(step, new):.3g} (the checkpoint's last step ran at "
        f"{lr_at(step - 1, old):.3g}): the rest of the run follows a {steps}-step schedule"
    )


def _remove_what_a_failed_run_left(out: Path, before: set[Path], first_missing: Path | None) -> None:
    """After a failed `train` that wrote no checkpoint: remove what this invocation created and left empty (a
    log.csv without rows, empty folders, the run folder and its parents if it made them). Left there, a
    header-only log.csv would make the next `train` into the same folder refuse it as an existing run."""
    from ..training.checkpoint import find_checkpoint

    if not out.is_dir() or find_checkpoint(out) is not None or os.environ.get("RANK", "0") != "0":
        return  # a checkpoint: the run can resume; under torchrun rank 0 owns the folder
    for path in sorted(set(out.rglob("*")) - before, reverse=True):  # children before their folders
        if path.name == "log.csv" and path.is_file() and len(path.read_text(encoding="utf-8").splitlines()) <= 1:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    folder = out
    while first_missing is not None and not any(folder.iterdir()):
        folder.rmdir()
        if folder == first_missing:
            break
        folder = folder.parent


@main.command()
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A YAML file of training fields (configs/*.yaml); options typed on the command line override it.",
)
@click.option(
    "--data",
    default="moons",
    help="Built-in 2-D set (swiss_roll, moons, 8gaussians, checkerboard, circles, pinwheel), built-in images "
    "(digits, digits16), or a path: an (N, D) .npy / .csv file, an image folder, .npz, IDX or CIFAR-10 folder.",
)
@click.option(
    "--download",
    is_flag=True,
    help="Allow downloading --data when it names mnist, fashion-mnist or cifar10 (into data/NAME, checksummed).",
)
@click.option("--process", type=click.Choice(sorted(PROCESSES)), default="vp", help="Noise process.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="linear", help="Beta schedule (--process ddpm only).")
@click.option("--T", "T", type=click.IntRange(min=2), default=1000, help="Discrete steps (--process ddpm only).")
@click.option("--target", type=click.Choice(list(TARGETS)), default="eps", help="What the network predicts.")
@click.option("--weighting", type=click.Choice(list(WEIGHTINGS)), default="simple", help="Loss weighting over time.")
@click.option("--width", type=click.IntRange(min=1), default=256, help="MLP hidden width (point data).")
@click.option("--depth", type=click.IntRange(min=1), default=4, help="MLP residual blocks (point data).")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=4000,
    help="Training steps. The cosine learning rate decays to 0 over them: resuming with more steps follows the "
    "longer schedule from the checkpoint's step on, so the rate rises again (train.lr_at).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=512,
    help="Examples per micro-batch (image data without --config: 64, with --lr 1e-3 and the U-Net of "
    "configs/digits.yaml).",
)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, help="Micro-batches per optimizer step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, help="Peak learning rate (AdamW).")
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.999, help="EMA decay of the weights.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", help="Mixed precision.")
@click.option("--flip", is_flag=True, help="Random left-right flips of image batches.")
@click.option("--sample-every", type=click.IntRange(min=0), default=0, help="Steps between sample grids (images).")
@click.option("--tensorboard", is_flag=True, help="Also log to TensorBoard (needs the tensorboard package).")
@click.option("--seed", type=int, default=0, help="Seed of data, initialisation and noise.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, help="Steps between checkpoints.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/default", help="Run directory.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last checkpoint (--out must hold a run). Bit-exact with the same "
    "--steps; see --steps for a longer run.",
)
@click.option("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    callback=_parse_overrides,
    metavar="KEY=VALUE",
    help="Override a training field (after --config and the options); repeatable. VALUE is YAML; dotted keys reach "
    "into net / process / data_options: --set steps=2000 --set net.channels=64.",
)
@threads_option
@click.pass_context
def train(ctx, config, data, download, process, schedule, T, target, weighting, width, depth, steps, batch_size,
          grad_accum, lr, ema_decay, precision, flip, sample_every, tensorboard, seed, checkpoint_every, out, resume,
          device, no_progress, sets):  # fmt: skip
    """Train a denoiser on DATA (or a --config file) and write checkpoints and log.csv to --out.

    Several processes or GPUs: torchrun --standalone --nproc_per_node N --no-python torchdiffusion train --config C
    """
    from ..training.checkpoint import find_checkpoint
    from ..training.loop import train as run_train

    data = _maybe_download(data, download)
    fields = dict(data=data, target=target, weighting=weighting, steps=steps, batch_size=batch_size,
                  grad_accum=grad_accum, lr=lr, ema_decay=ema_decay, precision=precision, flip=flip,
                  sample_every=sample_every, tensorboard=tensorboard, seed=seed, checkpoint_every=checkpoint_every,
                  device=device)  # fmt: skip
    run_dir = Path(out)
    if resume and find_checkpoint(run_dir) is None and not (run_dir / "log.csv").exists():
        what = "does not exist" if not run_dir.exists() else "holds no checkpoint/ (nor a log.csv)"
        raise click.BadParameter(
            f"nothing to resume: {run_dir} {what}; check --out, or drop --resume to start a new run",
            param_hint="--resume",
        )
    if not config:
        _check_data(data)
    try:
        cfg = _train_config(ctx, config, fields, process, schedule, T, width, depth, sets)
    except ValueError as e:
        _fail(e)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # under torchrun, "cuda" means each rank's own GPU
        _device(cfg.device)
    notice = _resume_notice(run_dir, cfg.steps) if resume else None
    if notice:
        click.echo(notice)
    here = run_dir.absolute()
    first_missing = next((p for p in [*reversed(here.parents), here] if not p.exists()), None)  # made by this run
    before = set(here.rglob("*")) if here.is_dir() else set()
    try:
        res = run_train(cfg, out, resume=resume, progress=not no_progress)
    except BaseException as e:  # a run that fails before its first checkpoint leaves nothing behind
        _remove_what_a_failed_run_left(here, before, first_missing)
        if isinstance(e, (ValueError, OSError, RuntimeError, ArithmeticError, ImportError)):
            _fail(e)
        raise
    if res.history:  # under torchrun only rank 0 keeps the log
        loss = res.history[-1]["loss"]
        click.echo(f"trained {cfg.steps} steps; final loss {loss:.4g}; checkpoint in {Path(out) / 'checkpoint'}")


def _maybe_download(data: str, allowed: bool) -> str:
    """``data`` itself, or the folder a named downloadable set was fetched into (only with --download)."""
    from ..data import DOWNLOADABLE, download_images

    if data not in DOWNLOADABLE:
        return data
    folder = Path("data") / data
    if not allowed and not folder.exists():
        raise click.BadParameter(
            f"{data!r} is not on this machine; pass --download to fetch it into {folder} (checksummed), "
            "or give the path of a folder that holds its files",
            param_hint="--data",
        )
    try:
        return str(download_images(data, folder.parent)) if allowed else str(folder)
    except (ConnectionError, ValueError, OSError) as e:
        _fail(e)


def _check_data(data: str) -> None:
    from ..data import IMAGE_DATASETS, TOY_DATASETS, load_array

    if data in TOY_DATASETS or data in IMAGE_DATASETS or Path(data).is_dir() or data.endswith((".npz", "ubyte", ".gz")):
        return
    if not Path(data).exists():
        raise click.BadParameter(
            f"{data!r} is neither a built-in set ({', '.join(sorted(TOY_DATASETS) + sorted(IMAGE_DATASETS))}) "
            "nor an existing .npy, .csv, .npz, IDX file or image folder",
            param_hint="--data",
        )
    try:
        load_array(data)
    except (ValueError, OSError) as e:
        raise click.BadParameter(str(e), param_hint="--data") from None


def _fit_grid(sampler, denoiser, process, steps, pilot_shape, seed, device, no_progress, spread, **cond):
    """``grid_fit.fit_grid`` for --grid fit (with ``grid_fit.SPREAD`` for --fit-objective spread), on pilot starts of
    seed + 1 (with ``cond``, e.g. their class labels); prints what it found and returns the fit."""
    from ..names import get_sampler
    from ..samplers.grid_fit import SPREAD, fit_grid

    pilot = process.prior_sample(pilot_shape, generator=torch.Generator(device).manual_seed(seed + 1), device=device)
    recipe = SPREAD if spread else {}
    with torch.no_grad():
        fit = fit_grid(
            get_sampler(sampler), denoiser, process, steps, pilot, progress=not no_progress, **recipe, **cond
        )
    lam = ", ".join(f"{v:.2f}" for v in process.lam(fit.ts).tolist())
    gap = f"; log-density gap {fit.logp_gap_uniform_lam:+.3g} -> {fit.logp_gap:+.3g} nats" if spread else ""
    click.echo(
        f"fitted a {steps}-step grid ({fit.nfe} evaluations of {pilot_shape[0]} pilot starts): distance to the "
        f"teacher {fit.error_uniform_lam:.4g} (uniform lam) -> {fit.error:.4g}{gap}; lam = [{lam}]"
    )
    return fit


@main.command()
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="Run directory or checkpoint folder.")
@click.option("--sampler", type=click.Choice(sorted(SAMPLERS)), default="ddpm", help="Sampling algorithm.")
@click.option("--steps", type=click.IntRange(min=1), default=250, help="Steps (noise levels for ald).")
@click.option(
    "--grid",
    type=click.Choice(GRIDS),
    default="auto",
    help="Time grid (auto: the sampler's usual one, see `torchdiffusion samplers`; discrete: integer DDPM steps; "
    "fit: fitted to this model first, for deterministic samplers, see --fit-pilot).",
)
@click.option(
    "--fit-pilot",
    type=click.IntRange(min=1),
    default=256,
    help="Pilot starts for --grid fit (drawn with seed + 1, not the samples' noise).",
)
@click.option(
    "--fit-objective",
    type=click.Choice(["spread", "distance"]),
    default="spread",
    help="With --grid fit: spread also holds the samples' log-density at the teacher's (grid_fit.SPREAD: the end "
    "is fitted, no final denoise), which keeps few-step samples from coming out too concentrated; distance fits "
    "the distance to the teacher alone.",
)
@click.option("--n", "n", type=click.IntRange(min=1), default=2000, help="Number of samples.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples drawn at once [default: all of them for points, 1000 for images]; memory grows with it. "
    "Each batch draws its noise from the seeded stream in turn: one seed and batch size always give the same "
    "samples, another batch size gives other (equally valid) samples.",
)
@click.option("--n-steps-each", type=click.IntRange(min=1), default=10, help="Langevin steps per level (ald).")
@click.option("--seed", type=int, default=0, help="Seed of the sampler's noise.")
@click.option("--class", "klass", type=click.IntRange(min=0), default=None, help="Class-conditional models: one class.")
@click.option(
    "--labels",
    default=None,
    help="Class-conditional models: labels, e.g. 0,3,7, or a .npy of integers; sample i gets label "
    "L[i mod len(L)] [default: i mod the number of classes, every class evenly].",
)
@click.option("--out", type=click.Path(dir_okay=False), default="samples.npy", help="Samples (.npy).")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Picture (default: --out with .png).")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of their EMA.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--figure",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw the reverse process (PNG): snapshots and trajectories of 2-D points, or x_t of the first "
    "images at six moments (from the first batch).",
)
@threads_option
def sample(
    ckpt,
    sampler,
    steps,
    grid,
    fit_pilot,
    fit_objective,
    n,
    batch_size,
    n_steps_each,
    seed,
    klass,
    labels,
    out,
    png,
    no_ema,
    device,
    no_progress,
    figure,
):
    """Draw samples from a trained checkpoint; write them as .npy and a PNG."""
    from ..names import GRID_FUNCTIONS, INFO
    from ..utils.io import atomic_write
    from .pipeline import load
    from .plotting import TrajectoryRecorder, reverse_process_figure, reverse_process_images, save_samples_png

    if not out.endswith(".npy"):
        raise click.BadParameter(f"samples are written as .npy; got {out!r}", param_hint="--out")
    png = png or str(Path(out).with_suffix(".png"))
    for path, option in ((out, "--out"), (png, "--png"), (figure, "--figure")):
        _writable(path, option)  # before the sampling, not after it
    device = _device(device)
    try:
        pipe = load(ckpt, ema=not no_ema, device=device)
        denoiser, process, cfg = pipe.denoiser, pipe.process, pipe.config
        grid = INFO[sampler].grid if grid == "auto" else grid
        if grid == "fit" and INFO[sampler].stochastic:
            raise ValueError(f"--grid fit needs a deterministic sampler; {sampler!r} draws noise")
        ts = None if grid == "fit" else GRID_FUNCTIONS[grid](process, steps)
    except (ValueError, OSError) as e:
        _fail(e)
    shape = pipe.shape
    images = len(shape) == 3
    class_labels, how = _class_labels(cfg, ckpt, klass, labels, n)
    if how:
        click.echo(f"class-conditional model: {how}")
    kwargs = {"n_steps_each": n_steps_each} if sampler == "ald" else {}
    gen = torch.Generator(device).manual_seed(seed)
    if ts is None:
        # the pilot starts get the samples' labels (cycled), so the grid is fitted to what will be sampled
        pilot = None if class_labels is None else class_labels.repeat(-(-fit_pilot // n))[:fit_pilot]
        cond = {} if pilot is None else {"class_labels": pilot.to(device)}
        pilot_shape, spread = (fit_pilot, *shape), fit_objective == "spread"
        fit = _fit_grid(sampler, denoiser, process, steps, pilot_shape, seed, device, no_progress, spread, **cond)
        ts, kwargs = fit.ts, {**kwargs, "final_denoise": fit.final_denoise}
    recorders = []

    def record(x):  # the first batch only: a figure shows a few images, or one cloud of points
        recorders.append(TrajectoryRecorder(x, keep=8 if images else None))
        return recorders[0]

    batch = batch_size or (1000 if images else n)
    xs = _draw(sampler, denoiser, process, shape, n, batch, ts, gen, device, class_labels, no_progress, kwargs,
               record if figure else None)  # fmt: skip
    if figure:
        title = f"reverse process: {sampler}, {process!r}"
        if images:
            reverse_process_images(recorders[0], shape, figure, title)
        else:
            reverse_process_figure(recorders[0], xs, None, figure, title)
        click.echo(f"wrote the reverse-process figure to {figure}")
    atomic_write(out, lambda p: np.save(p, xs.numpy()))
    if images:
        from ..utils.image_grid import save_image_grid

        if class_labels is not None and klass is None and labels is None:
            nrow = cfg["net"]["num_classes"]  # labels i mod K: every class in its own column
        else:
            nrow = 16 if len(xs) >= 256 else 8
        save_image_grid(xs[:256].clamp(-1, 1), png, nrow=nrow)
    else:
        save_samples_png(xs, png, f"{sampler}, {len(ts)} levels, {process!r}")
    click.echo(f"wrote {n} samples to {out} and a picture to {png}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo-output", help="Output folder.")
@click.option("--data", default="8gaussians", help="Built-in 2-D set.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (default: the demo's).")
@click.option("--seed", type=int, default=0, help="Seed.")
@click.option("--resume", is_flag=True, help="Continue an interrupted demo run in --out.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@threads_option
def demo(out, data, steps, seed, resume, no_progress):
    """Train a VP model on built-in 2-D data (~1 minute on 2 cores), sample it two ways, draw it."""
    from .demo import quick_config, run_demo

    changes = {"data": data, "seed": seed} | ({"steps": steps} if steps else {})
    try:
        m = run_demo(out, config=quick_config(**changes), progress=not no_progress, resume=resume)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as e:
        _fail(e)
    click.echo(f"data {m['data']}, {m['process']}, {m['train_steps']} steps in {m['train_seconds']} s")
    click.echo(
        f"sliced Wasserstein-2 to held-out data: DDPM {m['sw2_ddpm']:.4f}, "
        f"annealed Langevin {m['sw2_ald']:.4f}, noise floor {m['sw2_floor']:.4f}"
    )
    click.echo(f"figure: {m['figure']}")


@main.command()
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="Run directory or checkpoint folder.")
@click.option("--data", required=True, help="Built-in 2-D set (held-out draws) or an (N, D) .npy / .csv file.")
@click.option(
    "--method",
    type=click.Choice(["ode", "elbo", "vlb"]),
    default="ode",
    help="ode: exact probability-flow likelihood; elbo: continuous-time bound; vlb: DDPM's discrete bound.",
)
@click.option("--n", "n", type=click.IntRange(min=2), default=2000, help="Examples drawn from a built-in set.")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, help="Examples per batch.")
@click.option("--n-t", type=click.IntRange(min=1), default=16, help="Times drawn per example (elbo, vlb).")
@click.option(
    "--rtol", type=click.FloatRange(min=0, min_open=True), default=1e-5, help="ODE solver relative tolerance (> 0)."
)
@click.option(
    "--atol", type=click.FloatRange(min=0, min_open=True), default=1e-5, help="ODE solver absolute tolerance (> 0)."
)
@click.option("--hutchinson", is_flag=True, help="Estimate the divergence with a Rademacher probe (high dimension).")
@click.option("--seed", type=int, default=0, help="Seed of the held-out draw, times and probes.")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of their EMA.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@threads_option
def likelihood(ckpt, data, method, n, batch_size, n_t, rtol, atol, hutchinson, seed, no_ema, device, no_progress):
    """Negative log-likelihood of DATA under a checkpoint, in nats per example and bits per dimension."""
    from tqdm.auto import tqdm

    from ..data import load_dataset
    from ..likelihood.bounds import elbo, vlb
    from ..likelihood.dequantize import bits_per_dim
    from ..likelihood.ode import log_likelihood
    from ..training.checkpoint import load_denoiser

    device = _device(device)
    try:
        denoiser, process, cfg = load_denoiser(ckpt, ema=not no_ema, device=device)
        denoiser = denoiser.double()  # likelihoods integrate in float64; so does the network here
        x = load_dataset(data, n, generator=torch.Generator().manual_seed(seed + 1)).to(device, torch.float64)
    except (ValueError, OSError) as e:
        _fail(e)
    shape = _example_shape(cfg)
    if tuple(x.shape[1:]) != shape:
        kind = f"{shape[0]}-D points" if len(shape) == 1 else f"images {'x'.join(map(str, shape))}"
        raise click.BadParameter(
            f"the model in {ckpt} was trained on {kind} (data {cfg.get('data')!r}), but {data!r} has examples of "
            f"shape {tuple(x.shape[1:])}; give data of the model's dimension",
            param_hint="--data",
        )
    discrete = process.n_steps is not None
    if method == "vlb" and not discrete:
        raise click.BadParameter(
            f"vlb is DDPM's discrete-time bound and needs a discrete-time process (trained with --process ddpm); "
            f"this checkpoint's process is {process!r}: use --method elbo (continuous-time bound) or ode",
            param_hint="--method",
        )
    if method == "elbo" and discrete:
        raise click.BadParameter(
            f"elbo is the continuous-time bound; this checkpoint's process is discrete-time ({process!r}): use "
            "--method vlb (DDPM's discrete bound) or ode",
            param_hint="--method",
        )
    gen = torch.Generator(device).manual_seed(seed)
    nll = []
    try:
        for xb in tqdm(x.split(batch_size), desc=f"{method} likelihood", disable=no_progress, leave=False):
            if method == "ode":
                lp = log_likelihood(
                    denoiser, process, xb, exact_trace=not hutchinson, rtol=rtol, atol=atol, generator=gen
                )
                nll.append(-lp.detach())
            elif method == "elbo":
                nll.append(-elbo(denoiser, process, xb, n_t=n_t, generator=gen)[0].detach())
            else:
                nll.append(vlb(denoiser, process, xb, n_t=n_t, generator=gen).detach())
    except ValueError as e:  # e.g. vlb on a continuous process, elbo on a discrete one
        _fail(e)
    nll = torch.cat(nll)
    mean, se = float(nll.mean()), float(nll.std() / len(nll) ** 0.5)
    d = x[0].numel()
    bound = "upper bound on " if method != "ode" else ""
    click.echo(f"{method}: {bound}NLL = {mean:.4f} +- {se:.4f} nats per example ({len(nll)} examples, dim {d})")
    click.echo(
        f"        = {float(bits_per_dim(torch.tensor(mean), d)):.4f} +- {se / (d * 0.6931471805599453):.4f} bits/dim"
    )


@main.command()
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="Run directory or checkpoint folder.")
@click.option("--data", required=True, help="Image data: digits, digits16, or a folder / .npz / IDX / CIFAR path.")
@click.option("--n", "n", type=click.IntRange(min=2), default=1000, help="Generated images to evaluate.")
@click.option("--sampler", type=click.Choice(sorted(SAMPLERS)), default="dpmpp_2m", help="Sampling algorithm.")
@click.option("--steps", type=click.IntRange(min=1), default=20, help="Sampler steps.")
@click.option("--inception", type=click.Path(dir_okay=False), default=None, help="pytorch-fid Inception weights file.")
@click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None, help="Where the own feature net is cached."
)
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, help="KID subsets.")
@click.option("--pr-k", type=click.IntRange(min=1), default=3, help="k of the k-NN precision/recall.")
@click.option("--seed", type=int, default=0, help="Seed.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    help="Images generated at once; memory grows with it. One seed and batch size always give the same images.",
)
@click.option("--class", "klass", type=click.IntRange(min=0), default=None, help="Class-conditional models: one class.")
@click.option(
    "--labels",
    default=None,
    help="Class-conditional models: labels, e.g. 0,3,7, or a .npy of integers; image i gets label "
    "L[i mod len(L)] [default: i mod the number of classes, every class evenly].",
)
@click.option("--device", default="cpu", help="torch device.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@threads_option
def evaluate(ckpt, data, n, sampler, steps, inception, cache_dir, kid_subsets, pr_k, seed, batch_size, klass, labels,
             device, out, no_progress):  # fmt: skip
    """FID, KID and precision/recall of a checkpoint's samples against image DATA."""
    import json

    from ..data import load_images
    from ..evaluation.features import feature_net_for, load_inception
    from ..evaluation.image_metrics import evaluate_images
    from ..names import GRID_FUNCTIONS, INFO
    from ..training.checkpoint import load_denoiser
    from ..utils.io import atomic_write

    _writable(out, "--out")  # before the sampling, not after it
    device = _device(device)
    try:
        denoiser, process, cfg = load_denoiser(ckpt, device=device)
    except (ValueError, OSError) as e:
        _fail(e)
    shape = _example_shape(cfg)
    if len(shape) != 3:
        raise click.BadParameter(
            f"{ckpt} holds a model of {shape[0]}-D points (data {cfg.get('data')!r}); evaluate measures image "
            "models (for points: `torchdiffusion likelihood`, or sample it and compare)",
            param_hint="--checkpoint",
        )
    try:
        real, real_labels = load_images(data)
    except (ValueError, OSError) as e:
        _fail(e)
    if tuple(real.shape[1:]) != shape:
        got, want = "x".join(map(str, real.shape[1:])), "x".join(map(str, shape))
        options = cfg.get("data_options") or {}
        raise click.BadParameter(
            f"the model makes {want} images (channels x height x width) but {data!r} holds {got} images; "
            f"compare it with the data it was trained on: --data {cfg.get('data')}"
            + (f" (loaded with {options})" if options else ""),
            param_hint="--data",
        )
    class_labels, how = _class_labels(cfg, ckpt, klass, labels, n)
    if how:
        click.echo(f"class-conditional model: {how}")
    try:
        if inception:
            net = load_inception(inception)
        else:
            cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "torchdiffusion", "features")
            name = data if data in ("digits", "digits16") else os.path.basename(os.path.normpath(data))
            net = feature_net_for(name, cache, images=real, labels=real_labels, device=device)
    except (ValueError, OSError) as e:
        _fail(e)
    gen = torch.Generator(device).manual_seed(seed)
    ts = GRID_FUNCTIONS[INFO[sampler].grid](process, steps)
    fake = _draw(sampler, denoiser, process, shape, n, batch_size, ts, gen, device, class_labels, no_progress, {},
                 None)  # fmt: skip
    try:
        result = evaluate_images(
            fake,
            real,
            feature_net=net.to(device),
            kid_subsets=kid_subsets,
            pr_k=pr_k,
            generator=torch.Generator().manual_seed(seed),
        )
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(f"features: {result['features']}")
    click.echo(
        f"FID {result['fid']:.3f}   KID {result['kid_mean']:.4f} +- {result['kid_std']:.4f}   "
        f"precision {result['precision']:.3f}   recall {result['recall']:.3f}"
    )
    click.echo(f"({result['n_fake']} generated with {sampler}, {steps} steps; {result['n_real']} real)")
    if out:
        atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2, default=float) + "\n"))


@main.command()
def samplers():
    """List the samplers: order, network evaluations per step, default grid, stochastic or not, paper."""
    from ..names import DEFAULT_SAMPLER_NAME as DEFAULT_SAMPLER
    from ..names import INFO

    click.echo(f"{'name':<14} {'order':<11} {'NFE/step':<24} {'grid':<7} {'noise':<6} paper")
    for name, info in INFO.items():
        noise = "yes" if info.stochastic else "no"
        click.echo(f"{name:<14} {info.order:<11} {info.nfe:<24} {info.grid:<7} {noise:<6} {info.paper}")
    click.echo(
        f"\nFor few steps: {DEFAULT_SAMPLER} (torchdiffusion.DEFAULT_SAMPLER) on a grid fitted to the model, "
        f"`sample --sampler {DEFAULT_SAMPLER} --grid fit` (docs/bench/samplers.md)."
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
