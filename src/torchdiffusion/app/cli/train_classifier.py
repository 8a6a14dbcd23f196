"""``torchdiffusion train-classifier``: a noise-conditional classifier for classifier guidance (points or images)."""

from __future__ import annotations

import click

from ...names import PROCESSES
from ._shared import _fail, threads_option
from .group import main

HELD_OUT_IMAGES = 1000  # at most this many labelled images (and at most a tenth) are kept out to measure accuracy


@main.command("train-classifier")
@click.option(
    "--data",
    default="8gaussians",
    help="Labelled data: a built-in 2-D set (8gaussians, moons, circles, pinwheel), built-in images (digits, "
    "digits16, shapes16, shapes32), or labelled image files (an .npz with labels, MNIST IDX or CIFAR-10 folder, a "
    "folder of class subfolders with --image-size).",
)
@click.option("--n", "n", type=click.IntRange(min=2), default=20000, help="Training points drawn from a 2-D --data.")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="Side length an image folder's images are resized to (image folders only).",
)
@click.option("--process", type=click.Choice(sorted(PROCESSES)), default="vp", help="The diffusion model's process.")
@click.option(
    "--width",
    type=click.IntRange(min=1),
    default=None,
    help="MLP hidden width [128]; for images the U-Net encoder's base channels [32].",
)
@click.option(
    "--depth",
    type=click.IntRange(min=1),
    default=None,
    help="MLP residual blocks [3]; for images ResBlocks per level of the encoder [1].",
)
@click.option("--steps", type=click.IntRange(min=1), default=2000, help="Training steps.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Examples per step [512 points, 64 images]."
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, help="Peak learning rate (AdamW).")
@click.option("--seed", type=int, default=0, help="Seed of data, initialisation, times and noise.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory for the classifier.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@threads_option
def train_classifier(data, n, image_size, process, width, depth, steps, batch_size, lr, seed, out, no_progress):
    """Train p_t(c | x_t) on noised labelled data (Dhariwal & Nichol 2021); guide with `sample --classifier OUT`.

    Points get a residual MLP; images (N, C, H, H) a U-Net encoder with a pooled linear head (`unet_classifier`,
    the classifier of Dhariwal & Nichol 2021), and a tenth of them (at most 1000) is held out to report accuracy.
    """
    import torch

    from ...data import LABELED_TOY_DATASETS, is_image_spec, load_images, make_2d
    from ...names import build_net, build_process
    from ...training.classifier import image_classifier_spec, save_classifier
    from ...training.classifier import train_classifier as fit

    gen = torch.Generator().manual_seed(seed)
    images = is_image_spec(data)
    if images:
        try:
            x, labels = load_images(data, **({} if image_size is None else {"size": image_size}))
        except (ValueError, TypeError, OSError) as e:
            raise click.BadParameter(str(e), param_hint="--data") from None
        if labels is None:
            raise click.BadParameter(f"the images {data!r} have no class labels", param_hint="--data")
        if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
            raise click.BadParameter(f"expected square images (N, C, H, H), got {tuple(x.shape)}", param_hint="--data")
        k = int(labels.max()) + 1
        perm = torch.randperm(len(x), generator=gen)
        held_n = min(HELD_OUT_IMAGES, len(x) // 10)
        held, held_labels = x[perm[:held_n]], labels[perm[:held_n]]
        x, labels = x[perm[held_n:]], labels[perm[held_n:]]
        net_spec = image_classifier_spec(x.shape[1], x.shape[-1], k, channels=width or 32, num_res_blocks=depth or 1)
        batch_size = batch_size or 64
    else:
        if data not in LABELED_TOY_DATASETS:
            raise click.BadParameter(
                f"{data!r} has no class labels; choose one of {sorted(LABELED_TOY_DATASETS)}, a labelled image set, "
                "or labelled image files",
                param_hint="--data",
            )
        k = LABELED_TOY_DATASETS[data]
        x, labels = make_2d(data, n, generator=gen, return_labels=True)
        net_spec = {"name": "mlp", "dim": 2, "width": width or 128, "depth": depth or 3, "out_dim": k}
        batch_size = batch_size or 512
    proc_spec = {"name": process}
    try:
        torch.manual_seed(seed)
        clf = fit(build_net(net_spec), build_process(proc_spec), x, labels, steps=steps, batch_size=batch_size,
                  lr=lr, generator=gen, progress=not no_progress)  # fmt: skip
        config = {"process": proc_spec, "net": net_spec, "num_classes": k, "data": data, "steps": steps, "seed": seed}
        save_classifier(out, clf, config)
    except (ValueError, OSError) as e:
        _fail(e)
    if not images:
        held, held_labels = make_2d(data, 2000, generator=gen, return_labels=True)
    what = f"{len(held)} held-out images" if images else f"{len(held)} new points"
    if len(held):
        t = torch.full((len(held),), clf.process.t_min)
        with torch.no_grad():
            acc = float((clf(held, t).argmax(1) == held_labels).float().mean())
        click.echo(f"trained a {k}-class classifier for {steps} steps; accuracy at t_min on {what} {acc:.3f}")
    else:
        click.echo(f"trained a {k}-class classifier for {steps} steps (too few images to hold any out)")
    click.echo(f"wrote {out}; guide with: torchdiffusion sample --checkpoint RUN --classifier {out} --class C")
