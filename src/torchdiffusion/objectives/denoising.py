"""The denoising loss (Ho et al. 2020, Algorithm 1; seed 003, "Training DDPM") for any target and weighting."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.predictions import EPS, Prediction
from ..core.process import NoiseProcess, as_time
from .weightings import SIMPLE, Weighting

__all__ = ["sample_t", "denoising_loss"]


def sample_t(process: NoiseProcess, n: int, *, generator=None, device=None) -> Tensor:
    """Training times ``process.train_t(u)`` of uniform u: uniform on [t_min, t_max], uniform integers 1..T on a
    discrete process, or where the process says otherwise (EDM: VP's noise levels)."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return process.train_t(u)


def denoising_loss(
    model,
    process: NoiseProcess,
    x0: Tensor,
    *,
    target: Prediction = EPS,
    weighting: Weighting = SIMPLE,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    sigma_data: float | None = None,
    **cond,
) -> Tensor:
    """Per-example denoising loss (B,) (Ho et al. 2020, Algorithm 1; seed 003, "Training DDPM").

    Args:
        model: callable (x_t, t (B,), **cond) -> prediction of ``target``, shaped like x0.
        process: the noise process.
        x0: clean data (B, ...).
        target: what the model predicts: ``EPS``, ``X0``, ``V``, ``SCORE`` or ``FLOW``.
        weighting: a ``Weighting`` (``objectives.weightings``: SIMPLE, ELBO, LIKELIHOOD, SNR, MinSNR(gamma)).
        generator: source of t and noise (ignored for those given).
        sigma_data: ``model`` is ``Preconditioned(..., sigma_data, predicts=target)``: see ``Weighting``.
    Returns:
        w(t) |out - target|^2 averaged over the non-batch dims, shape (B,).
    """
    if not isinstance(target, Prediction) or not isinstance(weighting, Weighting):
        raise TypeError(
            f"target and weighting must be objects (e.g. EPS and SIMPLE), got {target!r} and {weighting!r}; "
            "names become objects through torchdiffusion.names"
        )
    B = x0.shape[0]
    if t is None:
        t = sample_t(process, B, generator=generator, device=x0.device)
    t = as_time(t).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = process.perturb(x0, t, noise)
    goal = target.from_x0(process, xt, t, x0, noise)
    out = model(xt, t.to(x0.dtype), **cond)
    err = ((out - goal) ** 2).flatten(1).mean(1)
    return weighting(process, t, target, sigma_data=sigma_data).to(err) * err
