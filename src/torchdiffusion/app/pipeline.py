"""From a trained run to samples in two lines: ``pipe = td.load("runs/moons"); x0 = pipe.sample(1000)``.

``load`` reads a checkpoint once (``training.checkpoint.load_denoiser``: EMA weights, frozen, eval mode,
x0_hat clamped to the data's box) and returns a ``Pipeline``: the denoiser, the process, the config and
what training recorded about the data. ``Pipeline.sample`` is nothing but the loop a user would write:
prior noise ``process.prior_sample``, then any sampler function ``sampler(denoiser, process, x, ts, ...)``
on a time grid, batch after batch (``draw_samples``, which the command line's ``sample`` and ``evaluate``
run too, so one seed gives the same samples in Python and on the command line). Like diffusers'
pipelines, but the parts stay plain objects: ``pipe.denoiser`` and ``pipe.process`` go into any sampler,
``fit_grid`` or ``log_likelihood`` as they are.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.denoiser import AutocastDenoiser
from ..core.process import NoiseProcess
from ..guidance import classifier_free, classifier_guidance

__all__ = [
    "DEFAULT_STEPS", "IMAGE_BATCH", "Pipeline", "load", "load_model", "cascade", "LatentCodec", "latent_codec",
    "draw_samples", "example_shape",
    "default_grid",
]  # fmt: skip

DEFAULT_STEPS = 20  # few-step default, for the default sampler (UniPC-3) and other ODE solvers; DDPM wants 250+
IMAGE_BATCH = 1000  # default batch for images (points are drawn at once), as on the command line


def example_shape(config: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one example of a checkpoint's model: (D,) for points, (C, H, H) for images.

    Training records it in the net spec (``training.resolve.resolve_config``): ``dim`` for points,
    ``in_channels`` and ``image_size`` for images.
    """
    net = config["net"]
    if "dim" in net:
        return (int(net["dim"]),)
    return (int(net.get("in_channels", 1)), int(net["image_size"]), int(net["image_size"]))


def _sampler_name(fn: Callable) -> str | None:
    from ..names import INFO

    return next((name for name, info in INFO.items() if info.fn is fn), None)


def default_grid(sampler: Callable, process: NoiseProcess, steps: int) -> Tensor:
    """The time grid ``sampler`` is usually run on (``names.INFO[...].grid``, as ``torchdiffusion samplers``
    lists), with ``steps`` steps; ``grid_lam`` for a function outside that table (the default sampler's grid)."""
    from ..names import GRID_FUNCTIONS

    return GRID_FUNCTIONS[default_grid_name(sampler)](process, steps)


def default_grid_name(sampler: Callable) -> str:
    """The name of ``default_grid``'s grid for ``sampler``."""
    from ..names import INFO

    name = _sampler_name(sampler)
    return INFO[name].grid if name is not None else "lam"


def at_precision(denoiser, precision: str, device: torch.device, net: str):
    """``(denoiser, precision)``: ``denoiser`` as it samples in ``precision`` ("auto", "fp32", "bf16", "fp16"), "auto"
    resolved for the network kind ``net`` on ``device`` (``training.distributed.resolve_precision``); fp32 is the
    denoiser itself, the others its ``AutocastDenoiser`` (``Pipeline.sampling_denoiser``, ``evaluate``)."""
    from ..names import PRECISIONS
    from ..training.distributed import resolve_precision

    precision = resolve_precision(precision, device, net)
    if precision == "fp32":
        return denoiser, precision
    return AutocastDenoiser(denoiser, device.type, PRECISIONS[precision]), precision


