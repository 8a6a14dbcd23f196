"""``torchdiffusion train-classifier``: a noise-conditional classifier for classifier guidance (point data)."""

from __future__ import annotations

import click

from ...names import PROCESSES
from ._shared import _fail, threads_option
from .group import main


@main.command("train-classifier")
@click.option(
    "--data", default="8gaussians", help="A built-in 2-D set with labels (8gaussians, moons, circles, pinwheel)."
)
@click.option("--n", "n", type=click.IntRange(min=2), default=20000, help="Training points drawn from --data.")
@click.option("--process", type=click.Choice(sorted(PROCESSES)), default="vp", help="The diffusion model's process.")
@click.option("--width", type=click.IntRange(min=1), default=128, help="MLP hidden width.")
@click.option("--depth", type=click.IntRange(min=1), default=3, help="MLP residual blocks.")
@click.option("--steps", type=click.IntRange(min=1), default=2000, help="Training steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, help="Examples per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, help="Peak learning rate (AdamW).")
@click.option("--seed", type=int, default=0, help="Seed of data, initialisation, times and noise.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory for the classifier.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@threads_option
def train_classifier(data, n, process, width, depth, steps, batch_size, lr, seed, out, no_progress):
    """Train p_t(c | x_t) on noised labelled data (Dhariwal & Nichol 2021); guide with `sample --classifier OUT`."""
    import torch

    from ...data import LABELED_TOY_DATASETS, make_2d
    from ...names import build_net, build_process
    from ...training.classifier import save_classifier
    from ...training.classifier import train_classifier as fit

    if data not in LABELED_TOY_DATASETS:
        raise click.BadParameter(
            f"{data!r} has no class labels; choose one of {sorted(LABELED_TOY_DATASETS)}", param_hint="--data"
        )
    k = LABELED_TOY_DATASETS[data]
    gen = torch.Generator().manual_seed(seed)
    x, labels = make_2d(data, n, generator=gen, return_labels=True)
    net_spec = {"name": "mlp", "dim": 2, "width": width, "depth": depth, "out_dim": k}
    proc_spec = {"name": process}
    try:
        torch.manual_seed(seed)
        clf = fit(build_net(net_spec), build_process(proc_spec), x, labels, steps=steps, batch_size=batch_size,
                  lr=lr, generator=gen, progress=not no_progress)  # fmt: skip
        config = {"process": proc_spec, "net": net_spec, "num_classes": k, "data": data, "steps": steps, "seed": seed}
        save_classifier(out, clf, config)
    except (ValueError, OSError) as e:
        _fail(e)
    held, held_labels = make_2d(data, 2000, generator=gen, return_labels=True)
    t = torch.full((len(held),), clf.process.t_min)
    acc = float((clf(held, t).argmax(1) == held_labels).float().mean())
    click.echo(f"trained a {k}-class classifier for {steps} steps; accuracy at t_min on 2000 new points {acc:.3f}")
    click.echo(f"wrote {out}; guide with: torchdiffusion sample --checkpoint RUN --classifier {out} --class C")
