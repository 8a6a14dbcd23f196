"""The run's configuration: ``TrainConfig``, every field that determines a training run, JSON- and YAML-able.

Its names (process, net, target, weighting, precision) become objects through ``torchdiffusion.names``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..names import PRECISIONS, PREDICTIONS, WEIGHTINGS
from .objective import OBJECTIVES, check_distill_options

SCHEDULES = ("cosine", "constant")


_META_KEYS = ("step", "format_version")  # added to config.json by checkpoints, not config fields


_MAY_CHANGE_ON_RESUME = ("steps", "device", "tensorboard", "sample_every", "sample_count")


def _spec(**kw) -> Any:
    return field(default_factory=lambda: dict(kw))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; JSON-able via ``to_dict`` / ``from_dict``, or ``from_yaml``."""

    data: str = "moons"  # 2-D set name, .npy / .csv path, or images: name in data.IMAGE_DATASETS, folder, .npz, IDX
    n_data: int = 20000  # points drawn for a built-in 2-D set (files and images: all rows)
    data_options: dict = _spec()  # keyword arguments of data.load_images, e.g. {pad_to: 16}, {split: train}
    flip: bool = False  # random left-right flips of image batches (from the training generator)
    class_conditional: bool = False  # pass labels to the net as class_labels; the net gets num_classes
    label_dropout: float = 0.0  # share of labels replaced by the null class (classifier-free guidance needs > 0)
    process: dict = _spec(name="vp")  # noise-process spec for names.build_process
    target: str | None = None  # network output: eps, x0, v, score or flow; None: eps, v for super-resolution
    weighting: str = "simple"  # loss weighting, a name of names.WEIGHTINGS
    net: dict = _spec(name="mlp", width=256, depth=4)  # network spec; dim / in_channels, image_size from the data
    steps: int = 4000  # total optimizer steps
    batch_size: int = 512  # examples per micro-batch per process; global batch = batch_size * grad_accum * world
    grad_accum: int = 1  # micro-batches whose gradients add up to one optimizer step
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup: int = 200  # linear LR warm-up steps (Goyal et al. 2017)
    lr_schedule: str = "cosine"  # after warm-up: "cosine" (to 0) or "constant"
    grad_clip: float | None = 1.0  # max global grad norm; None or 0: no clipping
    ema_decay: float = 0.999  # EMA decay per step; 0: EMA equals the net
    # "auto", "fp32", "bf16" (autocast, CPU or CUDA) or "fp16" (autocast + GradScaler, CUDA). "auto": bf16 for the U-Net
    # on CUDA with bf16 or on a CPU with AMX-BF16, else fp32 (distributed.resolve_precision): where measured
    # 1.3-2x the images per second at the same held-out loss per step (README, "U-Net speed"). A run's
    # checkpoint records the precision it resolved to, so a resume keeps it on any machine.
    precision: str = "auto"
    seed: int = 0  # seeds data, init, batch order and noise
    checkpoint_every: int = 1000  # steps between checkpoints (one more at the end)
    log_every: int = 50  # steps between rows of log.csv
    sample_every: int = 0  # steps between sample grids (image data; one more at the end); 0: none
    sample_count: int = 64  # images per sample grid
    tensorboard: bool = False  # also log to run_dir/tensorboard (needs the tensorboard package)
    sigma_data: float | None = None  # data std for preconditioning; None: estimated
    precondition_output: bool | None = None  # Preconditioned(predicts=target): EDM's c_out; None: yes but for eps
    data_box: list | None = None  # [low, high] of the training data (support.data_box); None: measured
    objective: str = "denoising"  # denoising, consistency (no teacher), consistency_distillation, progressive, reflow
    teacher: str | None = None  # the teacher's run directory (distillations); a label when given in Python
    init: str | None = None  # a run directory whose EMA weights start the network (a student from its teacher)
    distill: dict = _spec()  # the objective's options: recipe, t_min, solver (consistency); steps, form (progressive)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"; under torchrun "cuda" means cuda:LOCAL_RANK
    autoencoder: str | None = None  # a train-autoencoder run: diffusion on its scaled latents (Rombach et al. 2022)
    super_resolution: int = 0  # > 1: a super-resolution model of the images given their f x f average-pooled version
    low_res_noise: float = 0.2  # the largest std of the low-res input's Gaussian augmentation (Ho et al. 2022, 4.2)

    def __post_init__(self):
        if isinstance(self.process, str):  # convenience: "vp" means {"name": "vp"}
            object.__setattr__(self, "process", {"name": self.process})
        if self.target is None:
            # A super-resolution model's x0 is nearly known from its low-res input at every noise level, but from eps
            # it is x0 = (x - sigma eps) / alpha, whose error grows as 1 / alpha near the noise end: on digits 8 -> 16
            # (400 steps) eps gave x0 errors of 0.7-1.3 at t >= 0.8 and samples off their inputs (residual 0.28), v
            # errors of 0.002 (residual 0.045). Imagen Video's cascade uses v too (Ho et al. 2022b, "Imagen Video").
            object.__setattr__(self, "target", "v" if self.super_resolution else "eps")
        if self.precondition_output is None:  # eps: c_out = 1, nothing to do; a checkpoint without it: none
            object.__setattr__(self, "precondition_output", self.target != "eps")
        if isinstance(self.data, os.PathLike):  # keep the config JSON-able
            object.__setattr__(self, "data", os.fspath(self.data))
        if isinstance(self.autoencoder, os.PathLike):
            object.__setattr__(self, "autoencoder", os.fspath(self.autoencoder))
        checks = {
            "process": isinstance(self.process, dict) and "name" in self.process,
            "net": isinstance(self.net, dict) and "name" in self.net,
            "data_options": isinstance(self.data_options, dict),
            "objective": self.objective in OBJECTIVES,
            "distill": isinstance(self.distill, dict),
            "teacher": self.teacher is None or isinstance(self.teacher, str),
            "init": self.init is None or isinstance(self.init, str),
            "target": self.target in PREDICTIONS,
            "weighting": self.weighting in WEIGHTINGS,
            "lr_schedule": self.lr_schedule in SCHEDULES,
            "precision": self.precision in PRECISIONS or self.precision == "auto",
            "n_data": self.n_data >= 2,
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup": self.warmup >= 0,
            "grad_clip": self.grad_clip is None or self.grad_clip >= 0,
            "ema_decay": 0 <= self.ema_decay <= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "log_every": self.log_every >= 1,
            "sample_every": self.sample_every >= 0,
            "sample_count": self.sample_count >= 1,
            "sigma_data": self.sigma_data is None or self.sigma_data > 0,
            "precondition_output": isinstance(self.precondition_output, bool),
            "autoencoder": self.autoencoder is None or isinstance(self.autoencoder, str),
            "super_resolution": isinstance(self.super_resolution, int) and self.super_resolution in (0, 2, 4, 8, 16),
            "low_res_noise": isinstance(self.low_res_noise, int | float) and self.low_res_noise >= 0,
            "label_dropout": isinstance(self.label_dropout, int | float) and 0 <= self.label_dropout < 1,
            "data_box": self.data_box is None or (isinstance(self.data_box, list | tuple) and len(self.data_box) == 2),
            **{k: isinstance(getattr(self, k), bool) for k in ("flip", "class_conditional", "tensorboard")},
        }
        bad = [k for k, ok in checks.items() if not ok]
        if not bad and self.label_dropout > 0 and not self.class_conditional:
            raise ValueError(
                f"label_dropout={self.label_dropout} replaces class labels by the null class, but the run is not "
                "class-conditional: set class_conditional=True, or label_dropout=0"
            )
        if bad:
            hint = f" (objectives: {', '.join(OBJECTIVES)})" if "objective" in bad else ""
            hint += f" (precisions: auto, {', '.join(PRECISIONS)})" if "precision" in bad else ""
            raise ValueError(
                f"invalid TrainConfig value(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}{hint}"
            )
        check_distill_options(self.objective, self.distill)
        if self.super_resolution and self.autoencoder is not None:
            raise ValueError("super_resolution works on pixels; a latent model (autoencoder) cannot also be one")
        if self.super_resolution and self.objective != "denoising":
            raise ValueError(f"a super-resolution model trains with objective 'denoising', not {self.objective!r}")
        if self.objective == "progressive" and self.target in ("eps", "score"):
            raise ValueError(
                f"progressive distillation needs a student that predicts x0, v or flow, not {self.target!r}: at few "
                "steps x0 = (x - sigma eps) / alpha amplifies eps's error by 1 / alpha near the noise end (Salimans & "
                "Ho 2022, Sec. 4); set target='v' (distill() does this for an eps teacher)"
            )

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "") -> TrainConfig:
        """Inverse of ``to_dict``; also accepts a checkpoint's config.json (ignores step, format_version)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - set(_META_KEYS))
        if unknown:
            raise ValueError(f"{source}unknown TrainConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        """A config from a YAML mapping of fields (see configs/), then ``overrides``.

        Override keys may be dotted to change one entry of a spec: ``**{"net.channels": 64}``. Numbers
        written as strings (YAML 1.1 reads ``2e-4`` as a string) are converted for number fields.
        """
        import yaml  # PyYAML

        with open(path, encoding="utf-8") as fh:
            try:
                # safe_load builds only plain data: a tag such as !!python/object/apply would call Python code.
                d = yaml.safe_load(fh) or {}
            except yaml.constructor.ConstructorError as e:  # an unknown or Python tag, refused before any call
                mark = e.problem_mark
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
                raise ValueError(
                    f"{path}{where}: refusing a YAML tag: {e.problem}; a config holds plain YAML data only "
                    "(mappings, lists, strings, numbers, booleans), and tags that build Python objects are never run"
                ) from None
            except yaml.YAMLError as e:  # its message names the line and column
                raise ValueError(f"{path}: not valid YAML: {e}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not a YAML config: not UTF-8 text ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(d).__name__}")
        d = merge_overrides(d, overrides)
        for f in fields(cls):
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0])
            if kind is not None and isinstance(d.get(f.name), str):
                try:
                    d[f.name] = kind(d[f.name])
                except ValueError:
                    raise ValueError(f"{path}: {f.name}={d[f.name]!r} is not a number") from None
        return cls.from_dict(d, source=f"{path}: ")


def config_diff(stored: dict, given: dict) -> list[str]:
    defaults = TrainConfig().to_dict()  # a checkpoint written before a field existed has its default
    keys = (set(stored) | set(given)) - {*_MAY_CHANGE_ON_RESUME, *_META_KEYS}
    if "data_box" not in stored:  # written before the box was recorded: it is measured now, not a change
        keys.discard("data_box")
    return sorted(k for k in keys if stored.get(k, defaults.get(k)) != given.get(k))


def merge_overrides(d: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``d`` with ``overrides`` applied; a dotted key changes one entry of a spec (``net.channels``)."""
    d = copy.deepcopy(d)
    for key, value in overrides.items():
        head, _, sub = key.partition(".")
        if sub and head in ("net", "process", "data_options"):
            d[head] = {**(d.get(head) or {}), sub: value}
        else:
            d[key] = value
    return d
