"""The main job on built-in data: train a 2-D model, sample it two ways, draw and measure it.

``torchdiffusion demo`` (and ``make demo``) runs ``run_demo``: it trains a VP model on a
built-in 2-D distribution, samples it with DDPM ancestral sampling (Ho et al. 2020, Alg. 2)
and annealed Langevin dynamics (Song & Ermon 2019, Alg. 1), and writes one figure with the
data, the forward marginals at several t (the heat picture of seed 001), the learned score
field next to the exact one, the samples and the loss curve. It reports the sliced
Wasserstein distance of each sampler's output to held-out data next to the noise floor
(the same distance between two held-out sets).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..core.mixture import GaussianMixture
from ..core.predictions import SCORE
from ..core.timesteps import grid_lam, grid_t
from ..data import TOY_DATASETS, eight_gaussians_mixture_params, make_2d
from ..evaluation.metrics import noise_floor, sw_against
from ..samplers import progress_callback, sample_annealed_langevin, sample_ddpm
from ..training.checkpoint import load_denoiser
from ..training.config import TrainConfig
from ..training.loop import train
from ..utils.io import atomic_write
from . import plotting

DEMO_CONFIG = TrainConfig(data="8gaussians", process={"name": "vp"}, target="eps", steps=3000)


def exact_mixture(name: str, points: torch.Tensor) -> tuple[GaussianMixture, str]:
    """The exact p_0 where it is known (8gaussians), else the empirical distribution of ``points``.

    An empirical distribution (point masses) has p_t, score and denoiser exact in closed form
    for every t > 0; with enough points it is close to the true p_t at moderate t.
    """
    if name == "8gaussians":
        return GaussianMixture(*eight_gaussians_mixture_params()), "exact"
    pts = points[:2000].to(torch.float64)
    return GaussianMixture(torch.ones(len(pts)), pts, 0.0), "empirical"


def run_demo(
    out: str | Path = "demo-output",
    *,
    config: TrainConfig = DEMO_CONFIG,
    n_samples: int = 2000,
    n_reference: int = 6,
    ddpm_steps: int = 250,
    ald_levels: int = 100,
    ald_steps_each: int = 10,
    progress: bool = True,
    resume: bool = False,
) -> dict:
    """Train, sample, draw and measure; returns (and writes to ``out/metrics.json``) the figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if config.data not in TOY_DATASETS:
        raise ValueError(f"the demo uses a built-in data set; choose one of {sorted(TOY_DATASETS)}")
    t0 = time.perf_counter()
    result = train(config, out / "run", resume=resume, progress=progress)
    train_s = time.perf_counter() - t0
    denoiser, process, cfg = load_denoiser(out / "run")

    gen = torch.Generator().manual_seed(config.seed + 1)
    # Several held-out sets: a single distance between finite samples is too noisy to judge by.
    held = [make_2d(config.data, n_samples, generator=gen) for _ in range(n_reference)]
    x_T = process.prior_sample((n_samples, 2), generator=gen)

    t1 = time.perf_counter()
    with torch.no_grad():
        cb, bar = progress_callback(ddpm_steps, "DDPM ancestral", disable=not progress)
        x_ddpm = sample_ddpm(denoiser, process, x_T, grid_t(process, ddpm_steps), generator=gen, callback=cb)
        bar.close()
        t2 = time.perf_counter()
        cb, bar = progress_callback(ald_levels + 1, "annealed Langevin", disable=not progress)
        x_ald = sample_annealed_langevin(
            denoiser,
            process,
            x_T,
            grid_lam(process, ald_levels),
            n_steps_each=ald_steps_each,
            generator=gen,
            callback=cb,
        )
        bar.close()
    t3 = time.perf_counter()

    metrics = {
        "data": config.data,
        "process": repr(process),
        "train_steps": config.steps,
        "train_seconds": round(train_s, 1),
        "sw2_ddpm": sw_against(x_ddpm, held[1:]),
        "sw2_ald": sw_against(x_ald, held[1:]),
        "sw2_floor": noise_floor(held),
        "ddpm_seconds": round(t2 - t1, 2),
        "ald_seconds": round(t3 - t2, 2),
        "n_samples": n_samples,
    }
    np.save(out / "samples_ddpm.npy", x_ddpm.numpy())
    np.save(out / "samples_ald.npy", x_ald.numpy())
    _figure(out / "demo.png", config, result, process, denoiser, held[0], x_ddpm, x_ald, metrics)
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    metrics["figure"] = str(out / "demo.png")
    return metrics


def _figure(path, config, result, process, denoiser, held, x_ddpm, x_ald, metrics) -> None:
    fig, axes = plt.subplots(3, 5, figsize=(15, 9.4))
    # Row 1: the heat picture: data diffusing into the prior, p_t at growing t.
    gen = torch.Generator().manual_seed(0)
    x0 = held.to(torch.float64)
    ts = torch.tensor([0.0, 0.1, 0.25, 0.5, 1.0], dtype=torch.float64)
    for ax, t in zip(axes[0], ts):
        t = t.clamp(min=process.t_min)
        xt = process.perturb(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
        a, s = float(process.alpha(t)), float(process.sigma(t))
        plotting.scatter(ax, xt, f"forward q(x_t), t={float(t):.3g}\nalpha={a:.2f} sigma={s:.2f}", color="C7")
    # Row 2: learned vs exact score fields at two noise levels.
    gm, kind = exact_mixture(config.data, held)
    pts = plotting.score_grid()
    for j, t in enumerate((0.05, 0.3)):
        tb = torch.full((len(pts),), t, dtype=torch.float64)
        with torch.no_grad():
            learned = SCORE.from_x0(process, pts.float(), tb, denoiser(pts.float(), tb.float()))
        exact = gm.score(pts, process, tb)
        cos = torch.nn.functional.cosine_similarity(learned.double(), exact, dim=1).mean()
        plotting.quiver(axes[1, 2 * j], pts, learned, f"learned score, t={t}", color="C0")
        plotting.quiver(axes[1, 2 * j + 1], pts, exact, f"{kind} score, t={t}\nmean cosine to learned {cos:.3f}")
    hist = result.history
    plotting.loss_curve(axes[1, 4], [h["step"] for h in hist], [h["loss"] for h in hist])
    # Row 3: samples and the data they should match.
    plotting.scatter(axes[2, 0], held, f"held-out data ({config.data})", color="C2")
    plotting.scatter(axes[2, 1], x_ddpm, f"DDPM ancestral\nSW2 {metrics['sw2_ddpm']:.3f}", color="C0")
    plotting.scatter(axes[2, 2], x_ald, f"annealed Langevin\nSW2 {metrics['sw2_ald']:.3f}", color="C1")
    ax = axes[2, 3]
    ax.axis("off")
    ax.text(0, 0.5, _summary(metrics), fontsize=9, family="monospace", va="center")
    axes[2, 4].axis("off")
    fig.suptitle(f"torchdiffusion demo: {metrics['process']}, target {config.target}", fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)


def _summary(m: dict) -> str:
    return (
        f"sliced Wasserstein-2 to held-out data\n"
        f"  DDPM ancestral    {m['sw2_ddpm']:.4f}\n"
        f"  annealed Langevin {m['sw2_ald']:.4f}\n"
        f"  noise floor       {m['sw2_floor']:.4f}\n"
        f"  (means over held-out sets of {m['n_samples']})\n\n"
        f"training: {m['train_steps']} steps, {m['train_seconds']} s"
    )


def quick_config(**changes) -> TrainConfig:
    """The demo configuration with some fields changed (used by tests for short runs)."""
    return replace(DEMO_CONFIG, **changes)
