"""Samplers: plain functions ``sample_xxx(denoiser, process, x, ts, *, ..., generator, callback, **cond)``.

They are stateless, compute coefficients in float64, draw noise only from ``generator``, never
mutate their inputs and work for any tensor shape. The policy at the data end is in ``_loop``.
"""

from ._loop import CountingDenoiser, count_nfe, progress_callback
from .ancestral import sample_ddpm
from .langevin import langevin_dynamics, sample_annealed_langevin

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ald": sample_annealed_langevin,
}

__all__ = [
    "CountingDenoiser",
    "progress_callback",
    "count_nfe",
    "sample_ddpm",
    "sample_annealed_langevin",
    "langevin_dynamics",
    "SAMPLERS",
]
