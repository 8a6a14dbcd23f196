"""Names to objects: the one table that maps the strings of the command line, config files and checkpoints to
the library's objects (processes, networks, samplers and their facts, prediction targets, weightings, precisions).

Strings stop here: below this module every choice is an object or a function, and the command line's
``--help`` lists come from these tables. Adding a sampler is one function in ``samplers`` and one row in
``INFO`` below. A spec is a JSON-able dict ``{"name": ..., **kwargs}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .core.optimized_grid import grid_optimized
from .core.predictions import ALL_PREDICTIONS
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
)
from .core.timesteps import grid_discrete, grid_karras, grid_lam, grid_quadratic, grid_t
from .inverse import (
    sample_ddnm,
    sample_ddrm,
    sample_dps,
    sample_mmps,
    sample_pigdm,
    sample_projection,
    sample_repaint,
    sample_smc,
)
from .inverse.repaint import repaint_budget
from .inverse.smc import smc_budget
from .nets import MLP, FourierEmbedding, SinusoidalEmbedding, TableEmbedding, UNet, UNetClassifier
from .objectives.weightings import ELBO, LIKELIHOOD, MIN_SNR, SIMPLE, SNR
from .samplers import (
    DEFAULT_SAMPLER,
    sample_annealed_langevin,
    sample_ddim,
    sample_ddpm,
    sample_dpm_solver,
    sample_dpm_solver_pp,
    sample_dpm_solver_pp_2s_ancestral,
    sample_dpm_solver_pp_sde,
    sample_euler,
    sample_heun,
    sample_ode_adaptive,
    sample_optimized,
    sample_pc,
    sample_reverse_sde,
    sample_rk4,
    sample_unipc,
)

__all__ = [
    "PROCESSES", "NETS", "EMBEDDINGS", "INFO", "SAMPLERS", "SamplerInfo", "DEFAULT_SAMPLER_NAME", "PREDICTIONS",
    "WEIGHTINGS",
    "PRECISIONS", "GRIDS", "GRID_FUNCTIONS", "SCHEDULES", "build_process", "build_net", "get_sampler",
    "get_prediction", "get_weighting", "INVERSE", "InverseInfo", "get_inverse",
]  # fmt: skip

NETS = {"mlp": MLP, "unet": UNet, "unet_classifier": UNetClassifier}  # unet_classifier: train-classifier on images
EMBEDDINGS = {
    e.name: e for e in (SinusoidalEmbedding, FourierEmbedding, TableEmbedding)
}  # a net spec's "time_embedding"
PREDICTIONS = {p.name: p for p in ALL_PREDICTIONS}  # eps, x0, v, score, flow
# "sigma2": NCSN's lambda(sigma) = sigma^2 on the score error is the snr weight in x0 units
WEIGHTINGS = {"simple": SIMPLE, "elbo": ELBO, "likelihood": LIKELIHOOD, "snr": SNR, "sigma2": SNR, "min_snr": MIN_SNR}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# grid name -> grid(process, steps); INFO.grid names one of them, the sampler's usual grid
GRID_FUNCTIONS = {
    "t": grid_t,
    "lam": grid_lam,
    "karras": grid_karras,
    "quadratic": grid_quadratic,
    "discrete": grid_discrete,
    "optimized": grid_optimized,  # stored, optimized offline; run with final_denoise=False (core.optimized_grid)
}
GRIDS = ("auto", *GRID_FUNCTIONS, "fit")  # "auto": the sampler's own (INFO.grid); "fit": grid_fit.fit_grid
SCHEDULES = {"linear": beta_linear, "cosine": beta_cosine, "sigmoid": beta_sigmoid, "quadratic": beta_quadratic}


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
    "dpmpp_2s_ancestral": SamplerInfo(
        sample_dpm_solver_pp_2s_ancestral, "weak 1", "2", "Lu et al. 2023, Algorithm 1 (2S) + ancestral noise", True
    ),
    "unipc_2": SamplerInfo(_bind(sample_unipc, order=2), "3", "1", "Zhao et al. 2023, UniP-2 + UniC (bh2)", False),
    "unipc_3": SamplerInfo(DEFAULT_SAMPLER, "4", "1", "Zhao et al. 2023, UniP-3 + UniC (bh2)", False),
    "optimized": SamplerInfo(  # order: UniPC-3's off the stored grids; on them, weights fitted to error, not order
        sample_optimized,
        "4 off grid",
        "1",
        "UniPC-3; weights optimized offline with the stored 5-step grid",
        False,
        "optimized",
    ),  # fmt: skip
}

SAMPLERS: dict[str, Callable] = {name: info.fn for name, info in INFO.items()}
DEFAULT_SAMPLER_NAME = next(name for name, info in INFO.items() if info.fn is DEFAULT_SAMPLER)


@dataclass(frozen=True)
class InverseInfo:
    """A posterior sampler of ``inverse/`` and what it assumes (each also refuses what it cannot do itself)."""

    fn: Callable
    paper: str
    noiseless: bool  # only sigma_y = 0 (exact data consistency)
    masks: bool  # only inpainting masks (Mask, Outpaint)
    gradient: bool  # backpropagates through the denoiser at every step
    budget: Callable[[int], dict] | None = None  # nfe -> {"steps", ...knobs}; None: steps = nfe - 1

    def knobs(self, nfe: int) -> dict:
        """``{"steps": ..., **knobs}`` whose denoiser calls (per sample, final denoise included) fit ``nfe``."""
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 2:
            raise ValueError(f"the budget must be an int >= 2 denoiser calls (a step and the last), got {nfe!r}")
        return dict(self.budget(nfe)) if self.budget is not None else {"steps": nfe - 1}


INVERSE: dict[str, InverseInfo] = {
    "projection": InverseInfo(sample_projection, "Song et al. 2021 (replacement / projection)", True, False, False),
    "ddnm": InverseInfo(sample_ddnm, "Wang et al. 2023 (range-null space)", True, False, False),
    "ddrm": InverseInfo(sample_ddrm, "Kawar et al. 2022 (spectral DDIM)", False, False, False),
    "dps": InverseInfo(sample_dps, "Chung et al. 2023 (diffusion posterior sampling)", False, False, True),
    "pigdm": InverseInfo(sample_pigdm, "Song et al. 2023 (pseudo-inverse guidance)", False, False, True),
    "mmps": InverseInfo(sample_mmps, "Rozet et al. 2024 (moment matching posterior sampling)", False, False, True),
    "repaint": InverseInfo(sample_repaint, "Lugmayr et al. 2022 (resampling jumps)", True, True, False, repaint_budget),
    "smc": InverseInfo(
        sample_smc, "Wu et al. 2023 (twisted diffusion sampler, exact as P grows)", False, False, True, smc_budget
    ),  # fmt: skip
}


PROCESSES = {
    "vp": VP,
    "subvp": SubVP,
    "ve": VE,
    "cosine": Cosine,
    "edm": EDM,
    "flow": Flow,
    "ddpm": lambda schedule="linear", T=1000, betas=None: _ddpm(schedule, T, betas),
}


def _ddpm(schedule: str, T: int, betas) -> Discrete:
    """DDPM with a named beta schedule of T steps, or with its ``betas`` listed (a diffusers scheduler's
    ``trained_betas`` or non-default beta range, ``interop.diffusers``)."""
    if betas is not None:
        return Discrete(torch.as_tensor(betas, dtype=torch.float64))
    return Discrete.from_schedule(_pick("beta schedule", SCHEDULES, schedule), T)


def _pick(kind: str, table: dict, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    return table[name]


def build_process(spec: dict[str, Any] | str):
    """A NoiseProcess from ``"vp"`` or ``{"name": "ddpm", "schedule": "cosine", "T": 1000}``."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    cls = _pick("process", PROCESSES, spec.pop("name"))
    try:
        return cls(**spec)
    except TypeError as e:
        raise ValueError(f"bad options for process: {e}") from None


def build_net(spec: dict[str, Any]):
    """A network from ``{"name": "mlp", "dim": 2, "width": 256, ...}``."""
    spec = dict(spec)
    cls = _pick("network", NETS, spec.pop("name"))
    if "time_embedding" in spec:
        spec["time_embedding"] = _pick("time_embedding", EMBEDDINGS, spec["time_embedding"])
    try:
        return cls(**spec)
    except TypeError as e:
        raise ValueError(f"bad options for network: {e}") from None


def get_sampler(name: str):
    """A sampler function by name (see ``torchdiffusion.samplers.SAMPLERS``)."""
    return _pick("sampler", SAMPLERS, name)


def get_inverse(name: str) -> InverseInfo:
    """A posterior sampler's entry by name (see ``INVERSE``)."""
    return _pick("posterior sampler", INVERSE, name)


def get_prediction(name: str):
    """The prediction target named ``name`` ("eps", "x0", "v", "score", "flow")."""
    return _pick("prediction target", PREDICTIONS, name)


def get_weighting(name: str):
    """The loss weighting named ``name`` (see ``torchdiffusion.objectives.weightings``)."""
    return _pick("weighting", WEIGHTINGS, name)
