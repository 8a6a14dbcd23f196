"""The README's picture of classifier-free guidance on the built-in coloured shapes (``configs/shapes.yaml``): per
guidance scale w (0: the unconditional model, 1: the conditional one, more: guided), one sample of each of a few
classes from the same noise.

Run: ``torchdiffusion train --config configs/shapes.yaml --out runs/shapes`` and then
``python benchmarks/figure_shapes.py --checkpoint runs/shapes --out docs/shapes_cfg.png``.
"""

from __future__ import annotations

import argparse

import torch

import torchdiffusion as td
from torchdiffusion.data.shapes import COLOURS, SHAPES


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", default="docs/shapes_cfg.png")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 7, 14, 21, 3, 10, 17, 22])
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = td.load(a.checkpoint)
    labels = torch.tensor(a.classes).repeat_interleave(a.per_class)
    rows = []
    for w in a.scales:
        g = torch.Generator().manual_seed(a.seed)
        x = pipe.guided(w).sample(len(labels), labels=labels, sampler="dpmpp_2m", steps=a.steps, generator=g)
        rows.append(x.clamp(-1, 1))
    colours = list(COLOURS)
    names = [f"{colours[c % len(colours)]} {SHAPES[c // len(colours)]}" for c in a.classes]
    plot(torch.cat(rows), [f"w = {w:g}" for w in a.scales], names, len(labels), a.per_class, a.out)
    print(f"wrote {a.out}")


def plot(images, row_labels, col_labels, ncol, per_class, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchdiffusion.utils.image_grid import make_grid

    grid = make_grid(images, ncol, padding=1, pad_value=1.0, scale=3)
    h, w = images.shape[-2] * 3 + 1, images.shape[-1] * 3 + 1
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 45 + 1.2, grid.shape[0] / 45 + 0.9))
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([1 + h * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=8)
    ax.set_xticks([1 + w * per_class * (j + 0.5) for j in range(len(col_labels))], col_labels, fontsize=7, rotation=30)
    ax.set_title(
        "classifier-free guidance (Ho & Salimans 2022) on the built-in shapes; same noise per column", fontsize=8
    )
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout(pad=1.0)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
