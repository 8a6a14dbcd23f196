"""torchdiffusion: diffusion models from the ground up.

Notation (one table for the whole library; seed 003 and DESIGN.md):

    x0          clean data                 t > s        two times, t noisier
    ts          decreasing time grid       alpha, sigma x_t = alpha(t) x0 + sigma(t) eps
    lam         log(alpha / sigma)         h            lam(s) - lam(t)
    snr         alpha^2 / sigma^2          f, g2        dx = f x dt + g dW
    x0_hat      denoiser output E[x0|x_t]  eps_hat      (x - alpha x0_hat) / sigma
"""

import os as _os
import sys as _sys

# OpenMP worker threads that spin-wait between parallel regions made training ~10x slower on a CPU shared
# with other jobs (issue #10, item 6). libgomp reads OMP_WAIT_POLICY once, when `import torch` loads it, so
# the default is set here, before torch is first imported (the command line always is); a policy the user
# set wins, and a program that imported torch first keeps the OpenMP default.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .core.denoiser import Preconditioned, as_denoiser
from .core.mixture import GaussianMixture
from .core.predictions import PREDICTIONS, eps_from_x0, score_from_x0, to_x0, x0_to
from .core.process import NoiseProcess, append_dims
from .core.processes import EDM, VE, VP, Cosine, Discrete, Flow, SubVP, make_betas
from .core.timesteps import grid_discrete, grid_karras, grid_lam, grid_quadratic, grid_t
from .likelihood.bounds import elbo, vlb, vlb_terms
from .likelihood.dequantize import bits_per_dim, dequantize, nll_8bit
from .likelihood.ode import log_likelihood
from .samplers import count_nfe, langevin_dynamics, sample_annealed_langevin, sample_ddpm

__version__ = "0.1.0"

__all__ = [
    "NoiseProcess",
    "append_dims",
    "VP",
    "SubVP",
    "VE",
    "Cosine",
    "EDM",
    "Flow",
    "Discrete",
    "make_betas",
    "PREDICTIONS",
    "Preconditioned",
    "as_denoiser",
    "to_x0",
    "x0_to",
    "eps_from_x0",
    "score_from_x0",
    "grid_t",
    "grid_lam",
    "grid_karras",
    "grid_quadratic",
    "grid_discrete",
    "sample_ddpm",
    "sample_annealed_langevin",
    "langevin_dynamics",
    "count_nfe",
    "GaussianMixture",
    "log_likelihood",
    "elbo",
    "vlb",
    "vlb_terms",
    "bits_per_dim",
    "dequantize",
    "nll_8bit",
]
