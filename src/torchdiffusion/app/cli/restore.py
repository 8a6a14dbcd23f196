"""``torchdiffusion inpaint | outpaint | colorize | upscale``: posterior samples of a trained image model given a
PNG, written as PNGs (``app.restore`` is the Python side).

Each command reads the checkpoint and the picture(s), builds the measurement (a mask, the centre box, the gray
channel mean, the average-pooled low-resolution image), draws ``--n`` posterior samples with ``--method`` (default:
``app.restore.DEFAULT_METHODS``, DDRM: see there why) within ``--steps`` denoiser calls per sample, and writes into
``--out``: ``input.png`` (what was observed), ``samples.png`` (the input, then the samples,
in one row), ``samples.npy`` and, for inpainting, ``mask.png`` (white: generated).
"""

from __future__ import annotations

from pathlib import Path

import click

from ...names import INVERSE
from ._shared import _device, _fail, _say_precision, precision_option, threads_option
from .group import main

PRECISION_HELP = (
    "The network's arithmetic, as in `sample` (auto: bf16 for a U-Net on a CPU with AMX-BF16 or a CUDA GPU with "
    "bf16, else fp32). On the digits model bf16 ran every method 1.6-1.8x faster at one thread, errors within seed "
    "noise; fp32 reproduces float32 samples."
)


