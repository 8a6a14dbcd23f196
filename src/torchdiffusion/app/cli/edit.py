"""``torchdiffusion edit | interpolate``: SDEdit (Meng et al. 2022) and DDIM interpolation (Song, Meng & Ermon
2021, Sec. 5.3) of PNGs with a trained image model (``inverse.editing``)."""

from __future__ import annotations

from pathlib import Path

import click

from ._shared import _device, _fail, _say_precision, precision_option, threads_option
from .group import main

PRECISION_HELP = (
    "The network's arithmetic, as in `sample` (auto: bf16 for a U-Net on a CPU with AMX-BF16 or a CUDA GPU with "
    "bf16, else fp32). On the digits model bf16 halved the time; DDIM's round trip (100 steps) erred by 0.028 RMS "
    "against fp32's 0.027."
)


def _shared(fn):
    for opt in reversed(
        [
            click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="Run directory."),
            click.option(
                "--class",
                "klass",
                type=click.IntRange(min=0),
                default=None,
                help="Class-conditional models [default: the null class].",
            ),
            click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs."),
            click.option("--no-ema", is_flag=True, help="Use the raw weights instead of their EMA."),
            click.option("--device", default="cpu", help="torch device."),
            precision_option(PRECISION_HELP),
            threads_option,
        ]
    ):
        fn = opt(fn)
    return fn


def _setup(ckpt, no_ema, device, images, klass, n):
    from ...data.image_files import read_image
    from ..pipeline import load
    from ..restore import condition_labels

    pipe = load(ckpt, ema=not no_ema, device=_device(device))
    if len(pipe.shape) != 3:
        raise ValueError(f"{ckpt} is a model of points {pipe.shape}; this command needs an image model")
    pipe.require_denoiser("editing")
    pics = []
    for path in images:
        pic = read_image(path, pipe.shape[0])
        if tuple(pic.shape) != pipe.shape:
            raise ValueError(f"{path} is {tuple(pic.shape)}; the model makes {pipe.shape} images")
        pics.append(pic.to(pipe.device))
    labels = condition_labels(pipe, n, klass)
    cond = {} if labels is None else {"class_labels": labels.to(pipe.device)}
    return pipe, pics, cond


def _write(folder, first, xs, name):
    import numpy as np
    import torch

    from ...utils.image_grid import save_image_grid
    from ...utils.io import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    xs = xs.detach().cpu().float().clamp(-1, 1)
    row = xs if first is None else torch.cat([first.cpu()[None].float().clamp(-1, 1), xs])
    save_image_grid(row, folder / f"{name}.png", nrow=len(row), scale=4)
    atomic_write(folder / f"{name}.npy", lambda p: np.save(p, xs.numpy()))
    return folder / f"{name}.png"


@main.command()
@_shared
@click.option("--image", required=True, type=click.Path(dir_okay=False), help="The guide: a picture or a sketch.")
@click.option(
    "--strength",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.5,
    help="How far to noise the guide (t0 as a fraction of the time range; Meng et al. use 0.3-0.6): more is freer.",
)
@click.option("--steps", type=click.IntRange(min=1), default=100, help="Reverse steps from t0 (DDPM's ancestral).")
@click.option("--n", "n", type=click.IntRange(min=1), default=8, help="Edits.")
@click.option("--seed", type=int, default=0, help="Seed of the noise.")
def edit(ckpt, klass, out, no_ema, device, precision, image, strength, steps, n, seed):
    """SDEdit: noise the guide to --strength and sample back, giving realistic images near it."""
    import torch

    from ...inverse.editing import sdedit

    try:
        pipe, (guide,), cond = _setup(ckpt, no_ema, device, [image], klass, n)
        denoiser, resolved = pipe.sampling_denoiser(precision)
        _say_precision(resolved)
        gen = torch.Generator(pipe.device).manual_seed(seed)
        with torch.no_grad():
            xs = sdedit(denoiser, pipe.process, guide.expand(n, *guide.shape), strength, steps=steps,
                        generator=gen, **cond)  # fmt: skip
    except (ValueError, OSError) as e:
        _fail(e)
    path = _write(out, guide, xs, "edits")
    click.echo(f"edit: {n} SDEdit samples at strength {strength} -> {path}")


@main.command()
@_shared
@click.option("--image", required=True, type=click.Path(dir_okay=False), help="The first picture.")
@click.option("--image2", required=True, type=click.Path(dir_okay=False), help="The last picture.")
@click.option("--frames", type=click.IntRange(min=2), default=8, help="Frames, both ends included.")
@click.option("--steps", type=click.IntRange(min=1), default=50, help="DDIM steps (inversion and decoding).")
def interpolate(ckpt, klass, out, no_ema, device, precision, image, image2, frames, steps):
    """Invert two pictures with DDIM, slerp their latents, decode: frames from one to the other."""
    import torch

    from ...core.timesteps import grid_lam
    from ...inverse.editing import ddim_interpolate

    try:
        pipe, (a, b), cond = _setup(ckpt, no_ema, device, [image, image2], klass, 2)
        denoiser, resolved = pipe.sampling_denoiser(precision)
        _say_precision(resolved)
        ts = grid_lam(pipe.process, steps)
        if cond:  # one class for the pair; (1,) broadcasts over the inversion's 2 and the decoding's --frames
            cond = {"class_labels": cond["class_labels"][:1]}
        with torch.no_grad():
            xs = ddim_interpolate(denoiser, pipe.process, a, b, frames, ts, final_denoise=True, **cond)
    except (ValueError, OSError) as e:
        _fail(e)
    path = _write(out, None, xs, "frames")
    click.echo(f"interpolate: {frames} frames -> {path}")
