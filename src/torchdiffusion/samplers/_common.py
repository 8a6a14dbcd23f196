"""What every sampler shares: the grid's float64 facts (``Grid``: curves, lam steps and the exponential-integrator
factors, once), noise, callbacks, the order of multistep warm-ups and the last step.

Policy at the ends of the interval (documented once, here; every sampler follows it):

- Data end. A sampler walks the pairs (ts[i], ts[i+1]) and, when ``final_denoise`` is true and
  sigma(ts[-1]) > 0, returns the denoiser's x0_hat at ts[-1] (one extra network evaluation):
  Algorithm 2's last step of Ho et al. 2020, the "noise removal" of Song et al. 2021. A step
  that lands exactly on sigma(s) = 0 (Discrete t = 0, EDM or Flow t = 0) returns x0_hat at its
  start t, the limit of every sampler's update (``Grid.lands``), so no formula divides by 0.
- Noise end. Where alpha(t_max) = 0 (Flow at t = 1), lam is -inf: samplers never divide by
  alpha; ODE velocities use alpha' x0_hat + sigma' eps_hat, which is finite there, and
  lam-based solvers start from the time whose lam is ``timesteps.LAM_MIN`` (the grid functions
  already do, see ``timesteps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.process import NoiseProcess, batch_time
from ..core.timesteps import check_grid


@dataclass(frozen=True)
class Grid:
    """The float64 facts of a time grid ``ts``, as Python floats, computed once before a sampler's loop so that the
    loop itself does only tensor arithmetic on x (what keeps the per-step overhead low).

    Per time i: ``alpha``, ``sigma``, ``lam`` (-inf where alpha = 0, +inf where sigma = 0). Per step i (ts[i] ->
    ts[i+1]): ``h`` = lam_{i+1} - lam_i; the exponential-integrator factors ``em`` = e^{-h}, taken from the curves
    as sigma_s alpha_t / (alpha_s sigma_t) so that alpha_t = 0 gives 0, and ``one_minus_em`` = 1 - e^{-h} (by
    expm1, no cancellation for small h; 1 where h is infinite); ``lands``: sigma(ts[i+1]) = 0, where the step
    returns x0_hat (the module's end policy).
    """

    ts: Tensor
    t_in: Tensor  # ts in x's dtype: the denoiser's time input
    alpha: list[float]
    sigma: list[float]
    lam: list[float]
    h: list[float]
    em: list[float]
    one_minus_em: list[float]
    lands: list[bool]

    @property
    def n(self) -> int:
        """The number of steps, len(ts) - 1."""
        return len(self.alpha) - 1

    def time(self, i: int, x: Tensor) -> Tensor:
        """ts[i] as the (B,) time tensor the denoiser takes."""
        return batch_time(self.t_in[i], x, x.dtype)


def setup(process: NoiseProcess, x: Tensor, ts) -> tuple[Tensor, Grid]:
    """Validate x and ts; the ``Grid`` of ts (float64, on x's device). x itself is never mutated by a sampler."""
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError("x must be a tensor with a batch dimension (B, ...)")
    ts = check_grid(ts).to(x.device)
    a, s, lam = process.alpha(ts).tolist(), process.sigma(ts).tolist(), process.lam(ts).tolist()
    h, em, omh, lands = [], [], [], []
    for i in range(len(a) - 1):
        lands.append(s[i + 1] == 0.0)
        h.append(lam[i + 1] - lam[i])
        em.append(0.0 if lands[-1] else s[i + 1] * a[i] / (a[i + 1] * s[i]))
        omh.append(one_minus_exp(1.0, h[-1], em[-1]))
    return x, Grid(ts, ts.to(x.dtype), a, s, lam, h, em, omh, lands)


def one_minus_exp(k: float, h: float, em: float) -> float:
    """1 - e^{-k h} by expm1 (no cancellation for small h); where h is infinite (alpha_t = 0), 1 - em^k with em =
    e^{-h} from the curves (``Grid.em``)."""
    return -math.expm1(-k * h) if math.isfinite(h) else 1.0 - em**k


def combine(c: float, x: Tensor, weights, values) -> Tensor:
    """c x + sum_j w_j v_j, with the scalars gathered so each term costs one fused tensor operation."""
    out = c * x
    for w, v in zip(weights, values):
        if w != 0.0:  # a value with no weight is left out: it may be infinite (x0_hat of an eps net at alpha = 0)
            out = torch.add(out, v, alpha=w)
    return out


def multistep_orders(lam: list[float], order: int, lower_order_final: bool) -> list[int]:
    """The order of each step of a multistep method (DPM-Solver++, UniPC) on a grid with these lam values.

    Warm-up: step i uses at most the i + 1 values x0_hat(t_i), x0_hat(t_{i-1}), ... whose lam is finite
    (a value at lam = -inf, alpha = 0, is infinitely far in lam and carries no information: dropped).
    ``lower_order_final``: the last steps use orders n - i when n < 10 (Lu et al. 2023's implementation).
    """
    n, orders, run = len(lam) - 1, [], 0
    for i in range(n):
        run = run + 1 if math.isfinite(lam[i]) else 0
        k = min(order, max(run, 1))
        orders.append(min(k, n - i) if lower_order_final and n < 10 else k)
    return orders


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn only from ``generator``."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def report(callback, i: int, g: Grid, x: Tensor, x0_hat: Tensor, nfe: int) -> None:
    """Call ``callback`` with {"i", "t", "x", "x0_hat", "nfe"} after step i."""
    if callback is not None:
        callback({"i": i, "t": float(g.ts[i]), "x": x, "x0_hat": x0_hat, "nfe": nfe})


def finish(denoiser, g: Grid, x: Tensor, final_denoise: bool, cond) -> Tensor:
    """The last step: x0_hat at ts[-1] when asked for and sigma(ts[-1]) > 0, else x."""
    if final_denoise and g.sigma[-1] > 0:
        return denoiser(x, g.time(-1, x), **cond)
    return x


def progress_callback(total: int, desc: str, disable: bool = False):
    """A tqdm bar and a sampler callback that advances it once per reported step.

    Usage: ``cb, bar = progress_callback(len(ts) - 1, "DDPM"); sample_ddpm(..., callback=cb); bar.close()``.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=disable, unit="step", dynamic_ncols=True, leave=False)
    return (lambda info: bar.update()), bar
