"""``torchdiffusion evaluate``: FID, KID and precision/recall of a checkpoint's images."""

from __future__ import annotations

import os

import click
import torch

from ...data.images import IMAGE_DATASETS
from ...names import SAMPLERS
from ._sampling import _class_labels, _draw
from ._shared import _device, _example_shape, _fail, _say_precision, _writable, precision_option, threads_option
from .group import main


@main.command()
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="Run directory or checkpoint folder.")
@click.option(
    "--data",
    required=True,
    help="Image data: a built-in set (digits, digits16, shapes16, shapes32) or a folder / .npz / IDX / CIFAR path.",
)
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
@precision_option(
    "The network's arithmetic while sampling, as in `sample` (auto: bf16 for a U-Net where native, else fp32)."
)
@threads_option
def evaluate(ckpt, data, n, sampler, steps, inception, cache_dir, kid_subsets, pr_k, seed, batch_size, klass, labels,
             device, out, no_progress, precision):  # fmt: skip
    """FID, KID and precision/recall of a checkpoint's samples against image DATA."""
    import json

    from ...data import load_images
    from ...evaluation.features import feature_net_for, load_inception
    from ...evaluation.image_metrics import evaluate_images
    from ...names import GRID_FUNCTIONS, INFO
    from ...training.objective import kind_sampler
    from ...utils.io import atomic_write
    from ..pipeline import at_precision, latent_codec, load_model

    _writable(out, "--out")  # before the sampling, not after it
    device = _device(device)
    try:
        denoiser, process, cfg = load_model(ckpt, device=device)
        codec = latent_codec(ckpt, cfg, device)  # a latent model's decoder, else None
    except (ValueError, OSError) as e:
        _fail(e)
    latent_shape = _example_shape(cfg)
    shape = codec.image_shape if codec is not None else latent_shape
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
            name = data if data in IMAGE_DATASETS else os.path.basename(os.path.normpath(data))
            net = feature_net_for(name, cache, images=real, labels=real_labels, device=device)
    except (ValueError, OSError) as e:
        _fail(e)
    gen = torch.Generator(device).manual_seed(seed)
    own = kind_sampler(cfg, process, None)  # a distilled student: its own sampler and step count
    if own is not None:
        click.echo(f"a {cfg['objective']!r} model: sampled with {own[0].__name__} in {own[2]} step(s)")
        sampler, ts, steps = own[0], own[1], own[2]
    else:
        ts = GRID_FUNCTIONS[INFO[sampler].grid](process, steps)
    denoiser, precision = at_precision(denoiser, precision, device, cfg["net"].get("name", ""))  # as `sample`
    _say_precision(precision)
    fake = _draw(sampler, denoiser, process, latent_shape, n, batch_size, ts, gen, device, class_labels, no_progress,
                 {}, None)  # fmt: skip
    if codec is not None:  # a latent model: FID of the decoded images
        fake = codec.decode(fake)
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
    name = sampler if isinstance(sampler, str) else sampler.__name__
    click.echo(f"({result['n_fake']} generated with {name}, {steps} steps; {result['n_real']} real)")
    if out:
        atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2, default=float) + "\n"))
