"""The quick samples that training draws into PNG grids (and TensorBoard) to show its progress.

``sample_grid`` draws the pictures: DPM-Solver++(2M) (Lu et al. 2023, Algorithm 2) on a 20-step uniform-lam
grid (a distilled student: its own sampler), from the same seeded prior noise every time, so that a series of
grids shows one set of samples sharpening as training goes on.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.process import NoiseProcess
from ..core.timesteps import grid_lam
from ..samplers import sample_dpm_solver_pp
from ..utils.image_grid import make_grid, save_image_grid
from .objective import kind_sampler, model_of

__all__ = ["sample_grid", "write_sample_grid", "open_tensorboard"]


@torch.no_grad()
def sample_grid(
    net: nn.Module,
    process: NoiseProcess,
    shape: tuple[int, ...],
    *,
    config: dict,
    n: int = 64,
    steps: int = 20,
    seed: int = 0,
    num_classes: int | None = None,
    device=None,
    cond: dict | None = None,
) -> Tensor:
    """``n`` samples (n, *shape) from a raw network of a run with ``config`` (its ``TrainConfig.to_dict()``).

    The network is wrapped as in training (``objective.model_of``) and run in eval mode (no dropout). A denoiser
    samples with DPM-Solver++(2M) on ``grid_lam(process, steps)``; a distilled student with its own sampler and
    step count (``objective.kind_sampler``: one consistency step, or the progressive student's steps). The prior
    noise comes from a generator seeded with ``seed``, and sample i of a class-conditional net gets label i mod
    num_classes. ``cond``: further conditioning passed to the net (a super-resolution model's ``low_res``). Neither
    the global RNG nor ``net``'s mode change.
    """
    model = model_of(net, process, config)
    gen = torch.Generator(device or "cpu").manual_seed(seed)
    x = process.prior_sample((n, *shape), generator=gen, device=device)
    cond = {**({"class_labels": torch.arange(n, device=device) % num_classes} if num_classes else {}), **(cond or {})}
    training = net.training
    net.eval()
    try:
        own = kind_sampler(config, process, None)
        if own is not None:
            sampler, ts, _ = own
            return sampler(model, process, x, ts, generator=gen, **cond)
        return sample_dpm_solver_pp(model, process, x, grid_lam(process, steps), order=2, generator=gen, **cond)
    finally:
        net.train(training)


def write_sample_grid(
    ema_net: nn.Module, process: NoiseProcess, shape, path, *, writer=None, step: int = 0, decode=None, **kw
) -> Path:
    """Training's progress picture: ``sample_grid(ema_net, process, shape, **kw)`` as a square-ish PNG grid.

    Images smaller than 32 pixels are enlarged by pixel repetition (8 x 8 digits 4 times, 16 x 16 twice).
    The global RNGs are left as they were (so a run with grids stays bit-equal to one without); with a
    TensorBoard ``writer`` the grid is also logged as image "samples" at ``step``. ``decode``: a latent model's
    decoder, applied to the samples first.
    """
    device = next(ema_net.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = sample_grid(ema_net, process, shape, device=device, **kw)
    x = decode(x) if decode is not None else x
    nrow, scale = math.isqrt(len(x) - 1) + 1, max(1, 32 // max(x.shape[-2:]))  # ceil(sqrt(n)) per row; >= 32 px
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
