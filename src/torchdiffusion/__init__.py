"""torchdiffusion: diffusion models from the ground up.

Notation (one table for the whole library; seed 003 and DESIGN.md):

    x0          clean data                 t > s        two times, t noisier
    ts          decreasing time grid       alpha, sigma x_t = alpha(t) x0 + sigma(t) eps
    lam         log(alpha / sigma)         h            lam(s) - lam(t)
    snr         alpha^2 / sigma^2          f, g2        dx = f x dt + g dW
    x0_hat      denoiser output E[x0|x_t]  eps_hat      (x - alpha x0_hat) / sigma
"""

import sys as _sys

# How idle OpenMP threads wait (a short spin, GOMP_SPINCOUNT=3000: _openmp.py), set before torch is first
# imported, which is when libgomp reads it; a policy the user set wins, and a program that imported torch first
# keeps the OpenMP default.
if "torch" not in _sys.modules:
    from ._openmp import openmp_defaults as _openmp_defaults

    _openmp_defaults()

from .app.export import export_diffusers
from .app.pipeline import Pipeline, load
from .core.consistency import ConsistencyModel
from .core.denoiser import Preconditioned, as_denoiser, count_nfe
from .core.measurements import Blur, Colorize, Dense, Downsample, LinearOperator, Mask, Measurement, Outpaint
from .core.mixture import FullCovarianceMixture, GaussianMixture
from .core.optimized_grid import grid_optimized
from .core.predictions import EPS, FLOW, SCORE, X0, Prediction, V, eps_from, tweedie_score
from .core.process import NoiseProcess, append_dims
from .core.processes import (
    EDM,
    VE,
    VP,
    Cosine,
    Discrete,
    Flow,
    SubVP,
    beta_cosine,
    beta_linear,
    beta_quadratic,
    beta_sigmoid,
    make_betas,
)
from .core.timesteps import grid_discrete, grid_karras, grid_lam, grid_quadratic, grid_t
from .interop.k_diffusion import from_k_diffusion, to_k_diffusion
from .inverse import (
    ddim_interpolate,
    ddim_invert,
    interpolate,
    sample_ddnm,
    sample_ddrm,
    sample_dps,
    sample_mmps,
    sample_pigdm,
    sample_projection,
    sample_repaint,
    sample_smc,
    sdedit,
)
from .likelihood import bits_per_dim, dequantize, elbo, log_likelihood, nll_8bit, vlb, vlb_terms
from .objectives import ELBO, LIKELIHOOD, MIN_SNR, SIMPLE, SNR, MinSNR, Weighting, denoising_loss
from .samplers import *  # noqa: F403  (every sampler by name, DEFAULT_SAMPLER, langevin_dynamics)
from .samplers import __all__ as _samplers_all
from .samplers.consistency import consistency_times, sample_consistency
from .training import TrainConfig, distill, load_denoiser, train

__version__ = "0.1.0"

__all__ = [
    # the noise process (core)
    "NoiseProcess", "append_dims", "VP", "SubVP", "VE", "Cosine", "EDM", "Flow", "Discrete", "make_betas",
    "beta_linear", "beta_cosine", "beta_sigmoid", "beta_quadratic",
    # predictions and the denoiser
    "Prediction", "EPS", "X0", "V", "SCORE", "FLOW", "eps_from", "tweedie_score", "Preconditioned", "as_denoiser",
    "count_nfe", "GaussianMixture", "FullCovarianceMixture", "ConsistencyModel",
    # posterior samplers for inverse problems
    "sample_projection", "sample_ddnm", "sample_dps", "sample_pigdm", "sample_repaint", "sample_ddrm", "sample_smc",
    "sample_mmps",
    # editing: SDEdit, DDIM inversion and interpolation
    "sdedit", "ddim_invert", "interpolate", "ddim_interpolate",
    # measurements (inverse problems)
    "LinearOperator", "Mask", "Outpaint", "Colorize", "Downsample", "Blur", "Dense", "Measurement",
    # time grids
    "grid_t", "grid_lam", "grid_karras", "grid_quadratic", "grid_discrete", "grid_optimized",
    # samplers: every one by name, and the default
    *_samplers_all,
    # few steps: consistency models' sampler (distillation: ``distill``)
    "sample_consistency", "consistency_times",
    # objectives
    "denoising_loss", "Weighting", "SIMPLE", "ELBO", "LIKELIHOOD", "SNR", "MinSNR", "MIN_SNR",
    # likelihood
    "log_likelihood", "elbo", "vlb", "vlb_terms", "bits_per_dim", "dequantize", "nll_8bit",
    # training and loading
    "TrainConfig", "train", "distill", "load_denoiser", "load", "Pipeline", "export_diffusers",
    "from_k_diffusion", "to_k_diffusion",
]  # fmt: skip
