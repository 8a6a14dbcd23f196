"""The README's picture of inverse problems on a trained image model: per task and method, the input, then
several posterior samples (``app.restore.solve``; the same calls as ``torchdiffusion inpaint | outpaint | upscale |
colorize``).

Run: ``python benchmarks/figure_inverse.py --checkpoint bench-output/models/digits --out docs/inverse_digits.png``
(the digits U-Net that ``make bench-samplers`` trains, or any ``torchdiffusion train`` run on digits16); with an
RGB model (``configs/shapes.yaml``) ``--tasks colorize inpaint`` shows colorization.
"""

from __future__ import annotations

import argparse
import time

import torch

import torchdiffusion as td
from torchdiffusion.app.restore import colorization, inpainting, outpainting, solve, super_resolution

METHODS = {
    "inpaint": ("projection", "ddnm", "ddrm", "repaint", "dps", "pigdm", "mmps", "smc"),
    "outpaint": ("ddrm", "repaint", "dps", "mmps", "smc"),
    "upscale": ("ddrm", "ddnm", "pigdm", "dps", "mmps"),
    "colorize": ("ddrm", "ddnm", "pigdm", "dps", "mmps"),
}


def task_input(task: str, img: torch.Tensor, shape):
    """(measurement, the picture shown as input at the model's size)."""
    H = shape[1]
    if task == "inpaint":
        hole = torch.zeros(shape[1:], dtype=torch.bool)
        hole[H // 4 : 3 * H // 4, H // 4 : 3 * H // 4] = True
        m = inpainting(img, hole)
        return m, m.y[0].float()
    if task == "outpaint":
        m = outpainting(img[:, H // 4 : 3 * H // 4, H // 4 : 3 * H // 4], shape)
        return m, m.y[0].float()
    if task == "upscale":
        low = torch.nn.functional.avg_pool2d(img[None], 4)[0]
        m = super_resolution(low, shape)
        return m, torch.nn.functional.interpolate(low[None], scale_factor=4, mode="nearest")[0]
    m = colorization(img, shape)
    return m, m.y[0].float().expand(3, -1, -1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", default="docs/inverse_digits.png")
    ap.add_argument("--data", default="digits16", help="where the input pictures come from (a built-in image set)")
    ap.add_argument("--index", type=int, default=5, help="which picture of --data")
    ap.add_argument("--tasks", nargs="+", default=["inpaint", "outpaint", "upscale"], choices=list(METHODS))
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--nfe", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = td.load(a.checkpoint)
    from torchdiffusion.data import load_images

    data, _ = load_images(a.data)
    img = data[a.index]
    rows = []
    for task in a.tasks:
        m, shown = task_input(task, img, pipe.shape)
        for method in METHODS[task]:
            t0 = time.perf_counter()
            x = solve(pipe, m, a.n, method=method, nfe=a.nfe, generator=torch.Generator().manual_seed(a.seed))
            print(f"{task:9s} {method:10s} {time.perf_counter() - t0:5.1f} s")
            rows.append(torch.cat([img[None], shown[None], x.float()]).clamp(-1, 1))
    labels = [f"{t}: {m}" for t in a.tasks for m in METHODS[t]]
    plot(torch.cat(rows), labels, a.n + 2, a.out, f"{a.nfe} denoiser calls per sample; columns: the picture, the "
         "input, then posterior samples")  # fmt: skip
    print(f"wrote {a.out}")


def plot(images, labels, ncol, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchdiffusion.utils.image_grid import make_grid

    grid = make_grid(images, ncol, padding=1, pad_value=1.0, scale=2)
    h = images.shape[-2] * 2 + 1
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40 + 2.2, grid.shape[0] / 40 + 0.5))
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, interpolation="nearest")
    ax.set_yticks([1 + h * (i + 0.5) for i in range(len(labels))], labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout(pad=1.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
