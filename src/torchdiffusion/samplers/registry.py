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
from .ddim import sample_ddim
from .dpm_solver import sample_dpm_solver, sample_dpm_solver_pp, sample_dpm_solver_pp_sde
from .langevin import sample_annealed_langevin
from .ode import sample_euler, sample_heun, sample_ode_adaptive, sample_rk4
from .sde import sample_pc, sample_reverse_sde
from .unipc import sample_unipc


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable
    order: str  # convergence order of the deterministic part, or "weak 1" for SDE solvers
    nfe: str  # network evaluations per step
    paper: str
    stochastic: bool
    grid: str = "lam"  # the time grid the command line uses when none is named


def _bind(fn, **kwargs):
    """fn with default knobs, keeping its name and docstring for help texts."""
    p = partial(fn, **kwargs)
    p.__doc__, p.__name__ = fn.__doc__, fn.__name__
    return p


INFO: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(sample_ddpm, "weak 1", "1", "Ho et al. 2020, Algorithm 2", True, "t"),
    "ald": SamplerInfo(sample_annealed_langevin, "-", "n_steps_each per level", "Song & Ermon 2019, Algorithm 1", True),
    "reverse_sde": SamplerInfo(
        sample_reverse_sde, "weak 1", "1", "Song et al. 2021, Eq. 6 (reverse-time SDE), Euler-Maruyama", True, "t"
    ),
    "pc": SamplerInfo(
        sample_pc, "weak 1", "1 + n_corrector", "Song et al. 2021, Algorithms 1-5 (predictor-corrector)", True, "t"
    ),
    "euler": SamplerInfo(sample_euler, "1", "1", "Song et al. 2021, Eq. 13 (probability-flow ODE), Euler", False),
    "heun": SamplerInfo(sample_heun, "2", "2 (1 on the last)", "Karras et al. 2022, Algorithms 1-2", False, "karras"),
    "rk4": SamplerInfo(sample_rk4, "4", "4", "Runge-Kutta 4 on the probability-flow ODE", False),
    "ode_adaptive": SamplerInfo(
        sample_ode_adaptive, "5 (dopri5)", "adaptive", "Dormand & Prince 1980 via torchdiffeq", False
    ),
    "ddim": SamplerInfo(sample_ddim, "1", "1", "Song, Meng & Ermon 2021, Eqs. 12, 16 (eta = 0)", False),
    "ddim_eta1": SamplerInfo(
        _bind(sample_ddim, eta=1.0), "weak 1", "1", "Song, Meng & Ermon 2021, Eq. 16 (eta = 1: DDPM)", True
    ),
    "dpm_solver_2": SamplerInfo(_bind(sample_dpm_solver, order=2), "2", "2", "Lu et al. 2022, Algorithm 1", False),
    "dpm_solver_3": SamplerInfo(_bind(sample_dpm_solver, order=3), "3", "3", "Lu et al. 2022, Algorithm 2", False),
    "dpmpp_2m": SamplerInfo(_bind(sample_dpm_solver_pp, order=2), "2", "1", "Lu et al. 2023, Algorithm 2", False),
    "dpmpp_3m": SamplerInfo(
        _bind(sample_dpm_solver_pp, order=3),
        "3",
        "1",
        "Lu et al. 2023, 3M (second difference weighted for order 3)",
        False,
    ),
    "dpmpp_2m_sde": SamplerInfo(sample_dpm_solver_pp_sde, "weak 1", "1", "Lu et al. 2023, SDE-DPM-Solver++(2M)", True),
    "unipc_2": SamplerInfo(_bind(sample_unipc, order=2), "3", "1", "Zhao et al. 2023, UniP-2 + UniC (bh2)", False),
    "unipc_3": SamplerInfo(_bind(sample_unipc, order=3), "4", "1", "Zhao et al. 2023, UniP-3 + UniC (bh2)", False),
}

SAMPLERS: dict[str, Callable] = {name: info.fn for name, info in INFO.items()}