def draw_samples(
    sampler: Callable,
    denoiser,
    process: NoiseProcess,
    shape: tuple[int, ...],
    n: int,
    ts: Tensor,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    labels: Tensor | None = None,
    conditions: dict[str, Tensor] | None = None,
    progress: bool = False,
    desc: str | None = None,
    callback: Callable | None = None,
    watch_first: Callable | None = None,
    **options,
) -> Tensor:
    """``n`` samples of ``shape`` (on the CPU), in batches of ``batch_size`` (default: all at once).

    Each batch draws its prior noise x_T ~ N(0, sigma(t_max)^2 I) and then runs
    ``sampler(denoiser, process, x_T, ts, generator=generator, callback=..., **options, class_labels=...)``,
    both from ``generator``: one seed and one batch size always give the same samples. Another batch size
    consumes the stream in another order and gives other, equally valid, samples; the first batch is
    always the single draw of its size. ``labels`` (n,) are sliced with the batches and passed as
    ``class_labels``; so is each tensor of ``conditions`` (n, ...) under its own name (a super-resolution model's
    ``low_res`` and ``aug_level``). Each batch moves to the CPU when done, so ``device`` holds one batch at a time.
    ``progress`` shows one tqdm bar over every batch's steps; ``callback`` gets every step's info dict;
    ``watch_first(x_T)``, if given, returns an extra callback for the first batch (the command line's
    ``--figure`` records that batch's reverse process).
    """
    from ..samplers import progress_callback, sample_annealed_langevin
    from ..samplers.consistency import sample_consistency

    batch_size = n if batch_size is None else batch_size
    fn = getattr(sampler, "func", sampler)
    every_time = fn is sample_annealed_langevin or fn is sample_consistency  # report every time of ts, not steps
    per_batch = len(ts) if every_time else len(ts) - 1
    starts = range(0, n, batch_size)
    desc = desc or f"{_sampler_name(sampler) or getattr(sampler, '__name__', 'sampler')} ({n} samples)"
    tick, bar = progress_callback(per_batch * len(starts), desc, disable=not progress)
    out = []
    try:
        for start in starts:
            b = min(batch_size, n - start)
            x = process.prior_sample((b, *shape), generator=generator, device=device)
            cond = {"class_labels": labels[start : start + b].to(device)} if labels is not None else {}
            cond.update({k: v[start : start + b].to(device) for k, v in (conditions or {}).items()})
            calls = [tick, callback, watch_first(x) if watch_first is not None and start == 0 else None]
            calls = [c for c in calls if c is not None]
            cb = calls[0] if len(calls) == 1 else (lambda info, calls=calls: [c(info) for c in calls])
            with torch.no_grad():
                out.append(sampler(denoiser, process, x, ts, generator=generator, callback=cb, **options, **cond).cpu())
    finally:
        bar.close()
    return torch.cat(out)


