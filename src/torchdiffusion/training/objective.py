"""What one training step minimises, by the run's ``objective``: the denoising loss, or a distillation.

``TrainingObjective(cfg, process, teacher, ema_net)`` gives the training loop three things: ``wrap`` (the model
the loss calls around the raw network: ``Preconditioned``, or ``ConsistencyModel``), ``uses_uniforms`` (whether
each example draws one more uniform number, from the run's generator, to pick its pair of times) and ``loss``.

- "denoising": ``objectives.denoising_loss`` (Ho et al. 2020).
- "progressive": ``objectives.distillation.progressive_loss`` on the student grid of ``distill.steps`` steps, the
  teacher walking the refined grid of twice as many (Salimans & Ho 2022).
- "consistency" (training, no teacher) and "consistency_distillation": ``objectives.consistency.consistency_loss``
  with the recipe ``distill.recipe`` ("cm": Song et al. 2023; "ict": Song & Dhariwal 2023). The target network is
  an EMA of the network with the recipe's own decay (cm; ``target_decay``, checkpointed with the run) or the
  network itself without gradient (ict); both sample with the run's EMA weights.
- "reflow": the flow-matching loss on (noise, teacher sample) pairs (Liu et al. 2023, Eq. 6): the run's data are
  the teacher's samples and ``distill.noise`` the noise each started from.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.consistency import ConsistencyModel
from ..core.denoiser import Preconditioned, as_denoiser
from ..core.timesteps import grid_t
from ..names import get_prediction, get_weighting
from ..objectives import consistency, denoising, distillation
from ..objectives.teacher import SOLVERS
from ..samplers.consistency import consistency_times, sample_consistency
from ..samplers.ddim import sample_ddim
from ..samplers.ode import sample_euler
from .ema import ema_update

__all__ = ["OBJECTIVES", "DISTILLATIONS", "TrainingObjective", "is_consistency", "consistency_t_min", "model_of"]
__all__ += ["kind_sampler", "check_distill_options"]

OBJECTIVES = ("denoising", "consistency", "consistency_distillation", "progressive", "reflow")
DISTILLATIONS = ("consistency_distillation", "progressive", "reflow")  # the objectives that need a teacher
CD_LEVELS = 18  # consistency distillation's fixed N in the cm recipe (Song et al. 2023, Appendix C, CIFAR-10)
_DISTILL_KEYS = {
    "consistency": ("recipe", "t_min"),
    "consistency_distillation": ("recipe", "t_min", "solver", "levels"),
    "progressive": ("steps", "form"),
    "reflow": ("noise", "round"),
    "denoising": (),
}


def is_consistency(objective: str) -> bool:
    """Whether a model of this objective is a consistency function (sampled by ``sample_consistency``)."""
    return objective in ("consistency", "consistency_distillation")


def consistency_t_min(config: dict[str, Any], process) -> float:
    """The boundary time of a consistency run: ``distill.t_min``, else the process's t_min."""
    return float((config.get("distill") or {}).get("t_min", process.t_min))


def check_distill_options(objective: str, options: dict[str, Any]) -> None:
    """Raise a ValueError naming unknown or invalid ``distill`` options of ``objective``."""
    valid = _DISTILL_KEYS[objective]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"distill options {unknown} do not apply to objective {objective!r}; valid: {list(valid)}")
    if "recipe" in options and options["recipe"] not in consistency.RECIPES:
        raise ValueError(f"unknown consistency recipe {options['recipe']!r}; choose one of {list(consistency.RECIPES)}")
    if "solver" in options and options["solver"] not in SOLVERS:
        raise ValueError(f"unknown teacher solver {options['solver']!r}; choose one of {list(SOLVERS)}")
    if "form" in options and options["form"] not in distillation.FORMS:
        raise ValueError(f"unknown progressive form {options['form']!r}; choose one of {list(distillation.FORMS)}")
    if "steps" in options:
        n = options["steps"]
        if not isinstance(n, int) or n < 1 or n & (n - 1):
            raise ValueError(f"distill.steps is the student's number of steps, a power of 2; got {n!r}")
    if "levels" in options and not (isinstance(options["levels"], int) and options["levels"] >= 2):
        raise ValueError(
            f"distill.levels is the number of noise levels (>= 2) of the discretization; got {options['levels']!r}"
        )
    if "t_min" in options and not isinstance(options["t_min"], int | float):
        raise ValueError(f"distill.t_min is the consistency boundary time, a number; got {options['t_min']!r}")
    if objective == "progressive" and "steps" not in options:
        raise ValueError("objective 'progressive' needs distill.steps, the student's number of steps")
    if objective == "reflow" and "noise" not in options:
        raise ValueError("objective 'reflow' needs distill.noise, the file of the noise each teacher sample came from")