def _common(fn):
    """The options every task shares."""
    options = [
        click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="Run directory of an image model."),
        click.option("--image", required=True, type=click.Path(dir_okay=False), help="The input picture (PNG, JPEG)."),
        click.option(
            "--method",
            type=click.Choice(sorted(INVERSE)),
            default=None,
            help="Posterior sampler [default: ddrm, which keeps noiseless observations exactly and is stable on "
            "trained networks; the oracle benchmark's best, mmps, is not: see the README].",
        ),
        click.option(
            "--steps",
            type=click.IntRange(min=2),
            default=100,
            help="Denoiser calls per sample (RePaint's re-done steps and SMC's particles included).",
        ),
        click.option("--n", "n", type=click.IntRange(min=1), default=8, help="Posterior samples."),
        click.option("--seed", type=int, default=0, help="Seed of every random number."),
        click.option(
            "--class",
            "klass",
            type=click.IntRange(min=0),
            default=None,
            help="Class-conditional models: condition on a class too [default: the null class, the picture alone].",
        ),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs."),
        click.option("--no-ema", is_flag=True, help="Use the raw weights instead of their EMA."),
        click.option("--device", default="cpu", help="torch device."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
        precision_option(PRECISION_HELP),
        threads_option,
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _noise_option(fn):
    return click.option(
        "--sigma-y",
        type=click.FloatRange(min=0),
        default=0.0,
        help="Noise level of the observation in [-1, 1] pixel units (0: exact).",
    )(fn)


def _load(ckpt: str, no_ema: bool, device: str):
    from ..pipeline import load

    pipe = load(ckpt, ema=not no_ema, device=_device(device))
    if len(pipe.shape) != 3:
        raise ValueError(f"{ckpt} is a model of points {pipe.shape}; these commands need an image model")
    pipe.require_denoiser("posterior sampling")
    return pipe


def _run(task: str, ckpt, image, method, steps, n, seed, klass, out, no_ema, device, no_progress, precision, build):
    """Load, build the measurement with ``build(pipe, picture)`` -> (measurement, input picture, mask or None),
    sample, write. ``input.png`` and ``mask.png`` are at the picture's own size; ``samples.png`` is enlarged 4x."""
    import numpy as np
    import torch

    from ...data.image_files import read_image
    from ...utils.image_grid import save_image_grid
    from ...utils.io import atomic_write
    from ..restore import DEFAULT_METHODS, solve

    try:
        pipe = _load(ckpt, no_ema, device)
        picture = read_image(image, pipe.shape[0])
        measurement, shown, mask = build(pipe, picture)
        method = method or DEFAULT_METHODS[task]
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator(pipe.device).manual_seed(seed)
        _say_precision(pipe.sampling_denoiser(precision)[1])
        xs = solve(pipe, measurement, n, method=method, nfe=steps, generator=gen, labels=klass,
                   progress=not no_progress, precision=precision)  # fmt: skip
    except (ValueError, OSError) as e:
        _fail(e)
    xs, shown = xs.float(), shown.float().clamp(-1, 1)
    save_image_grid(shown[None], folder / "input.png", nrow=1, padding=0)
    if mask is not None:
        save_image_grid(mask.float()[None, None] * 2 - 1, folder / "mask.png", nrow=1, padding=0)
    if shown.shape != xs.shape[1:]:  # a smaller input (upscaling) is shown at the model's size
        shown = torch.nn.functional.interpolate(shown[None], size=xs.shape[-2:], mode="nearest")[0]
    save_image_grid(torch.cat([shown[None], xs.clamp(-1, 1)]), folder / "samples.png", nrow=n + 1, scale=4)
    atomic_write(folder / "samples.npy", lambda p: np.save(p, xs.numpy()))  # unclamped: the sampler's output
    click.echo(f"{task}: {n} samples by {method} ({steps} calls each) -> {folder}/samples.png, samples.npy")


def _box(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} takes comma-separated integers, got {text!r}") from None


@main.command()
@_common
@click.option("--mask", type=click.Path(dir_okay=False), default=None, help="Mask PNG: white = generate.")
@click.option("--box", default=None, metavar="TOP,LEFT,H,W", help="Or a rectangle to generate.")
def inpaint(ckpt, image, method, steps, n, seed, klass, out, no_ema, device, no_progress, precision, mask, box):
    """Fill a hole (a mask PNG or --box) of an image with posterior samples (noiseless pixels kept)."""

    def build(pipe, picture):
        import torch

        from ...data.image_files import read_mask
        from ..restore import inpainting

        if tuple(picture.shape) != pipe.shape:
            raise ValueError(f"{image} is {tuple(picture.shape[1:])} pixels; the model makes {pipe.shape[1:]}")
        if (mask is None) == (box is None):
            raise ValueError("give the hole as --mask PNG (white = generate) or --box TOP,LEFT,H,W, one of them")
        if mask is not None:
            hole = read_mask(mask)
        else:
            top, left, h, w = _box(box, "--box")
            hole = torch.zeros(pipe.shape[1:], dtype=torch.bool)
            hole[top : top + h, left : left + w] = True
        if tuple(hole.shape) != pipe.shape[1:]:
            raise ValueError(f"the mask is {tuple(hole.shape)} pixels; the image {pipe.shape[1:]}")
        shown = picture.clone()
        shown[:, hole] = 0.0  # the hole in mid-gray
        return inpainting(picture, hole), shown, hole

    _run("inpaint", ckpt, image, method, steps, n, seed, klass, out, no_ema, device, no_progress, precision, build)


@main.command()
@_common
@click.option("--box", default=None, metavar="H,W", help="Keep only the centre box of a full-size image.")
def outpaint(ckpt, image, method, steps, n, seed, klass, out, no_ema, device, no_progress, precision, box):
    """Extend an image beyond its borders: a smaller picture is kept in the centre and the border generated."""

    def build(pipe, picture):
        from ..restore import outpainting

        if box is not None:
            if tuple(picture.shape) != pipe.shape:
                raise ValueError(f"--box crops a full-size image {pipe.shape[1:]}; {image} is {picture.shape[1:]}")
            h, w = _box(box, "--box")
            top, left = (pipe.shape[1] - h) // 2, (pipe.shape[2] - w) // 2
            picture = picture[:, top : top + h, left : left + w]
        m = outpainting(picture, pipe.shape)
        return m, m.y[0].float(), None  # the kept centre on a mid-gray canvas

    _run("outpaint", ckpt, image, method, steps, n, seed, klass, out, no_ema, device, no_progress, precision, build)


@main.command()
@_common
@_noise_option
def colorize(ckpt, image, method, steps, n, seed, klass, out, no_ema, device, no_progress, precision, sigma_y):
    """Colour a gray image (or the gray of a colour one) with an RGB model: y = the channel mean."""

    def build(pipe, picture):
        from ..restore import colorization

        m = colorization(picture, pipe.shape, sigma_y)
        return m, m.y[0].float().expand(3, -1, -1), None

    _run("colorize", ckpt, image, method, steps, n, seed, klass, out, no_ema, device, no_progress, precision, build)


@main.command()
@_common
@_noise_option
def upscale(ckpt, image, method, steps, n, seed, klass, out, no_ema, device, no_progress, precision, sigma_y):
    """Super-resolution: the model's size from a picture an integer factor smaller (y = average pooling)."""

    def build(pipe, picture):
        from ..restore import super_resolution

        return super_resolution(picture, pipe.shape, sigma_y), picture, None

    _run("upscale", ckpt, image, method, steps, n, seed, klass, out, no_ema, device, no_progress, precision, build)