def _count(name: str, value, what: str) -> int:
    """``value`` as an int >= 1, or a ValueError naming ``name`` and what it counts."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer ({what}), got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer ({what}), got {value}")
    return value


@dataclass(frozen=True, repr=False, eq=False)
class Pipeline:
    """A trained model, ready to sample: what ``load(run_dir)`` returns.

    Attributes:
        denoiser: ``x0_hat = denoiser(x, t, **cond)``, the network preconditioned and converted from its
            target as in training (``as_denoiser(Preconditioned(net, process, sigma_data), process, target)``),
            frozen, in eval mode, with x0_hat clamped to ``data_box`` when loaded with ``clip=True``.
        process: the ``NoiseProcess`` it was trained on.
        config: the resolved training config (``config.json``: process, net, target, sigma_data, data_box,
            step, ...).
        shape: one example's shape: (D,) for points, (C, H, W) for images (from the net spec).
        sigma_data: the standard deviation of the training data (over all coordinates), which scales the
            network's input and output to unit variance (Karras et al. 2022, Sec. 5, c_in / c_skip / c_out).
        data_box: ``(low, high)``, the training data's bounding box (per coordinate for points, one pixel
            range for images; ``core.support``), which the denoiser's x0_hat is clamped to; None in
            checkpoints written before training recorded it.
        num_classes: K for a class-conditional model (labels 0..K-1), else None.
        device: where the denoiser's weights are.
        autoencoder: a latent model's ``LatentCodec`` (Rombach et al. 2022): ``shape`` is then the latents', the
            denoiser works on them, and ``sample`` decodes (``image_shape``); None for a pixel model.
    """

    denoiser: Any
    process: NoiseProcess
    config: dict[str, Any]
    shape: tuple[int, ...]
    sigma_data: float
    data_box: tuple | None
    num_classes: int | None
    device: torch.device
    autoencoder: Any = None  # a latent model's LatentCodec (decode / encode), else None

    @property
    def target(self) -> str:
        """What the network predicts ("eps", "x0", "v", "score" or "flow")."""
        return self.config["target"]

    @property
    def step(self) -> int:
        """The optimizer steps the checkpoint was trained for."""
        return int(self.config["step"])

    def guided(self, scale: float, *, interval: tuple[float, float] | None = None, rescale: float = 0.0) -> Pipeline:
        """This pipeline with classifier-free guidance of ``scale`` (Ho & Salimans 2022; ``guidance.classifier_free``,
        with its interval and rescale): ``load(run).guided(3.0).sample(n, labels=7)``. Needs a class-conditional
        model trained with label dropout (``label_dropout > 0``), whose null class is label ``num_classes``."""
        self.require_denoiser("classifier-free guidance")
        if not self.num_classes:
            raise ValueError(
                "classifier-free guidance needs a class-conditional model trained with label dropout; this one has "
                "no classes: train with class_conditional=True, label_dropout=0.1 on labeled data"
            )
        if not self.config.get("label_dropout", 0.0) > 0:
            raise ValueError(
                "classifier-free guidance needs a model trained with label dropout (its null class is the "
                "unconditional model); this run had label_dropout=0: train with label_dropout=0.1 "
                "(--set label_dropout=0.1)"
            )
        den = classifier_free(self.denoiser, scale, null_label=self.num_classes, interval=interval, rescale=rescale)
        return replace(self, denoiser=den)

    def classifier_guided(self, classifier, scale: float = 1.0) -> Pipeline:
        """This (unconditional) pipeline steered by a noise-conditional classifier (Dhariwal & Nichol 2021;
        ``guidance.classifier_guidance``): ``load(run).classifier_guided(load_classifier(clf), 2.0).sample(n,
        labels=3)``; the labels are the classifier's classes, its ``num_classes`` is the pipeline's."""
        self.require_denoiser("classifier guidance")
        if self.num_classes:
            raise ValueError("classifier guidance steers an unconditional model; this one is class-conditional: "
                             "use guided() (classifier-free guidance)")  # fmt: skip
        if repr(classifier.process) != repr(self.process):
            raise ValueError(f"the classifier was trained on {classifier.process!r}, the model on {self.process!r}")
        den = classifier_guidance(self.denoiser, self.process, classifier.log_prob, scale)
        return replace(self, denoiser=den, num_classes=int(classifier.config["num_classes"]))

    def sampling_denoiser(self, precision: str = "auto"):
        """``(denoiser, precision)``: the denoiser to sample with, and the precision it runs in.

        "fp32" is ``self.denoiser``; "bf16" / "fp16" wrap it in ``AutocastDenoiser`` (the network under
        ``torch.autocast``, its output back in float32); "auto" is bf16 for a U-Net where bf16 autocast was measured
        to outrun float32 (a CPU with AMX-BF16, a CUDA GPU with bf16: ``training.distributed.resolve_precision``),
        else fp32. On the digits U-Net bf16 sampled faster at the same FID (README, "U-Net speed"); samples then
        differ from float32's by about bf16's rounding (mean |dx| ~ 5e-3 for pixels in [-1, 1]), which depends on
        the CPU: ask for "fp32" to reproduce float32 samples.
        """
        return at_precision(self.denoiser, precision, self.device, self.config["net"].get("name", ""))

    def __repr__(self) -> str:
        classes = f", num_classes={self.num_classes}" if self.num_classes else ""
        return (
            f"Pipeline({self.process!r}, target={self.target!r}, shape={self.shape}{classes}, step={self.step}, "
            f"sigma_data={self.sigma_data:.4g}, device={str(self.device)!r})"
        )

    def _labels(self, n: int, labels=None) -> Tensor | None:
        """``(n,)`` class labels, or None for an unconditional model.

        ``labels``: None (a class-conditional model gets i mod K, every class evenly, as on the command
        line: its "unconditional" label K was never trained), one int (every sample), or n ints.
        """
        if not self.num_classes:
            if labels is not None:
                raise ValueError(
                    "labels given, but this model is not class-conditional (trained without labels, "
                    "class_conditional: false); drop labels"
                )
            return None
        k = self.num_classes
        if labels is None:
            return torch.arange(n) % k
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels = torch.full((n,), labels)
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or len(labels) != n or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be one int or {n} integers (one per sample), got {labels.dtype} of shape "
                f"{tuple(labels.shape)}"
            )
        bad = labels[(labels < 0) | (labels >= k)]
        if len(bad):
            raise ValueError(f"label {int(bad[0])} is out of range: this model knows classes 0..{k - 1}")
        return labels.long()

    def sample(
        self,
        n: int,
        *,
        sampler: Callable | str | None = None,
        steps: int | None = None,
        grid: Tensor | Sequence[float] | str | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        labels=None,
        final_denoise: bool | None = None,
        callback: Callable | None = None,
        low_res: Tensor | None = None,
        aug_level: float = 0.0,
        decode: bool = True,
        precision: str = "auto",
        **options,
    ) -> Tensor:
        """``n`` samples, a CPU tensor of shape ``(n, *self.shape)`` with no autograd graph.

        Args:
            n: how many.
            sampler: a sampler function or its name in ``names.SAMPLERS`` ("ddpm", "heun", "dpmpp_2m", ...;
                ``torchdiffusion samplers`` lists them). Default, with no grid either: ``sample_optimized`` on
                ``grid_optimized`` (a solver and grids optimized offline for few steps, no final denoise;
                ``core.optimized_grid``); on any other grid ``sample_optimized`` is UniPC-3
                (``samplers.DEFAULT_SAMPLER``).
            steps: steps of the grid (default ``DEFAULT_STEPS`` = 20, for few-step ODE solvers; stochastic
                samplers such as DDPM want hundreds). Not with a grid of times.
            grid: decreasing times (e.g. ``fit_grid(...).ts``), or a grid name in ``names.GRID_FUNCTIONS``;
                default: ``grid_optimized`` for the default sampler, else the sampler's usual grid
                (``names.INFO[...].grid``; ``grid_lam`` for functions outside that table).
            generator: the source of every random number (prior noise, then the sampler's noise), on
                ``self.device``; None uses torch's global RNG.
            batch_size: samples drawn at once (default: all of them for points, 1000 for images). One seed
                and batch size always give the same samples; another batch size gives other, equally valid
                ones (``draw_samples``).
            progress: a tqdm bar over all steps.
            labels: class-conditional models only: one int or n ints (default: i mod K, every class).
            final_denoise: end with x0_hat at the last time (the samplers' policy at the data end); default:
                yes, except on the optimized grid, which was fitted without it (``optimized_grid.FINAL_DENOISE``).
            callback: called with every step's info dict (``i``, ``t``, ``x``, ``x0_hat``, ``nfe``).
            low_res: super-resolution models only: the n (or 1) low-resolution images to upsample, (n, C, h, w)
                with h = H / ``super_resolution`` (a base model's samples: ``cascade``).
            decode: latent models only: return images (the decoded latents, the default) or the latents.
            precision: the network's arithmetic, "fp32", "bf16" or "fp16" (``torch.autocast``; the sampler's own stays
                float32), or "auto": bf16 for a U-Net on a CPU with AMX-BF16 or a CUDA GPU with bf16, else fp32
                (``sampling_denoiser``).
            aug_level: super-resolution models only: the augmentation noise level the model is told its low-res
                input carries (Ho et al. 2022, Sec. 4.2); 0 (the default) adds none, > 0 adds that much noise.
            **options: the sampler's own options (``eta`` for ``sample_ddim``, ``n_steps_each`` for "ald").
        """
        from ..core.optimized_grid import FINAL_DENOISE, grid_optimized
        from ..core.timesteps import check_grid
        from ..names import GRID_FUNCTIONS, get_sampler
        from ..samplers import sample_optimized

        n = _count("n", n, "the number of samples")
        if steps is not None:
            steps = _count("steps", steps, "of the time grid")
        # A distilled student samples with its own sampler on its own times; a reflow model, a denoiser, also with
        # any sampler it is given.
        own = self.own_sampler(steps) if (sampler is None and grid is None) or self.objective != "reflow" else None
        if own is not None:
            if sampler is not None or grid is not None:
                raise ValueError(
                    f"this is a {self.objective!r} model: it samples with its own sampler ({own[0].__name__}); "
                    "give only steps"
                )
            sampler, grid, steps = own[0], own[1], None
            if options:
                raise ValueError(f"the student's sampler ({own[0].__name__}) takes no options; got {sorted(options)}")
        elif sampler is None:  # the few-step default; on a grid other than the stored ones it is UniPC-3
            sampler, grid = sample_optimized, "optimized" if grid is None else grid
        elif isinstance(sampler, str):
            sampler = get_sampler(sampler)
        elif not callable(sampler):
            raise ValueError(f"sampler must be a sampler function or a name in names.SAMPLERS, got {sampler!r}")
        if grid is None or isinstance(grid, str):
            steps = DEFAULT_STEPS if steps is None else steps
            grid = default_grid_name(sampler) if grid is None else grid
            if grid in GRID_FUNCTIONS:
                ts = GRID_FUNCTIONS[grid](self.process, steps)
            else:
                raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(GRID_FUNCTIONS)} or give the times")
            if final_denoise is None and GRID_FUNCTIONS.get(grid) is grid_optimized:
                final_denoise = FINAL_DENOISE
        elif steps is not None:
            raise ValueError("give steps or a grid of times, not both (a grid of n + 1 times has n steps)")
        else:
            ts = check_grid(grid)
        batch_size = _count("batch_size", batch_size, "samples drawn at once") if batch_size is not None else None
        batch_size = batch_size or (IMAGE_BATCH if len(self.shape) == 3 else n)
        if "class_labels" in options:
            raise ValueError("pass class labels as labels=..., not class_labels=...")
        final_denoise = True if final_denoise is None else bool(final_denoise)
        conditions = self._low_res(n, low_res, aug_level, generator)
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(
                f"the generator is on {generator.device} but the model on {self.device}: "
                f"use torch.Generator({self.device.type!r})"
            )
        denoiser, _ = self.sampling_denoiser(precision)
        x = draw_samples(
            sampler, denoiser, self.process, self.shape, n, ts,
            batch_size=batch_size, generator=generator, device=self.device, labels=self._labels(n, labels),
            conditions=conditions, progress=progress, callback=callback, final_denoise=final_denoise, **options,
        )  # fmt: skip
        return self.autoencoder.decode(x) if self.autoencoder is not None and decode else x

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one sample as ``sample`` returns it: a latent model's decoded images, else ``shape``."""
        return self.autoencoder.image_shape if self.autoencoder is not None else self.shape

    @property
    def super_resolution(self) -> int:
        """The pooling factor f of a super-resolution model (its input is an H/f x W/f image), else 0."""
        return int(self.config.get("super_resolution", 0) or 0)

    def _low_res(self, n: int, low_res, aug_level: float, generator) -> dict[str, Tensor] | None:
        """A super-resolution model's ``low_res`` (n, C, h, w) and ``aug_level`` (n,), checked; None otherwise."""
        f = self.super_resolution
        if not f:
            if low_res is not None:
                raise ValueError("low_res given, but this is not a super-resolution model (trained without "
                                 "super_resolution)")  # fmt: skip
            return None
        C, H, W = self.shape
        if low_res is None:
            raise ValueError(f"this super-resolution model needs low_res: n (or 1) images of shape ({C}, {H // f}, "
                             f"{W // f}) to upsample x{f} (e.g. a base model's samples: td.cascade)")  # fmt: skip
        low_res = torch.as_tensor(low_res, dtype=torch.float32)
        if low_res.ndim == 3:
            low_res = low_res[None]
        if low_res.shape[1:] != (C, H // f, W // f) or len(low_res) not in (1, n):
            raise ValueError(
                f"low_res must hold n = {n} (or 1) images of shape ({C}, {H // f}, {W // f}), "
                f"got {tuple(low_res.shape)}"
            )
        if not aug_level >= 0:
            raise ValueError(f"aug_level must be >= 0, got {aug_level}")
        low_res = low_res.expand(n, -1, -1, -1)
        if aug_level > 0:  # the input carries the noise the model is told of (as in training)
            noise = torch.randn(low_res.shape, generator=generator, device=self.device).cpu()
            low_res = low_res + aug_level * noise
        return {"low_res": low_res, "aug_level": torch.full((n,), float(aug_level))}

    @property
    def objective(self) -> str:
        """What the model was trained for: "denoising", or a distillation (``training.objective.OBJECTIVES``)."""
        return self.config.get("objective", "denoising")

    def require_denoiser(self, what: str) -> None:
        """Raise a ValueError if this model is not a denoiser (x0_hat = E[x0 | x_t]), which ``what`` needs: a
        consistency model returns a sample (the end of its ODE trajectory), not a posterior mean."""
        from ..training.objective import is_consistency

        if is_consistency(self.objective):
            raise ValueError(
                f"{what} needs a denoiser, E[x0 | x_t]; this is a {self.objective!r} model, whose output is a sample "
                f"(the end of the probability-flow trajectory): use its teacher ({self.config.get('teacher')!r})"
            )

    def own_sampler(self, steps: int | None = None):
        """``(sampler, ts, steps)`` of a distilled student (``training.objective.kind_sampler``), None for a
        denoiser, which every sampler takes."""
        from ..training.objective import kind_sampler

        return kind_sampler(self.config, self.process, steps)


class LatentCodec:
    """A latent model's autoencoder with its latent scale factor s (Rombach et al. 2022, Sec. 4.3.2): ``encode(x)``
    = s E[z | x], the latents the diffusion model was trained on; ``decode(z)`` = D(z / s). CPU tensors in and out."""

    def __init__(self, autoencoder, scale_factor: float, image_shape: tuple[int, ...], path: str):
        self.autoencoder, self.scale_factor, self.image_shape, self.path = autoencoder, scale_factor, image_shape, path

    def encode(self, images: Tensor) -> Tensor:
        from ..training.autoencoder import encode_dataset

        return encode_dataset(self.autoencoder, images, self.scale_factor).cpu()

    def decode(self, z: Tensor) -> Tensor:
        from ..training.autoencoder import decode_latents

        return decode_latents(self.autoencoder, z, self.scale_factor).cpu()

    def __repr__(self) -> str:
        return f"LatentCodec({self.path!r}, scale_factor={self.scale_factor:.4g}, image_shape={self.image_shape})"


def latent_codec(run_dir: str | os.PathLike, config: dict[str, Any], device="cpu") -> LatentCodec | None:
    """The ``LatentCodec`` of a latent model (its config names an ``autoencoder``), else None. The run keeps a copy
    of the autoencoder's checkpoint (``run_dir/autoencoder``), read first; the path the config names otherwise."""
    path = config.get("autoencoder")
    if not path:
        return None
    from ..training.autoencoder import load_autoencoder

    run = Path(run_dir)
    run = run.parent if run.name in ("checkpoint", "checkpoint.old") else run
    where = run / "autoencoder" if (run / "autoencoder").is_dir() else Path(path)
    ae, meta = load_autoencoder(where, device=device)
    return LatentCodec(ae, float(meta["scale_factor"]), tuple(meta["image_shape"]), str(where))


def cascade(pipes: Sequence[Pipeline], n: int, *, steps: int | None = None, aug_level: float = 0.0, **options):
    """Samples of a cascade (Ho et al. 2022, "Cascaded Diffusion Models"): ``pipes[0]`` (a base model) draws n
    images, and each following super-resolution model upsamples the previous stage's output (``low_res``).
    Returns the last stage's samples; ``options`` (generator, sampler, progress, ...) go to every stage."""
    if not pipes:
        raise ValueError("a cascade needs at least a base model")
    if pipes[0].super_resolution:
        raise ValueError("the first stage of a cascade is a base model; this one is a super-resolution model")
    x = pipes[0].sample(n, steps=steps, **options)
    for i, pipe in enumerate(pipes[1:], 1):
        if not pipe.super_resolution:
            raise ValueError(f"stage {i} of the cascade is not a super-resolution model")
        f = pipe.super_resolution
        want = (pipe.shape[0], pipe.shape[1] // f, pipe.shape[2] // f)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"stage {i} upsamples {want} images, but stage {i - 1} gives {tuple(x.shape[1:])}")
        x = pipe.sample(n, steps=steps, low_res=x, aug_level=aug_level, **options)
    return x


def load_model(path: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu", clip: bool = True):
    """``(denoiser, process, config)`` of a run directory (``training.checkpoint.load_denoiser``) or of a diffusers
    folder (``interop.diffusers.load_diffusers``: a ``DDPMPipeline`` / ``DDIMPipeline`` folder, or a bare
    ``UNet2DModel`` folder with its scheduler config), whichever ``path`` is."""
    from ..interop.diffusers import is_diffusers_folder, load_diffusers
    from ..training.checkpoint import load_denoiser

    if is_diffusers_folder(path):
        return load_diffusers(path, device=device, clip=clip)  # a diffusers model has one set of weights
    return load_denoiser(path, ema, device=device, clip=clip)


def load(
    run_dir: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu", clip: bool = True
) -> Pipeline:
    """The trained model of ``run_dir`` (a run directory or its ``checkpoint/``, or a diffusers pipeline or
    ``UNet2DModel`` folder: ``load_model``), ready to ``.sample(n)``.

    ``ema=True`` takes the EMA weights (Ho et al. 2020, Sec. 4), which sample better than the raw ones;
    ``clip=True`` clamps x0_hat to the training data's box (``core.support``: exact, never moves a
    prediction away from the ideal denoiser; for a diffusers model, its scheduler's ``clip_sample`` or
    ``thresholding``). Raises ``CheckpointError`` (a ValueError) naming the file and the problem when the
    checkpoint is missing, incomplete or corrupt, and ``DiffusersFormatError`` (a ValueError) naming a
    diffusers setting that cannot be represented.
    """
    device = torch.device(device)
    denoiser, process, config = load_model(run_dir, ema=ema, device=device, clip=clip)
    codec = latent_codec(run_dir, config, device)
    box = config.get("data_box")
    return Pipeline(
        denoiser=denoiser,
        process=process,
        config=config,
        shape=example_shape(config),
        sigma_data=float(config["sigma_data"]),
        data_box=tuple(box) if box is not None else None,
        num_classes=config["net"].get("num_classes") or None,
        device=device,
        autoencoder=codec,
    )
