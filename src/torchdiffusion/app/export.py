"""Export a trained U-Net to a diffusers ``DDPMPipeline`` folder: ``export_diffusers("runs/digits", "out/digits")``.

The math of the map is in ``interop.diffusers.unet_to_diffusers`` (what can be exported and why); this module
only finds the network in a run directory, or in a diffusers folder read back (the round trip).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["export_diffusers"]


def export_diffusers(source: str | os.PathLike, out: str | os.PathLike, *, ema: bool = True) -> Path:
    """Write the U-Net of ``source`` (a run directory, or a diffusers folder) as a ``DDPMPipeline`` folder ``out``,
    which ``diffusers.DDPMPipeline.from_pretrained(out)`` samples and ``td.load(out)`` reads back.

    ``ema``: export the EMA weights (those a run samples with). Raises ``ValueError`` naming what cannot be
    exported (a process other than DDPM's, a network that does not see x_t itself, a target diffusers cannot
    name); nothing is written then.
    """
    from ..interop.diffusers import (
        is_diffusers_folder,
        load_unet,
        read_scheduler,
        scheduler_config,
        unet_to_diffusers,
        write_diffusers_folder,
    )  # fmt: skip
    from ..names import get_prediction
    from ..training.checkpoint import load_checkpoint
    from ..training.objective import is_consistency

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder for the export")
    if is_diffusers_folder(source):
        net, _, unet_dir = load_unet(source)
        process, target, _ = read_scheduler(scheduler_config(Path(source), unet_dir, None))
        parts = unet_to_diffusers(net, process, target, 1.0, preconditioned=False)
    else:
        ckpt = load_checkpoint(source)
        cfg = ckpt.config
        if is_consistency(cfg.get("objective", "denoising")):
            raise ValueError(f"{source} is a {cfg['objective']!r} model (a consistency function, not a denoiser); "
                             "diffusers' DDPM pipeline needs a denoiser")  # fmt: skip
        net = ckpt.ema_net if ema else ckpt.net
        parts = unet_to_diffusers(
            net, ckpt.process, get_prediction(cfg["target"]), float(cfg["sigma_data"]),
            precondition_output=bool(cfg.get("precondition_output", False)),
        )  # fmt: skip
        box = cfg.get("data_box")
        if box is not None and len(box[0]) == 1 and float(box[0][0]) >= -1 and float(box[1][0]) <= 1:
            parts[2].update(clip_sample=True, clip_sample_range=1.0)  # data in [-1, 1]: DDPM's x0 clipping
    return write_diffusers_folder(out, *parts)
