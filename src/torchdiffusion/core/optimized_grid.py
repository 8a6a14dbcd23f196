"""Few-step time grids and solver weights, optimized once, offline, stored as data: the default for 5-10 steps.

In the spirit of Sabour et al. 2024 ("Align Your Steps", ICML), a grid is optimized once and then kept as numbers:
no fit per model. Here the models are random Gaussian mixtures, whose exact denoisers make the sampler's error its
own (``benchmarks/optimize_grids.py`` re-derives everything below):

1. Candidates: each minimizes, by Powell's method, the mean over a training family of mixtures of ``grid_fit``'s
   SPREAD objective (distance of the n-step samples to a 400-step teacher plus half the log-density gap, per
   coordinate), free steps and a free end, for UniPC-2 or UniPC-3 on VP. Families: 2-32 dimensions (20 mixtures),
   16-32 dimensions (8 or 12), or a first 2-16 dimensional one (8); 2-8 modes of unequal weights, per-coordinate
   standard deviations 0.02-0.6 of the data's, RMS data scale 0.5-1.5.
2. Choice: UniPC-3 on each candidate and on the uniform lam grid, on a held-out family of 20 other mixtures:
   sliced W2 to 2000 exact samples over the data scale; the lowest mean, and among those within 5% of it the
   smallest mean |log-density gap| per coordinate (this rule was set after the first SW2 scores at n = 5, before
   any gap was seen). Held-out scores (SW2 / |gap|): n = 5, the 2-32 fit for UniPC-3, 0.122 / 0.28 (best SW2:
   0.117 / 0.74, uniform lam 0.165 / 0.56); n = 10, the 16-32 fit for UniPC-3, 0.082 / 0.13 (uniform lam 0.089 /
   0.39). The sampler benchmark's mixtures (``benchmarks/bench_samplers.py``) are in no family.
3. Solver weights, 5 steps (``OPTIMIZED_WEIGHTS``, run by ``samplers.sample_optimized``; issue #15 item 2):
   the grid and the weights of the general multistep form optimized together on the same objective
   (``benchmarks/optimize_solver.py``, which says how each round started). Candidates, held-out SW2 on seed 99 /
   seed 9001 (the mixtures of 50 meeting target i-fixed's rule against the anchors), and SW2 at 5 steps on the
   trained 8gaussians / moons models (two seeds each) and own-feature FID on digits (two seeds):

   | candidate | SW2 99 / 9001 | rule holds | 8gaussians | moons | digits FID |
   |---|---|---|---|---|---|
   | UniPC-3 on the grid stored before | 0.122 / 0.118 | 38 | 0.077, 0.072 | 0.064, 0.049 | 0.378, 0.641 |
   | round 1 (from UniPC-3, 20 mixtures) | 0.114 / 0.112 | 42 | 0.083, 0.078 | 0.070, 0.051 | 0.379, 0.620 |
   | round 1 continued on 40 mixtures | 0.114 / 0.111 | 42 | 0.075, 0.073 | 0.068, 0.051 | 0.376, 0.568 |
   | round 2 (from UniPC-2, 20 mixtures) | 0.119 / 0.110 | 40 | 0.064, 0.059 | 0.044, 0.036 | 0.310, 0.552 |
   | round 2 continued on 40: stored | 0.114 / 0.109 | 41 | 0.065, 0.053 | 0.034, 0.038 | 0.302, 0.495 |

   The rule, set after the first two rounds were seen: held-out SW2 on seed 99 within 5% of the lowest, then the
   trained models (floors: SW2 0.042 and 0.032, FID 0.56 ± 0.26). The 10-step grid keeps UniPC-3's own weights.

The grids are half log-SNR values lam = log(alpha / sigma) of a process with data of scale about 1; they start at
VP's t_max (lam -5.02) and end before t_min (``FINAL_DENOISE`` is False: the noise left at the end, sigma / alpha
= exp(-lam_end), is part of what the fit chose, and a final x0_hat would make the samples too concentrated).
Other step counts resample the next larger stored grid linearly in the step index, as Align Your Steps' released
schedules are extended to other step counts (log-linear interpolation of the noise levels; lam is -log(sigma /
alpha)).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .process import NoiseProcess, as_time
from .timesteps import grid_ends, lam_start

__all__ = ["OPTIMIZED_LAM", "OPTIMIZED_WEIGHTS", "FINAL_DENOISE", "grid_optimized"]

# steps -> n + 1 increasing lam values, rounded to 1e-3 (the module docstring says how each was found)
OPTIMIZED_LAM: dict[int, tuple[float, ...]] = {
    5: (-5.025, -1.286, -0.554, 0.753, 1.748, 3.593),
    10: (-5.025, -2.665, -1.773, -1.032, 0.097, 0.815, 1.579, 2.344, 2.803, 3.681, 4.558),
}
# steps -> the weights w_jk of samplers.sample_optimized, row j = 1..n holding j values (each row sums to 1 up to
# ROUNDING; the sampler normalizes it), optimized once together with that step count's grid above
# (benchmarks/optimize_solver.py, three rounds from UniPC's own weights; the module docstring's step 3)
OPTIMIZED_WEIGHTS: dict[int, tuple[tuple[float, ...], ...]] = {
    5: (
        (1.0,),
        (-0.078, 1.078),
        (0.025, -0.448, 1.423),
        (0.046, -0.015, -0.091, 1.06),
        (0.027, -0.002, 0.021, -0.117, 1.071),
    ),
}
ROUNDING = 1e-3  # the stored values are rounded to this
FINAL_DENOISE = False  # run these grids without the final x0_hat: they were fitted without it


def _lam_table(n: int) -> np.ndarray:
    """n + 1 lam values: the stored grid for n, else the next larger stored grid (the largest one for n above
    all) resampled linearly in the step index (position i / n)."""
    sizes = sorted(OPTIMIZED_LAM)
    base = next((k for k in sizes if k >= n), sizes[-1])
    lam = np.asarray(OPTIMIZED_LAM[base], dtype=np.float64)
    if base == n:
        return lam
    return np.interp(np.linspace(0.0, 1.0, n + 1), np.linspace(0.0, 1.0, base + 1), lam)


def grid_optimized(process: NoiseProcess, n: int) -> Tensor:
    """n steps on the grid optimized offline for few-step sampling (module docstring); run it with
    ``final_denoise=FINAL_DENOISE``.

    The grid starts at ``process.t_max``; its other points keep their stored lam (a noise level relative to
    unit-scale data, the same on every process). Where the process does not reach a stored level (its lam range
    is narrower), the stored interior is mapped affinely onto the process's range instead.
    """
    if int(n) < 1:
        raise ValueError(f"a grid needs at least 1 step, got n = {n}")
    n = int(n)
    a, b = grid_ends(process, None, None)
    lam_a, lam_b = lam_start(process, a), float(process.lam(as_time(b)))
    lam = _lam_table(n)
    # a level past the process's end by less than the table's rounding is its end (VP's 10-step grid ends there)
    inner = np.where(lam[1:] <= lam_b + ROUNDING, np.minimum(lam[1:], lam_b), lam[1:])
    if inner.min() <= lam_a or inner.max() > lam_b:
        end = min(lam[-1], lam_b)
        inner = lam_a + (inner - lam[0]) * (end - lam_a) / (lam[-1] - lam[0])
    ts = process.t_from_lam(torch.tensor(np.concatenate([[lam_a], inner]), dtype=torch.float64))
    ts[0] = a  # exact ends despite the inverse's rounding
    ts[1:] = ts[1:].clamp(min=b)
    if inner[-1] >= lam_b:
        ts[-1] = b
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"the optimized {n}-step grid is not decreasing on {process!r}: use grid_lam")
    return ts
