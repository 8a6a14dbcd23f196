"""What every sampler shares: grid checks, per-example times, noise, callbacks, NFE, the last step.

Policy at the ends of the interval (documented once, here; every sampler follows it):

- Data end. A sampler walks the pairs (ts[i], ts[i+1]) and, when ``final_denoise`` is true and
  sigma(ts[-1]) > 0, returns the denoiser's x0_hat at ts[-1] (one extra network evaluation):
  Algorithm 2's last step of Ho et al. 2020, the "noise removal" of Song et al. 2021. A step
  that lands exactly on sigma(s) = 0 (Discrete t = 0, EDM or Flow t = 0) returns x0_hat at its
  start t, the limit of every sampler's update (``lands_on_data``), so no formula divides by 0.
- Noise end. Where alpha(t_max) = 0 (Flow at t = 1), lam is -inf: samplers never divide by
  alpha; ODE velocities use alpha' x0_hat + sigma' eps_hat, which is finite there, and
  lam-based solvers start from the time whose lam is ``timesteps.LAM_MIN`` (the grid functions
  already do, see ``timesteps``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.process import NoiseProcess
from ..core.timesteps import check_grid


def prepare(x: Tensor, ts) -> tuple[Tensor, Tensor]:
    """Validated float64 grid on x's device, and x itself (never mutated by the samplers)."""
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError("x must be a tensor with a batch dimension (B, ...)")
    return x, check_grid(ts).to(x.device)


def batch_t(t: Tensor, x: Tensor) -> Tensor:
    """A scalar time as the (B,) tensor the denoiser takes, in x's dtype."""
    return t.to(x.dtype).expand(x.shape[0])


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn only from ``generator``."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def report(callback, i: int, t: Tensor, x: Tensor, x0_hat: Tensor, nfe: int) -> None:
    if callback is not None:
        callback({"i": i, "t": float(t), "x": x, "x0_hat": x0_hat, "nfe": nfe})


def finish(denoiser, process: NoiseProcess, x: Tensor, t_last: Tensor, final_denoise: bool, cond) -> Tensor:
    """The last step: x0_hat at ts[-1] when asked for and sigma(ts[-1]) > 0, else x."""
    if final_denoise and float(process.sigma(t_last)) > 0:
        return denoiser(x, batch_t(t_last, x), **cond)
    return x


def lands_on_data(process: NoiseProcess, s: Tensor) -> bool:
    """Whether a step to time s lands on the data (sigma(s) = 0): then x_s = x0_hat(x_t, t)."""
    return float(process.sigma(s)) == 0.0


def progress_callback(total: int, desc: str, disable: bool = False):
    """A tqdm bar and a sampler callback that advances it once per reported step.

    Usage: ``cb, bar = progress_callback(len(ts) - 1, "DDPM"); sample_ddpm(..., callback=cb); bar.close()``.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=disable, unit="step", dynamic_ncols=True, leave=False)
    return (lambda info: bar.update()), bar
