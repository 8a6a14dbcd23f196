"""``torchdiffusion samplers``: the table of samplers."""

from __future__ import annotations

import click

from .group import main


@main.command()
def samplers():
    """List the samplers: order, network evaluations per step, default grid, stochastic or not, paper."""
    from ...names import DEFAULT_SAMPLER_NAME as DEFAULT_SAMPLER
    from ...names import INFO

    w = max(map(len, INFO)) + 1  # the name column fits the longest name
    click.echo(f"{'name':<{w}} {'order':<11} {'NFE/step':<24} {'grid':<9} {'noise':<6} paper")
    for name, info in INFO.items():
        noise = "yes" if info.stochastic else "no"
        click.echo(f"{name:<{w}} {info.order:<11} {info.nfe:<24} {info.grid:<9} {noise:<6} {info.paper}")
    click.echo(
        "\nFor few steps without a fit: `sample --steps N` runs optimized on the optimized grid (UniPC-3 with weights "
        "stored for 5 steps). With a fit: "
        f"{DEFAULT_SAMPLER} (torchdiffusion.DEFAULT_SAMPLER) on a grid fitted to the model, "
        f"`sample --sampler {DEFAULT_SAMPLER} --grid fit` (docs/bench/samplers.md)."
    )
