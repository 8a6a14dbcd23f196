"""The click group ``main``; each command's module registers itself on it with ``@main.command()``."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="torchdiffusion")
def main():
    """Diffusion models from the ground up: train, sample and measure them on your own data."""
