"""Pictures: 2-D samples, forward marginals (the heat picture), score fields, loss curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no screen on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

LIM = 3.2  # the toy sets have unit scale; this frame holds them and their noised versions


def scatter(ax, x: Tensor, title: str, color: str = "C0", lim: float = LIM) -> None:
    x = x.detach().cpu().reshape(x.shape[0], -1)
    ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5, color=color, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


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
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def loss_curve(ax, steps, losses, title: str = "training loss") -> None:
    ax.plot(steps, losses, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def save_samples_png(x: Tensor, path, title: str = "samples") -> None:
    """One scatter plot of 2-D samples (or of the first two coordinates)."""
    from .io import atomic_write

    fig, ax = plt.subplots(figsize=(4, 4))
    lim = max(LIM, float(x.detach().abs().quantile(0.99)) * 1.1)
    scatter(ax, x, title, lim=lim)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120))
    plt.close(fig)
