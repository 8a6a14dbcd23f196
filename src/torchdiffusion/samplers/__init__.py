"""Samplers: plain functions ``sample_xxx(denoiser, process, x, ts, *, ..., generator, callback, **cond)``.

They are stateless, compute coefficients in float64, draw noise only from ``generator``, never
mutate their inputs and work for any tensor shape. The policy at the ends of the interval is
in ``_common``; the table of names, orders and papers is ``torchdiffusion.names.INFO``.
"""

from functools import partial

from ..core.denoiser import CountingDenoiser, count_nfe
from ._common import progress_callback
from .ancestral import sample_ddpm
from .ddim import sample_ddim
from .dpm_solver import sample_dpm_solver, sample_dpm_solver_pp, sample_dpm_solver_pp_sde
from .langevin import langevin_dynamics, sample_annealed_langevin
from .ode import sample_euler, sample_heun, sample_ode_adaptive, sample_rk4
from .sde import sample_pc, sample_reverse_sde
from .unipc import sample_unipc

# The sampler to use when you have no reason to pick another: UniPC with the order-3 predictor and its
# corrector (Zhao et al. 2023), on ``grid_lam``, or for the best samples per NFE on a grid fitted to
# the model (``grid_fit.fit_grid``; see docs/bench/samplers.md).
DEFAULT_SAMPLER = partial(sample_unipc, order=3)
DEFAULT_SAMPLER.__name__, DEFAULT_SAMPLER.__doc__ = "sample_unipc", sample_unipc.__doc__

__all__ = [
    "CountingDenoiser",
    "progress_callback",
    "count_nfe",
    "sample_ddpm",
    "sample_annealed_langevin",
    "langevin_dynamics",
    "sample_euler",
    "sample_heun",
    "sample_rk4",
    "sample_ode_adaptive",
    "sample_reverse_sde",
    "sample_pc",
    "sample_ddim",
    "sample_dpm_solver",
    "sample_dpm_solver_pp",
    "sample_dpm_solver_pp_sde",
    "sample_unipc",
    "DEFAULT_SAMPLER",
]
