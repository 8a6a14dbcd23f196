"""``torchdiffusion export-diffusers``: a trained U-Net as a diffusers ``DDPMPipeline`` folder."""

from __future__ import annotations

import click

from ._shared import _fail
from .group import main


@main.command("export-diffusers")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(exists=True), help="Run directory to export.")
@click.option("--out", required=True, type=click.Path(), help="New folder for the DDPMPipeline (must not exist).")
@click.option("--no-ema", is_flag=True, help="Export the raw weights instead of their EMA.")
def export_diffusers(ckpt, out, no_ema):
    """Write a run's U-Net as a diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/).

    diffusers' ``DDPMPipeline.from_pretrained(OUT)`` samples it, and every torchdiffusion command reads it back
    (``--checkpoint OUT``). The model must have been trained on --process ddpm with --set sigma_data=1 (a
    diffusers U-Net sees x_t itself) and predict eps, or v.
    """
    from ..export import export_diffusers as export

    try:
        path = export(ckpt, out, ema=not no_ema)
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(f"wrote {path} (diffusers DDPMPipeline: model_index.json, unet/, scheduler/)")
