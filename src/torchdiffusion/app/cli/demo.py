"""``torchdiffusion demo``: the one-minute tour (app/demo.py does the work)."""

from __future__ import annotations

import click

from ._shared import _fail, threads_option
from .group import main


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo-output", help="Output folder.")
@click.option("--data", default="8gaussians", help="Built-in 2-D set.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (default: the demo's).")
@click.option("--seed", type=int, default=0, help="Seed.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted demo run in --out, or reuse a finished one (make demo does).",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@threads_option
def demo(out, data, steps, seed, resume, no_progress):
    """Train a VP model on built-in 2-D data (~1 minute on 2 cores), sample it two ways, draw it."""
    from ..demo import quick_config, run_demo

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
