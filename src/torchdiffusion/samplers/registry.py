"""The table of samplers: name -> function (with its knobs), order, NFE per step and paper.

The command line (``torchdiffusion samplers``, ``--sampler NAME``), the conformance test suite
and the benchmarks read this one table. Variants of one function (DPM-Solver-2 and -3, say)
are separate names bound with ``functools.partial``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from .ancestral import sample_ddpm
from .langevin import sample_annealed_langevin
from .ode import sample_euler, sample_heun, sample_ode_adaptive, sample_rk4
from .sde import sample_pc, sample_reverse_sde


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable
    order: str  # convergence order of the deterministic part, or "weak 1" for SDE solvers
    nfe: str  # network evaluations per step
    paper: str
    stochastic: bool


def _bind(fn, **kwargs):
    """fn with default knobs, keeping its name and docstring for help texts."""
    p = partial(fn, **kwargs)
    p.__doc__, p.__name__ = fn.__doc__, fn.__name__
    return p


INFO: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(sample_ddpm, "weak 1", "1", "Ho et al. 2020, Algorithm 2", True),
    "ald": SamplerInfo(
        sample_annealed_langevin, "-", "n_steps_each per level", "Song & Ermon 2019, Algorithm 1", True
    ),
    "reverse_sde": SamplerInfo(
        sample_reverse_sde, "weak 1", "1", "Song et al. 2021, Eq. 6 (reverse-time SDE), Euler-Maruyama", True
    ),
    "pc": SamplerInfo(
        sample_pc, "weak 1", "1 + n_corrector", "Song et al. 2021, Algorithms 1-5 (predictor-corrector)", True
    ),
    "euler": SamplerInfo(sample_euler, "1", "1", "Song et al. 2021, Eq. 13 (probability-flow ODE), Euler", False),
    "heun": SamplerInfo(sample_heun, "2", "2 (1 on the last)", "Karras et al. 2022, Algorithms 1-2", False),
    "rk4": SamplerInfo(sample_rk4, "4", "4", "Runge-Kutta 4 on the probability-flow ODE", False),
    "ode_adaptive": SamplerInfo(
        sample_ode_adaptive, "5 (dopri5)", "adaptive", "Dormand & Prince 1980 via torchdiffeq", False
    ),
}

SAMPLERS: dict[str, Callable] = {name: info.fn for name, info in INFO.items()}
