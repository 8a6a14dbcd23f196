"""``torchdiffusion sample``: samples of a checkpoint as .npy and a PNG, on a given or fitted grid."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch

from ...core.optimized_grid import FINAL_DENOISE
from ...names import GRIDS, SAMPLERS
from ._sampling import _class_labels, _draw
from ._shared import _device, _fail, _say_precision, _writable, precision_option, threads_option
from .group import main


def _fit_grid(sampler, denoiser, process, steps, pilot_shape, seed, device, no_progress, spread, **cond):
    """``grid_fit.fit_grid`` for --grid fit (with ``grid_fit.SPREAD`` for --fit-objective spread), on pilot starts of
    seed + 1 (with ``cond``, e.g. their class labels); prints what it found and returns the fit."""
    from ...names import get_sampler
    from ...samplers.grid_fit import SPREAD, fit_grid

    pilot = process.prior_sample(pilot_shape, generator=torch.Generator(device).manual_seed(seed + 1), device=device)
    recipe = SPREAD if spread else {}
    with torch.no_grad():
        fit = fit_grid(
            get_sampler(sampler), denoiser, process, steps, pilot, progress=not no_progress, **recipe, **cond
        )
    lam = ", ".join(f"{v:.2f}" for v in process.lam(fit.ts).tolist())
    gap = f"; log-density gap {fit.logp_gap_uniform_lam:+.3g} -> {fit.logp_gap:+.3g} nats" if spread else ""
    click.echo(
        f"fitted a {steps}-step grid ({fit.nfe} evaluations of {pilot_shape[0]} pilot starts): distance to the "
        f"teacher {fit.error_uniform_lam:.4g} (uniform lam) -> {fit.error:.4g}{gap}; lam = [{lam}]"
    )
    return fit


@main.command()
@click.option(
    "--checkpoint", "ckpt", default=None, type=click.Path(), help="Run directory, checkpoint or diffusers folder."
)
@click.option(
    "--cascade",
    default=None,
    metavar="BASE,UP1,...",
    help="A cascade (Ho et al. 2022): a base model's run, then super-resolution runs, each upsampling the previous "
    "stage's samples (instead of --checkpoint).",
)
@click.option(
    "--aug-level",
    type=click.FloatRange(min=0),
    default=0.0,
    help="With --cascade: the noise level added to each stage's low-resolution input, as in training's "
    "augmentation (Ho et al. 2022, Sec. 4.2).",
)
@click.option(
    "--sampler",
    type=click.Choice(sorted(SAMPLERS)),
    default=None,
    help="Sampling algorithm (default: ddpm with 250 steps; with --steps N: optimized, UniPC-3 with weights "
    "optimized offline with its grid, on the optimized few-step grid; "
    "a distilled student: its own, consistency or DDIM on its grid).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Steps (noise levels for ald); default 250, or a distilled student's own (consistency: 1). A progressive "
    "distillation's earlier rounds answer other powers of 2.",
)
@click.option(
    "--grid",
    type=click.Choice(GRIDS),
    default="auto",
    help="Time grid (auto: the sampler's usual one, see `torchdiffusion samplers`; discrete: integer DDPM steps; "
    "optimized: stored grids optimized offline for 5-10 steps, run without the final denoise; "
    "fit: fitted to this model first, for deterministic samplers, see --fit-pilot).",
)
@click.option(
    "--fit-pilot",
    type=click.IntRange(min=1),
    default=256,
    help="Pilot starts for --grid fit (drawn with seed + 1, not the samples' noise).",
)
@click.option(
    "--fit-objective",
    type=click.Choice(["spread", "distance"]),
    default="spread",
    help="With --grid fit: spread also holds the samples' log-density at the teacher's (grid_fit.SPREAD: the end "
    "is fitted, no final denoise), which keeps few-step samples from coming out too concentrated; distance fits "
    "the distance to the teacher alone.",
)
@click.option("--n", "n", type=click.IntRange(min=1), default=2000, help="Number of samples.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples drawn at once [default: all of them for points, 1000 for images]; memory grows with it. "
    "Each batch draws its noise from the seeded stream in turn: one seed and batch size always give the same "
    "samples, another batch size gives other (equally valid) samples.",
)
@click.option("--n-steps-each", type=click.IntRange(min=1), default=10, help="Langevin steps per level (ald).")
@click.option("--seed", type=int, default=0, help="Seed of the sampler's noise.")
@click.option("--class", "klass", type=click.IntRange(min=0), default=None, help="Class-conditional models: one class.")
@click.option(
    "--labels",
    default=None,
    help="Class-conditional models: labels, e.g. 0,3,7, or a .npy of integers; sample i gets label "
    "L[i mod len(L)] [default: i mod the number of classes, every class evenly].",
)
@click.option(
    "--guidance",
    type=click.FloatRange(min=0),
    default=None,
    help="Classifier-free guidance scale w (1: the conditional model, 0: the unconditional one; Ho & Salimans "
    "2022). Needs a class-conditional model trained with label dropout (--set label_dropout=0.1).",
)
@click.option(
    "--guidance-interval",
    default=None,
    metavar="LO,HI",
    help="Guide only at times t in [LO, HI] (Kynkäänniemi et al. 2024); the conditional model elsewhere.",
)
@click.option(
    "--guidance-rescale",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Rescale of the guided x0_hat (Lin et al. 2024).",
)
@click.option(
    "--classifier",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Classifier guidance (Dhariwal & Nichol 2021) of an unconditional model by a `train-classifier` run; "
    "--class / --labels then name the classifier's classes.",
)
@click.option("--classifier-scale", type=click.FloatRange(min=0), default=1.0, help="Classifier guidance scale.")
@click.option("--out", type=click.Path(dir_okay=False), default="samples.npy", help="Samples (.npy).")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Picture (default: --out with .png).")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of their EMA.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--figure",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw the reverse process (PNG): snapshots and trajectories of 2-D points, or x_t of the first "
    "images at six moments (from the first batch).",
)
@precision_option(
    "The network's arithmetic (torch.autocast; the sampler's stays float32). auto: bf16 for a U-Net on a CPU "
    "with AMX-BF16 or a CUDA GPU with bf16 (1.3-2.5x faster; samples differ from fp32's by bf16 rounding), else fp32."
)
@threads_option
def sample(
    ckpt,
    cascade,
    aug_level,
    sampler,
    steps,
    grid,
    fit_pilot,
    fit_objective,
    n,
    batch_size,
    n_steps_each,
    seed,
    klass,
    labels,
    guidance,
    guidance_interval,
    guidance_rescale,
    classifier,
    classifier_scale,
    out,
    png,
    no_ema,
    device,
    no_progress,
    figure,
    precision,
):
    """Draw samples from a trained checkpoint; write them as .npy and a PNG."""
    from ...names import GRID_FUNCTIONS, INFO
    from ...utils.io import atomic_write
    from ..pipeline import load
    from ..plotting import TrajectoryRecorder, reverse_process_figure, reverse_process_images, save_samples_png

    if not out.endswith(".npy"):
        raise click.BadParameter(f"samples are written as .npy; got {out!r}", param_hint="--out")
    png = png or str(Path(out).with_suffix(".png"))
    for path, option in ((out, "--out"), (png, "--png"), (figure, "--figure")):
        _writable(path, option)  # before the sampling, not after it
    device = _device(device)
    if (ckpt is None) == (cascade is None):
        raise click.UsageError("give --checkpoint RUN, or --cascade BASE,UP1,... (one of them)")
    if cascade is not None:
        extras = dict(grid=grid != "auto", klass=klass, labels=labels, guidance=guidance, classifier=classifier,
                      figure=figure)  # fmt: skip
        if any(v not in (None, False) for v in extras.values()):
            raise click.UsageError(f"--cascade takes --sampler, --steps, --n, --seed, --batch-size; not {extras}")
        return _sample_cascade(cascade, aug_level, sampler, steps, n, batch_size, seed, no_ema, device, no_progress,
                               out, png, precision)  # fmt: skip
    try:
        pipe = load(ckpt, ema=not no_ema, device=device)
        if pipe.autoencoder is not None and figure:
            raise ValueError("--figure draws x_t of pixel models; this is a latent model (its x_t are latents)")
        if pipe.super_resolution:
            raise ValueError(
                f"{ckpt} is a x{pipe.super_resolution} super-resolution model: it samples given low-resolution "
                f"images, after a base model: --cascade BASE,{ckpt}"
            )
        pipe = _progressive_round(pipe, ckpt, steps, ema=not no_ema, device=device)  # before any guidance wraps it
        if classifier is not None:
            from ...training.classifier import load_classifier

            if guidance is not None:
                raise ValueError("--classifier (classifier guidance) and --guidance (classifier-free): choose one")
            pipe = pipe.classifier_guided(load_classifier(classifier, device=device), classifier_scale)
        if guidance is not None:
            interval = _interval(guidance_interval)
            pipe = pipe.guided(guidance, interval=interval, rescale=guidance_rescale)
        elif guidance_interval is not None or guidance_rescale:
            raise ValueError("--guidance-interval and --guidance-rescale shape --guidance: give --guidance W too")
        denoiser, precision = pipe.sampling_denoiser(precision)
        process = pipe.process
        _say_precision(precision)
        chosen = sampler is not None or grid != "auto"
        own = None if chosen and pipe.objective == "reflow" else pipe.own_sampler(steps)  # reflow: any sampler too
        if own is not None:  # a distilled student: its own sampler on its own times
            if sampler is not None or grid != "auto":
                raise ValueError(f"{ckpt} is a {pipe.objective!r} model with its own sampler: drop --sampler / --grid")
            sampler, ts, steps = own
        else:
            if sampler is None and steps is not None and grid == "auto":  # the few-step default (Pipeline.sample's)
                sampler, grid = "optimized", "optimized"
                click.echo(f"sampler: optimized (UniPC-3, with stored weights where they exist) on the optimized "
                           f"{steps}-step grid, no final denoise ({steps} network calls per sample; --sampler and "
                           "--grid choose others)")  # fmt: skip
            sampler, steps = sampler or "ddpm", steps or 250
            grid = INFO[sampler].grid if grid == "auto" else grid
            if grid == "fit" and INFO[sampler].stochastic:
                raise ValueError(f"--grid fit needs a deterministic sampler; {sampler!r} draws noise")
            ts = None if grid == "fit" else GRID_FUNCTIONS[grid](process, steps)
    except (ValueError, OSError) as e:
        _fail(e)
    shape = pipe.shape
    images = len(shape) == 3
    label_cfg = {"net": {"num_classes": pipe.num_classes}}  # the classifier's classes under --classifier
    class_labels, how = _class_labels(label_cfg, classifier or ckpt, klass, labels, n)
    if how:
        click.echo(f"class-conditional model: {how}")
    kwargs = {"n_steps_each": n_steps_each} if sampler == "ald" else {}
    if grid == "optimized":  # fitted without the final x0_hat (core.optimized_grid)
        kwargs["final_denoise"] = FINAL_DENOISE
    name = sampler if isinstance(sampler, str) else sampler.__name__.removeprefix("sample_")
    gen = torch.Generator(device).manual_seed(seed)
    if ts is None:
        # the pilot starts get the samples' labels (cycled), so the grid is fitted to what will be sampled
        pilot = None if class_labels is None else class_labels.repeat(-(-fit_pilot // n))[:fit_pilot]
        cond = {} if pilot is None else {"class_labels": pilot.to(device)}
        pilot_shape, spread = (fit_pilot, *shape), fit_objective == "spread"
        fit = _fit_grid(sampler, denoiser, process, steps, pilot_shape, seed, device, no_progress, spread, **cond)
        ts, kwargs = fit.ts, {**kwargs, "final_denoise": fit.final_denoise}
    recorders = []

    def record(x):  # the first batch only: a figure shows a few images, or one cloud of points
        recorders.append(TrajectoryRecorder(x, keep=8 if images else None))
        return recorders[0]

    batch = batch_size or (1000 if images else n)
    xs = _draw(sampler, denoiser, process, shape, n, batch, ts, gen, device, class_labels, no_progress, kwargs,
               record if figure else None)  # fmt: skip
    if pipe.autoencoder is not None:  # a latent model: its samples are latents; the images are their decoding
        xs = pipe.autoencoder.decode(xs)
        shape = pipe.image_shape
    if figure:
        title = f"reverse process: {name}, {process!r}"
        if images:
            reverse_process_images(recorders[0], shape, figure, title)
        else:
            reverse_process_figure(recorders[0], xs, None, figure, title)
        click.echo(f"wrote the reverse-process figure to {figure}")
    atomic_write(out, lambda p: np.save(p, xs.numpy()))
    if images:
        from ...utils.image_grid import save_image_grid

        if class_labels is not None and klass is None and labels is None:
            nrow = pipe.num_classes  # labels i mod K: every class in its own column
        else:
            nrow = 16 if len(xs) >= 256 else 8
        save_image_grid(xs[:256].clamp(-1, 1), png, nrow=nrow)
    else:
        save_samples_png(xs, png, f"{name}, {len(ts)} levels, {process!r}")
    click.echo(f"wrote {n} samples to {out} and a picture to {png}")


def _sample_cascade(
    cascade, aug_level, sampler, steps, n, batch_size, seed, no_ema, device, no_progress, out, png, precision
):
    """``--cascade BASE,UP1,...``: ``pipeline.cascade`` of the runs, written as ``sample`` writes samples."""
    from ...utils.image_grid import save_image_grid
    from ...utils.io import atomic_write
    from ..pipeline import cascade as run_cascade
    from ..pipeline import load

    runs = [r.strip() for r in cascade.split(",") if r.strip()]
    try:
        pipes = [load(r, ema=not no_ema, device=device) for r in runs]
        gen = torch.Generator(device).manual_seed(seed)
        xs = run_cascade(pipes, n, steps=steps, aug_level=aug_level, sampler=sampler, generator=gen,
                         batch_size=batch_size, progress=not no_progress, precision=precision)  # fmt: skip
    except (ValueError, OSError) as e:
        _fail(e)
    atomic_write(out, lambda p: np.save(p, xs.numpy()))
    save_image_grid(xs[:256].clamp(-1, 1), png, nrow=16 if len(xs) >= 256 else 8)
    sizes = " -> ".join("x".join(map(str, p.shape[1:])) for p in pipes)
    click.echo(f"wrote {n} samples of the cascade {sizes} to {out} and a picture to {png}")


def _progressive_round(pipe, ckpt: str, steps: int | None, **load_options):
    """A progressive student asked for another number of steps: the round of its distillation that has them
    (``RUN/rounds/NNNN-steps``, ``training.distill``), else the student itself (whose sampler then says why not)."""
    from ..pipeline import load

    if pipe.objective != "progressive" or steps is None or steps == pipe.config["distill"]["steps"]:
        return pipe
    folder = Path(ckpt) / "rounds" / f"{steps:04d}-steps"
    return load(folder, **load_options) if folder.is_dir() else pipe


def _interval(text: str | None) -> tuple[float, float] | None:
    """``"LO,HI"`` -> (LO, HI)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--guidance-interval takes LO,HI (two times, e.g. 0.2,0.8), got {text!r}") from None
    return lo, hi