class TrainingObjective:
    """The loss of a run (see the module docstring); ``teacher`` a denoiser for the distillations, else None."""

    def __init__(self, cfg, process, teacher=None, net: nn.Module | None = None, n_data: int | None = None):
        self.cfg, self.process, self.teacher, self.kind = cfg, process, teacher, cfg.objective
        self.options = dict(cfg.distill or {})
        if self.kind in DISTILLATIONS and self.kind != "reflow" and teacher is None:
            raise ValueError(f"objective {self.kind!r} needs a teacher (a run directory, or a denoiser in Python)")
        self.target, self.weighting = get_prediction(cfg.target), get_weighting(cfg.weighting)
        self.out = self.target if cfg.precondition_output else None
        self.recipe = consistency.RECIPES[self.options.get("recipe", "ict")] if is_consistency(self.kind) else None
        self.t_min = float(self.options.get("t_min", process.t_min))
        if self.recipe is not None and not process.t_min <= self.t_min < process.t_max:
            raise ValueError(
                f"distill.t_min={self.t_min} must lie in [t_min, t_max) = [{process.t_min}, {process.t_max}) "
                f"of {process!r}"
            )
        if process.discrete and self.kind in ("consistency", "consistency_distillation", "progressive"):
            raise ValueError(
                f"objective {self.kind!r} evaluates the model between the integer times of {process!r}, where a "
                "discrete-time model was never trained: distil a continuous-time model (vp, cosine, edm, flow)"
            )
        self.ema_target = self.target_net = None
        if self.recipe is not None and self.recipe.ema_target:  # theta^- <- theta at the start (Algorithms 2, 3)
            if net is None:
                raise ValueError("the 'cm' recipe's target is an EMA of the network; pass net")
            self.target_net = copy.deepcopy(net).requires_grad_(False)
            self.ema_target = self._consistency(self.target_net)
        self._levels: dict[int, tuple[Tensor, Tensor]] = {}
        self.noise = None
        if self.kind == "reflow":
            self.noise = torch.from_numpy(np.load(Path(self.options["noise"]), allow_pickle=False)).float()
            if n_data is not None and len(self.noise) != n_data:
                raise ValueError(
                    f"reflow: {self.options['noise']} holds {len(self.noise)} noise draws for {n_data} teacher samples"
                )
        if self.kind == "progressive":
            self.teacher_grid = distillation.halving_grid(process, 2 * int(self.options["steps"]))

    def target_decay(self, step: int) -> float:
        """mu of the cm recipe's target network: distillation 0.95; training mu(k) = exp(s0 log mu0 / N(k)), mu0 =
        0.9, s0 = 2 (Song et al. 2023, Appendix C). It is separate from the EMA the run samples with."""
        if self.kind == "consistency_distillation":
            return 0.95
        return math.exp(self.recipe.s0 * math.log(0.9) / self.recipe.levels_at(step, self.cfg.steps))

    def after_step(self, net: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (0-based): move the cm recipe's target network towards ``net``."""
        if self.target_net is not None:
            ema_update(self.target_net, net, self.target_decay(step))

    def state_dict(self) -> dict[str, Any]:
        return {"target_net": self.target_net.state_dict()} if self.target_net is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.target_net is not None:
            self.target_net.load_state_dict(state["target_net"])

    @property
    def uses_uniforms(self) -> bool:
        return self.kind in ("consistency", "consistency_distillation", "progressive")

    def _consistency(self, inner: nn.Module) -> ConsistencyModel:
        return ConsistencyModel(inner, self.process, self.cfg.sigma_data, self.t_min)

    def wrap(self, inner: nn.Module) -> nn.Module:
        """The model the loss calls, around the raw network (or its DDP / autocast wrapper)."""
        if self.recipe is not None:
            return self._consistency(inner)
        return Preconditioned(inner, self.process, self.cfg.sigma_data, self.out)

    def _pairs(self, step: int) -> tuple[Tensor, Tensor]:
        """The levels and pair probabilities at this step: ``distill.levels`` fixed levels if given (consistency
        distillation with the cm recipe: Song et al. 2023's N = 18, Appendix C), else the recipe's curriculum
        over ``cfg.steps`` (a resume with more steps stretches the rest of it, as it does the learning rate)."""
        n = self.options.get("levels")
        if n is None and self.kind == "consistency_distillation" and self.recipe is consistency.CM:
            n = CD_LEVELS
        n = n or self.recipe.levels_at(step, self.cfg.steps)
        if n not in self._levels:
            levels = consistency.consistency_levels(self.process, n, t_min=self.t_min)
            self._levels[n] = (levels, self.recipe.pair_probs(self.process, levels))
        return self._levels[n]

    def loss(self, model, x0: Tensor, *, t: Tensor, noise: Tensor, u: Tensor | None, idx: Tensor, step: int, **cond):
        """Per-example loss (B,) of one micro-batch; ``u`` the batch's extra uniforms, ``idx`` its example indices."""
        sigma_data = self.cfg.sigma_data if self.out is not None else None
        if self.kind == "denoising":
            return denoising.denoising_loss(
                model, self.process, x0, target=self.target, weighting=self.weighting, t=t, noise=noise,
                sigma_data=sigma_data, **cond,
            )  # fmt: skip
        if self.kind == "reflow":
            z = self.noise[idx.cpu()].to(x0)  # one micro-batch's rows, not the whole table, to the device
            return denoising.denoising_loss(
                model, self.process, x0, target=self.target, weighting=self.weighting, t=t, noise=z,
                sigma_data=sigma_data, **cond,
            )  # fmt: skip
        if self.kind == "progressive":
            n = int(self.options["steps"])
            i = (u * n).long().clamp(max=n - 1).cpu()
            g = self.teacher_grid.to(x0.device)
            student = as_denoiser(model, self.process, self.target)
            return distillation.progressive_loss(
                student, self.teacher, self.process, x0, t=g[2 * i], t_mid=g[2 * i + 1], s=g[2 * i + 2], noise=noise,
                form=self.options.get("form", "x"), **cond,
            )  # fmt: skip
        levels, probs = self._pairs(step)
        n = consistency.draw_pairs(probs, u.cpu())
        levels = levels.to(x0.device)
        target_model = self.ema_target if self.ema_target is not None else model
        return consistency.consistency_loss(
            model, target_model, self.process, x0, t=levels[n + 1], s=levels[n], noise=noise, recipe=self.recipe,
            teacher=self.teacher if self.kind == "consistency_distillation" else None,
            solver=self.options.get("solver", "heun"), **cond,
        )  # fmt: skip


def model_of(net: nn.Module, process, config: dict[str, Any]) -> nn.Module:
    """A trained raw network as what its objective made of it: a ``ConsistencyModel`` for the consistency
    objectives, else ``as_denoiser(Preconditioned(...))`` as the denoising loss trained it."""
    sigma_data = float(config["sigma_data"])
    if is_consistency(config.get("objective", "denoising")):
        return ConsistencyModel(net, process, sigma_data, consistency_t_min(config, process))
    target = get_prediction(config["target"])
    out = target if config.get("precondition_output") is True else None  # absent: older, raw
    return as_denoiser(Preconditioned(net, process, sigma_data, out), process, target)


def kind_sampler(config: dict[str, Any], process, steps: int | None):
    """``(sampler, ts, steps)`` that a model of this run's objective samples with by default, or None for a plain
    denoiser. Consistency: ``sample_consistency`` at ``consistency_times`` (default 1 step); progressive: DDIM on the
    student's ``halving_grid`` (its own number of steps, the default); reflow: Euler on ``grid_t`` to t = 0 (default
    1 step; k steps cost k calls). A reflow model is also a denoiser that any other sampler takes."""
    objective = config.get("objective", "denoising")
    if is_consistency(objective):
        steps = 1 if steps is None else steps
        t_min = consistency_t_min(config, process)
        # The boundary travels with the sampler: a wrapper around the model (the data box's clamp) hides model.t_min.
        sampler = functools.update_wrapper(functools.partial(sample_consistency, t_min=t_min), sample_consistency)
        return sampler, consistency_times(process, steps, t_min=t_min), steps
    if objective == "progressive":
        own = int(config["distill"]["steps"])
        if steps is not None and steps != own:
            raise ValueError(
                f"this student was distilled to sample in {own} DDIM step(s) (progressive distillation), not {steps}; "
                f"sample it with steps={own}, or load its teacher ({config.get('teacher')!r}: the round with "
                f"{2 * own} steps) for more"
            )
        return sample_ddim, distillation.halving_grid(process, own), own
    if objective == "reflow":  # straight paths: Euler on uniform t, its last step landing on the data (k calls)
        steps = 1 if steps is None else steps
        return sample_euler, grid_t(process, steps, t_end=0.0), steps
    return None
