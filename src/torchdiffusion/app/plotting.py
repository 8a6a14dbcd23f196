"""Pictures: 2-D samples, forward marginals (the heat picture), score fields, loss curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no screen on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

LIM = 3.2  # the toy sets have unit scale; this frame holds them and their noised versions


def _frame(ax, title: str, lim: float) -> None:
    """A square, tick-less panel of half-width lim, as every 2-D picture here uses."""
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def scatter(ax, x: Tensor, title: str, color: str = "C0", lim: float = LIM) -> None:
    x = x.detach().cpu().reshape(x.shape[0], -1)
    ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5, color=color, linewidths=0)
    _frame(ax, title, lim)


def score_grid(lim: float = LIM, n: int = 17) -> Tensor:
    """An n x n grid of points (n*n, 2) in float64 on which score fields are drawn."""
    u = torch.linspace(-lim * 0.9, lim * 0.9, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(u, u, indexing="xy")
    return torch.stack([gx.flatten(), gy.flatten()], dim=1)


def quiver(ax, pts: Tensor, field: Tensor, title: str, color: str = "k", lim: float = LIM) -> None:
    """Draw a vector field; arrows scaled by the field's 95th-percentile length for readability."""
    field = field.detach().cpu().to(torch.float64)
    scale = field.norm(dim=1).quantile(0.95).clamp_min(1e-12)
    f = field / scale
    ax.quiver(pts[:, 0], pts[:, 1], f[:, 0], f[:, 1], color=color, angles="xy", scale=22, width=0.004)
    _frame(ax, title, lim)


def loss_curve(ax, steps, losses, title: str = "training loss") -> None:
    ax.plot(steps, losses, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def fit_title(fig, ax, title: str, fontsize: float = 9) -> None:
    """Set ``ax``'s title, wrapped at spaces onto more lines until it is no wider than the figure.

    A sample plot's title names the process with its parameters, longer than a 4-inch figure is wide;
    ``tight_layout`` then makes room for the extra lines above the panel.
    """
    import textwrap

    renderer, width = fig.canvas.get_renderer(), len(title)
    while True:
        text = ax.set_title(textwrap.fill(title, width) if width < len(title) else title, fontsize=fontsize)
        if text.get_window_extent(renderer).width <= 0.95 * fig.bbox.width or width <= 12:
            return
        width = int(width * 0.85)


def samples_figure(x: Tensor, title: str = "samples"):
    """The figure of ``save_samples_png``: a scatter plot of 2-D samples (or of their first two coordinates)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    lim = max(LIM, float(x.detach().abs().quantile(0.99)) * 1.1)
    scatter(ax, x, title, lim=lim)
    fit_title(fig, ax, title)
    fig.tight_layout()
    return fig


def save_samples_png(x: Tensor, path, title: str = "samples") -> None:
    """One scatter plot of 2-D samples (or of the first two coordinates), title wrapped to the figure's width."""
    from ..utils.io import atomic_write

    fig = samples_figure(x, title)
    atomic_write(path, lambda p: fig.savefig(p, dpi=120))
    plt.close(fig)


class TrajectoryRecorder:
    """A sampler callback that keeps x after every step (for the first ``n_paths`` examples too).

    ``rec = TrajectoryRecorder(x_T)``, pass ``callback=rec`` to any sampler, then draw
    ``reverse_process_figure(rec, ...)``.
    """

    def __init__(self, x_start: Tensor, n_paths: int = 24, keep: int | None = None):
        self.n_paths, self.keep = n_paths, keep  # keep: store only the first examples (images: a few suffice)
        self.ts: list[float] = [float("nan")]
        self.states: list[Tensor] = [self._flat(x_start)]

    def _flat(self, x: Tensor) -> Tensor:
        x = x[: self.keep] if self.keep is not None else x
        return x.detach().cpu().reshape(x.shape[0], -1).clone()

    def __call__(self, info: dict) -> None:
        self.ts.append(info["t"])
        self.states.append(self._flat(info["x"]))

    def paths(self) -> Tensor:
        """(steps + 1, n_paths, D) positions of the first examples along the way."""
        return torch.stack([s[: self.n_paths] for s in self.states])


def reverse_process_figure(rec: TrajectoryRecorder, final: Tensor, data: Tensor | None, path, title: str) -> None:
    """Snapshots of the reverse process at six moments and the trajectories of a few samples (2-D)."""
    from ..utils.io import atomic_write

    n = len(rec.states)
    picks = sorted({round(i * (n - 1) / 5) for i in range(6)})
    fig = plt.figure(figsize=(3 * len(picks), 7.2))
    grid = fig.add_gridspec(2, len(picks), height_ratios=[1, 1.25])
    lim = max(LIM, float(rec.states[0][:, :2].abs().quantile(0.99)) * 1.05)
    for j, i in enumerate(picks):
        label = "start x_T" if i == 0 else f"after step {i}, t={rec.ts[i]:.3g}"
        scatter(fig.add_subplot(grid[0, j]), rec.states[i], label, color="C0", lim=lim)
    ax = fig.add_subplot(grid[1, : max(1, len(picks) // 2)])
    p = rec.paths()
    for k in range(p.shape[1]):
        ax.plot(p[:, k, 0], p[:, k, 1], lw=0.6, alpha=0.6, color="C0")
    ax.scatter(p[0, :, 0], p[0, :, 1], s=6, color="C7", label="start")
    ax.scatter(p[-1, :, 0], p[-1, :, 1], s=6, color="C3", label="end of last step")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("trajectories of the first samples", fontsize=9)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax2 = fig.add_subplot(grid[1, max(1, len(picks) // 2) :])
    scatter(ax2, final, "final samples" + (" (grey: data)" if data is not None else ""), color="C3")
    if data is not None:
        d = data.detach().cpu().reshape(data.shape[0], -1)
        ax2.scatter(d[:, 0], d[:, 1], s=1, color="C7", alpha=0.3, linewidths=0)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda q: fig.savefig(q, dpi=100))
    plt.close(fig)


def reverse_process_images(rec: TrajectoryRecorder, shape: tuple[int, ...], path, title: str) -> None:
    """The reverse process of images: the recorded examples (rows) at six moments (columns), from x_T to the end.

    ``shape`` is one image's (C, H, W); values are shown clamped to [-1, 1], so the early, noisy moments
    look like the noise they are.
    """
    from ..utils.image_grid import make_grid
    from ..utils.io import atomic_write

    n = len(rec.states)
    picks = sorted({round(i * (n - 1) / 5) for i in range(6)})
    rows = rec.states[0].shape[0]
    fig, axes = plt.subplots(1, len(picks), figsize=(1.6 * len(picks), 1.6 * rows / 2 + 0.9), squeeze=False)
    for ax, i in zip(axes[0], picks, strict=True):
        grid = make_grid(rec.states[i].reshape(-1, *shape), nrow=1)
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title("start x_T" if i == 0 else f"step {i}, t={rec.ts[i]:.3g}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda q: fig.savefig(q, dpi=100))
    plt.close(fig)
