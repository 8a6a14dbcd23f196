"""PNG grids of images: ``save_image_grid(x, path, nrow)`` tiles a batch (N, C, H, W) in [-1, 1] into one PNG
with PIL (no torchvision), written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .io import atomic_write

__all__ = ["make_grid", "save_image_grid", "grid_size"]


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
