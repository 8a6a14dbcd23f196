"""Samplers: plain functions ``sample_xxx(denoiser, process, x, ts, *, ..., generator, callback, **cond)``.

They are stateless, compute coefficients in float64, draw noise only from ``generator``, never
mutate their inputs and work for any tensor shape. The policy at the ends of the interval is
in ``_common``; the table of names, orders and papers is ``torchdiffusion.names.INFO``.
"""

from functools import partial

from ..core.denoiser import CountingDenoiser, count_nfe
from ._common import progress_callback

# Every family module's __all__ (its sample_* functions): adding a sampler is the function in its family's file
# (listed in that file's __all__) and one row in names.INFO; tests/test_samplers_table.py checks they agree.
from .ancestral import *  # noqa: F403
from .ddim import *  # noqa: F403
from .dpm_solver import *  # noqa: F403
from .langevin import *  # noqa: F403
from .ode import *  # noqa: F403
from .optimized import *  # noqa: F403
from .sde import *  # noqa: F403
from .unipc import *  # noqa: F403

# The sampler to use when you have no reason to pick another: UniPC with the order-3 predictor and its
# corrector (Zhao et al. 2023), on ``grid_lam``, or for the best samples per NFE on a grid fitted to
# the model (``grid_fit.fit_grid``; see docs/bench/samplers.md).
DEFAULT_SAMPLER = partial(sample_unipc, order=3)  # noqa: F405
DEFAULT_SAMPLER.__name__, DEFAULT_SAMPLER.__doc__ = "sample_unipc", sample_unipc.__doc__  # noqa: F405

SAMPLER_FUNCTIONS = {name: fn for name, fn in dict(globals()).items() if name.startswith("sample_")}
"""Every sampler function by its name (``sample_ddim``, ...)."""

__all__ = [
    *SAMPLER_FUNCTIONS,
    "langevin_dynamics",  # noqa: F405
    "euler_maruyama",  # noqa: F405  (sample_pc's predictors)
    "reverse_diffusion",  # noqa: F405
    "DEFAULT_SAMPLER",
    "SAMPLER_FUNCTIONS",
    "CountingDenoiser",
    "count_nfe",
    "progress_callback",
]
