"""``torchdiffusion train``: a denoiser on data, checkpoints and log.csv in a run folder."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ...names import PRECISIONS, PROCESSES, SCHEDULES, WEIGHTINGS
from ...names import PREDICTIONS as TARGETS
from ._shared import _device, _fail, threads_option
from ._train_config import _train_config, set_option
from .group import main


def _resume_notice(out: Path, steps: int) -> str | None:
    """What a resume with another --steps does to the cosine learning rate, or None."""
    import json

    from ...training.checkpoint import CONFIG, find_checkpoint
    from ...training.config import TrainConfig
    from ...training.step import lr_at

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
    from ...training.checkpoint import find_checkpoint

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
    "(digits, digits16, shapes16, shapes32), or a path: an (N, D) .npy / .csv file, an image folder, .npz, IDX or "
    "CIFAR-10 folder.",
)
@click.option(
    "--download",
    is_flag=True,
    help="Allow downloading --data when it names mnist, fashion-mnist or cifar10 (into data/NAME, checksummed).",
)
@click.option("--process", type=click.Choice(sorted(PROCESSES)), default="vp", help="Noise process.")
@click.option(
    "--schedule", type=click.Choice(list(SCHEDULES)), default="linear", help="Beta schedule (--process ddpm only)."
)
@click.option("--T", "T", type=click.IntRange(min=2), default=1000, help="Discrete steps (--process ddpm only).")
@click.option(
    "--target",
    type=click.Choice(list(TARGETS)),
    default=None,
    help="What the network predicts [default: eps; v for --super-resolution].",
)
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
@click.option(
    "--precision", type=click.Choice(["auto", *PRECISIONS]), default="auto",
    help="Mixed precision. auto: bf16 autocast for the U-Net on a CUDA GPU with bf16 or a CPU with AMX-BF16 "
    "(there 1.3-2x faster at the same loss per step, README 'U-Net speed'), else fp32; a resume keeps its run's. "
    "On a CPU busy with other jobs, use --threads 1 or fp32.",
)  # fmt: skip
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
    "--objective",
    type=click.Choice(["denoising", "consistency"]),
    default="denoising",
    help="denoising: a denoiser (any sampler); consistency: a one-step consistency model trained without a teacher "
    "(Song et al. 2023); sample it with `sample --steps 1|2|4`. From a teacher: `torchdiffusion distill`.",
)
@click.option(
    "--recipe",
    type=click.Choice(["ict", "cm"]),
    default=None,
    help="Consistency training's recipe: ict (Song & Dhariwal 2023, the default) or cm (Song et al. 2023).",
)
@click.option(
    "--autoencoder",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A latent model (Rombach et al. 2022): train on the latents of this `train-autoencoder` run; `sample` "
    "decodes.",
)
@click.option(
    "--super-resolution",
    type=click.Choice(["2", "4", "8"]),
    default=None,
    help="A super-resolution model (Ho et al. 2022): of the images given their F x F average-pooled version, "
    "with Gaussian augmentation of that input (--set low_res_noise=0.2); sample it after a base model: "
    "`sample --cascade BASE,RUN`.",
)
@set_option(
    "Override a training field (after --config and the options); repeatable. VALUE is YAML; dotted keys reach "
    "into net / process / data_options: --set steps=2000 --set net.channels=64."
)
@threads_option
@click.pass_context
def train(ctx, config, data, download, process, schedule, T, target, weighting, width, depth, steps, batch_size,
          grad_accum, lr, ema_decay, precision, flip, sample_every, tensorboard, seed, checkpoint_every, out, resume,
          device, no_progress, objective, recipe, autoencoder, super_resolution, sets):  # fmt: skip
    """Train a denoiser on DATA (or a --config file) and write checkpoints and log.csv to --out.

    Several processes or GPUs: torchrun --standalone --nproc_per_node N --no-python torchdiffusion train --config C
    """
    from ...training.checkpoint import find_checkpoint
    from ...training.loop import train as run_train

    data = _maybe_download(data, download)
    fields = dict(data=data, target=target, weighting=weighting, steps=steps, batch_size=batch_size,
                  grad_accum=grad_accum, lr=lr, ema_decay=ema_decay, precision=precision, flip=flip,
                  sample_every=sample_every, tensorboard=tensorboard, seed=seed, checkpoint_every=checkpoint_every,
                  device=device, objective=objective, autoencoder=autoencoder,
                  super_resolution=int(super_resolution or 0))  # fmt: skip
    if recipe is not None:
        if objective != "consistency":
            raise click.BadParameter("--recipe applies to --objective consistency", param_hint="--recipe")
        fields["distill"] = {"recipe": recipe}
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
    from ...data import DOWNLOADABLE, download_images

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
    from ...data import IMAGE_DATASETS, TOY_DATASETS, load_array

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
