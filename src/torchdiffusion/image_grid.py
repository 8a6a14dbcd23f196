"""PNG grids of images, and the quick samples that training draws into them to show its progress.

``save_image_grid(x, path, nrow)`` tiles a batch (N, C, H, W) in [-1, 1] into one PNG with PIL (no
torchvision), written atomically. ``sample_grid`` draws the pictures: DPM-Solver++(2M) (Lu et al. 2023,
Algorithm 2) on a 20-step uniform-lam grid, from the same seeded prior noise every time, so that a
series of grids shows one set of samples sharpening as training goes on.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .io import atomic_write
from .parameterization import Preconditioned, as_denoiser
from .process import NoiseProcess
from .samplers import sample_dpm_solver_pp
from .timesteps import grid_lam

__all__ = ["make_grid", "save_image_grid", "sample_grid", "grid_size", "write_sample_grid", "open_tensorboard"]


def grid_size(n: int, height: int, width: int, nrow: int = 8, padding: int = 2, scale: int = 1) -> tuple[int, int]:
    """(height, width) in pixels of the grid of ``n`` images of height x width, ``nrow`` per row."""
    rows, cols = math.ceil(n / nrow), min(n, nrow)
    return rows * (height * scale + padding) + padding, cols * (width * scale + padding) + padding


def make_grid(x: Tensor, nrow: int = 8, *, padding: int = 2, pad_value: float = 0.0, scale: int = 1) -> np.ndarray:
    """Tile images into one picture: (N, C, H, W) in [-1, 1] -> uint8 array (rows, cols) or (rows, cols, 3).

    ``nrow`` images per row (as torchvision's ``make_grid``), ``padding`` pixels of ``pad_value`` (in
    [-1, 1]) around each, each image enlarged ``scale`` times by pixel repetition (for 8 x 8 digits).
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"expected images (N >= 1, C = 1 or 3, H, W), got shape {tuple(x.shape)}")
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, scale >= 1; got {nrow}, {padding}, {scale}")
    x = x.detach().float().cpu().clamp(-1, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    n, c, h, w = x.shape
    height, width = grid_size(n, h, w, nrow, padding)
    grid = torch.full((c, height, width), float(pad_value))
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # [-1, 1] -> 0..255
    return pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).numpy()


def save_image_grid(
    x: Tensor, path: str | os.PathLike, nrow: int = 8, *, padding: int = 2, pad_value: float = 0.0, scale: int = 1
) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid (``make_grid``), atomically; return the path."""
    from PIL import Image

    pixels = make_grid(x, nrow, padding=padding, pad_value=pad_value, scale=scale)
    image = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


@torch.no_grad()
def sample_grid(
    net: nn.Module,
    process: NoiseProcess,
    shape: tuple[int, ...],
    *,
    target: str,
    sigma_data: float,
    n: int = 64,
    steps: int = 20,
    seed: int = 0,
    num_classes: int | None = None,
    device=None,
    precondition_output: bool = False,
) -> Tensor:
    """``n`` samples (n, *shape) from a raw network with DPM-Solver++(2M) on ``grid_lam(process, steps)``.

    The network is wrapped as in training (``Preconditioned``, its output preconditioned for ``target`` if
    ``precondition_output``, as TrainConfig says; then ``as_denoiser``) and run in eval mode (no dropout); the
    prior noise comes from a generator seeded with ``seed``, and sample i of a class-conditional net gets label
    i mod num_classes. Neither the global RNG nor ``net``'s mode change.
    """
    denoiser = as_denoiser(
        Preconditioned(net, process, sigma_data, target if precondition_output else None), process, target
    )
    gen = torch.Generator(device or "cpu").manual_seed(seed)
    x = process.prior_sample((n, *shape), generator=gen, device=device)
    cond = {"class_labels": torch.arange(n, device=device) % num_classes} if num_classes else {}
    training = net.training
    net.eval()
    try:
        return sample_dpm_solver_pp(denoiser, process, x, grid_lam(process, steps), order=2, generator=gen, **cond)
    finally:
        net.train(training)


def write_sample_grid(
    ema_net: nn.Module, process: NoiseProcess, shape, path, *, writer=None, step: int = 0, **kw
) -> Path:
    """Training's progress picture: ``sample_grid(ema_net, process, shape, **kw)`` as a square-ish PNG grid.

    Images smaller than 32 pixels are enlarged by pixel repetition (8 x 8 digits 4 times, 16 x 16 twice).
    The global RNGs are left as they were (so a run with grids stays bit-equal to one without); with a
    TensorBoard ``writer`` the grid is also logged as image "samples" at ``step``.
    """
    device = next(ema_net.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = sample_grid(ema_net, process, shape, device=device, **kw)
    nrow, scale = math.isqrt(len(x) - 1) + 1, max(1, 32 // max(shape[-2:]))  # ceil(sqrt(n)) per row; >= 32 px
    save_image_grid(x, path, nrow, scale=scale)
    if writer is not None:
        grid = make_grid(x, nrow, scale=scale)
        writer.add_image("samples", grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")
    return Path(path)


def open_tensorboard(run_dir: Path, step: int = 0):
    """A SummaryWriter on ``run_dir/tensorboard``, or None with a one-line notice if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("notice: tensorboard not installed (pip install tensorboard); skipping TensorBoard logs", file=sys.stderr)
        return None
    return SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=step or None)  # a resume drops later events
