"""What every sampler shares: grid checks, per-example times, noise, callbacks, NFE, the last step.

Policy at the data end (documented once, here): a sampler walks the pairs (ts[i], ts[i+1]) and,
when ``final_denoise`` is true and sigma(ts[-1]) > 0, returns the denoiser's x0_hat at ts[-1]
(one extra network evaluation). This is Algorithm 2's last step of Ho et al. 2020 and the
"noise removal" of Song et al. 2021.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..process import NoiseProcess
from ..timesteps import check_grid


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (the NFE); ``nfe`` is the count so far."""

    def __init__(self, denoiser):
        self.denoiser, self.nfe = denoiser, 0

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, t, **cond)


def count_nfe(denoiser) -> CountingDenoiser:
    """``d = count_nfe(denoiser); sample_xxx(d, ...); d.nfe`` is the number of evaluations used."""
    return CountingDenoiser(denoiser)


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


def progress_callback(total: int, desc: str, disable: bool = False):
    """A tqdm bar and a sampler callback that advances it once per reported step.

    Usage: ``cb, bar = progress_callback(len(ts) - 1, "DDPM"); sample_ddpm(..., callback=cb); bar.close()``.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=disable, unit="step", dynamic_ncols=True, leave=False)
    return (lambda info: bar.update()), bar
