"""The command line: ``torchdiffusion train | sample | demo | samplers``.

Names given on the command line become objects through ``specs`` (processes, networks,
samplers); everything else is the Python API. Errors are reported as one clear line and
never leave a half-written file behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import torch

from .specs import PROCESSES, SAMPLERS

GRIDS = ("auto", "t", "lam", "karras", "quadratic", "discrete", "fit")
TARGETS = ("eps", "x0", "v", "score", "flow")
WEIGHTINGS = ("simple", "elbo", "likelihood", "snr", "sigma2", "min_snr")
SCHEDULES = ("linear", "cosine", "sigmoid", "quadratic")


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="torchdiffusion")
def main():
    """Diffusion models from the ground up: train, sample and measure them on your own data."""


def _process_spec(process: str, schedule: str, T: int) -> dict:
    return {"name": "ddpm", "schedule": schedule, "T": T} if process == "ddpm" else {"name": process}


@main.command()
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A YAML file of training fields (configs/*.yaml); options typed on the command line override it.",
)
@click.option(
    "--data",
    default="moons",
    help="Built-in 2-D set (swiss_roll, moons, 8gaussians, checkerboard, circles, pinwheel), built-in images "
    "(digits, digits16), or a path: an (N, D) .npy / .csv file, an image folder, .npz, IDX or CIFAR-10 folder.",
)
@click.option(
    "--download",
    is_flag=True,
    help="Allow downloading --data when it names mnist, fashion-mnist or cifar10 (into data/NAME, checksummed).",
)
@click.option("--process", type=click.Choice(sorted(PROCESSES)), default="vp", help="Noise process.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="linear", help="Beta schedule (ddpm only).")
@click.option("--T", "T", type=click.IntRange(min=2), default=1000, help="Number of discrete steps (ddpm only).")
@click.option("--target", type=click.Choice(TARGETS), default="eps", help="What the network predicts.")
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default="simple", help="Loss weighting over time.")
@click.option("--width", type=click.IntRange(min=1), default=256, help="MLP hidden width.")
@click.option("--depth", type=click.IntRange(min=1), default=4, help="MLP residual blocks.")
@click.option("--steps", type=click.IntRange(min=1), default=4000, help="Training steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, help="Examples per micro-batch.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, help="Micro-batches per optimizer step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, help="Peak learning rate (AdamW).")
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.999, help="EMA decay of the weights.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Mixed precision.")
@click.option("--flip", is_flag=True, help="Random left-right flips of image batches.")
@click.option("--sample-every", type=click.IntRange(min=0), default=0, help="Steps between sample grids (images).")
@click.option("--tensorboard", is_flag=True, help="Also log to TensorBoard (needs the tensorboard package).")
@click.option("--seed", type=int, default=0, help="Seed of data, initialisation and noise.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, help="Steps between checkpoints.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/default", help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def train(ctx, config, data, download, process, schedule, T, target, weighting, width, depth, steps, batch_size,
          grad_accum, lr, ema_decay, precision, flip, sample_every, tensorboard, seed, checkpoint_every, out, resume,
          device, no_progress):  # fmt: skip
    """Train a denoiser on DATA (or a --config file) and write checkpoints and log.csv to --out.

    Several processes or GPUs: torchrun --standalone --nproc_per_node N --no-python torchdiffusion train --config C
    """
    from click.core import ParameterSource

    from .train import TrainConfig
    from .train import train as run_train

    data = _maybe_download(data, download)
    fields = dict(data=data, target=target, weighting=weighting, steps=steps, batch_size=batch_size,
                  grad_accum=grad_accum, lr=lr, ema_decay=ema_decay, precision=precision, flip=flip,
                  sample_every=sample_every, tensorboard=tensorboard, seed=seed, checkpoint_every=checkpoint_every,
                  device=device)  # fmt: skip
    try:
        if config:  # the file decides, except for what was typed on the command line
            typed = {k: v for k, v in fields.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
            cfg = TrainConfig.from_yaml(config, **typed)
        else:
            _check_data(data)
            net = {**TrainConfig.__dataclass_fields__["net"].default_factory(), "width": width, "depth": depth}
            cfg = TrainConfig(process=_process_spec(process, schedule, T), net=net, **fields)
        res = run_train(cfg, out, resume=resume, progress=not no_progress)
    except (ValueError, OSError, RuntimeError, ArithmeticError, ImportError) as e:
        _fail(e)
    if res.history:  # under torchrun only rank 0 keeps the log
        loss = res.history[-1]["loss"]
        click.echo(f"trained {cfg.steps} steps; final loss {loss:.4g}; checkpoint in {Path(out) / 'checkpoint'}")


def _maybe_download(data: str, allowed: bool) -> str:
    """``data`` itself, or the folder a named downloadable set was fetched into (only with --download)."""
    from .data import DOWNLOADABLE, download_images

    if data not in DOWNLOADABLE:
        return data
    folder = Path("data") / data
    if not allowed and not folder.exists():
        raise click.BadParameter(
            f"{data!r} is not on this machine; pass --download to fetch it into {folder} (checksummed), "
            "or give the path of a folder that holds its files",
            param_hint="--data",
        )
    try:
        return str(download_images(data, folder.parent)) if allowed else str(folder)
    except (ConnectionError, ValueError, OSError) as e:
        _fail(e)


def _check_data(data: str) -> None:
    from .data import IMAGE_DATASETS, TOY_DATASETS, load_array

    if data in TOY_DATASETS or data in IMAGE_DATASETS or Path(data).is_dir() or data.endswith((".npz", "ubyte", ".gz")):
        return
    if not Path(data).exists():
        raise click.BadParameter(
            f"{data!r} is neither a built-in set ({', '.join(sorted(TOY_DATASETS) + sorted(IMAGE_DATASETS))}) "
            "nor an existing .npy, .csv, .npz, IDX file or image folder",
            param_hint="--data",
        )
    try:
        load_array(data)
    except (ValueError, OSError) as e:
        raise click.BadParameter(str(e), param_hint="--data") from None


def _fit_grid(sampler, denoiser, process, steps, pilot_shape, seed, device, no_progress, spread):
    """``grid_fit.fit_grid`` for --grid fit (with ``grid_fit.SPREAD`` for --fit-objective spread), on pilot starts of
    seed + 1; prints what it found and returns the fit."""
    from .grid_fit import SPREAD, fit_grid
    from .specs import get_sampler

    pilot = process.prior_sample(pilot_shape, generator=torch.Generator(device).manual_seed(seed + 1), device=device)
    recipe = SPREAD if spread else {}
    with torch.no_grad():
        fit = fit_grid(get_sampler(sampler), denoiser, process, steps, pilot, progress=not no_progress, **recipe)
    lam = ", ".join(f"{v:.2f}" for v in process.lam(fit.ts).tolist())
    gap = f"; log-density gap {fit.logp_gap_uniform_lam:+.3g} -> {fit.logp_gap:+.3g} nats" if spread else ""
    click.echo(
        f"fitted a {steps}-step grid ({fit.nfe} evaluations of {pilot_shape[0]} pilot starts): distance to the "
        f"teacher {fit.error_uniform_lam:.4g} (uniform lam) -> {fit.error:.4g}{gap}; lam = [{lam}]"
    )
    return fit


@main.command()
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="Run directory or checkpoint folder.")
@click.option("--sampler", type=click.Choice(sorted(SAMPLERS)), default="ddpm", help="Sampling algorithm.")
@click.option("--steps", type=click.IntRange(min=1), default=250, help="Steps (noise levels for ald).")
@click.option(
    "--grid",
    type=click.Choice(GRIDS),
    default="auto",
    help="Time grid (auto: the sampler's usual one, see `torchdiffusion samplers`; discrete: integer DDPM steps; "
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
@click.option("--n-steps-each", type=click.IntRange(min=1), default=10, help="Langevin steps per level (ald).")
@click.option("--seed", type=int, default=0, help="Seed of the sampler's noise.")
@click.option("--out", type=click.Path(dir_okay=False), default="samples.npy", help="Samples (.npy).")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Picture (default: --out with .png).")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of their EMA.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--figure",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw the reverse process and trajectories (PNG).",
)
def sample(
    ckpt,
    sampler,
    steps,
    grid,
    fit_pilot,
    fit_objective,
    n,
    n_steps_each,
    seed,
    out,
    png,
    no_ema,
    device,
    no_progress,
    figure,
):
    """Draw samples from a trained checkpoint; write them as .npy and a PNG."""
    from . import timesteps
    from .checkpoint import load_denoiser
    from .io import atomic_write
    from .plotting import save_samples_png
    from .specs import get_sampler

    if not out.endswith(".npy"):
        raise click.BadParameter(f"samples are written as .npy; got {out!r}", param_hint="--out")
    try:
        denoiser, process, cfg = load_denoiser(ckpt, ema=not no_ema)
        from .samplers import INFO

        grid = INFO[sampler].grid if grid == "auto" else grid
        if grid == "fit" and INFO[sampler].stochastic:
            raise ValueError(f"--grid fit needs a deterministic sampler; {sampler!r} draws noise")
        ts = None if grid == "fit" else getattr(timesteps, f"grid_{grid}")(process, steps)
    except (ValueError, OSError) as e:
        _fail(e)
    denoiser = denoiser.to(device)
    kwargs = {"n_steps_each": n_steps_each} if sampler == "ald" else {}
    gen = torch.Generator(device).manual_seed(seed)
    net_cfg = cfg["net"]
    if "dim" in net_cfg:  # an MLP on (N, D) data
        shape = (n, int(net_cfg["dim"]))
    else:  # an image network
        size = int(net_cfg["image_size"])
        shape = (n, int(net_cfg.get("in_channels", 1)), size, size)
    if ts is None:
        pilot_shape = (fit_pilot, *shape[1:])
        fit = _fit_grid(
            sampler, denoiser, process, steps, pilot_shape, seed, device, no_progress, fit_objective == "spread"
        )
        ts, kwargs = fit.ts, {**kwargs, "final_denoise": fit.final_denoise}
    x = process.prior_sample(shape, generator=gen, device=device)
    from .plotting import TrajectoryRecorder, reverse_process_figure
    from .samplers import progress_callback

    tick, bar = progress_callback(len(ts) if sampler == "ald" else len(ts) - 1, sampler, disable=no_progress)
    rec = TrajectoryRecorder(x) if figure else None

    def cb(info):
        tick(info)
        if rec is not None:
            rec(info)

    with torch.no_grad():
        xs = get_sampler(sampler)(denoiser, process, x, ts, generator=gen, callback=cb, **kwargs).cpu()
    bar.close()
    if figure:
        reverse_process_figure(rec, xs, None, figure, f"reverse process: {sampler}, {process!r}")
        click.echo(f"wrote the reverse-process figure to {figure}")
    atomic_write(out, lambda p: np.save(p, xs.numpy()))
    png = png or str(Path(out).with_suffix(".png"))
    if xs.ndim == 4:
        from .image_grid import save_image_grid

        save_image_grid(xs[:256].clamp(-1, 1), png, nrow=16 if len(xs) >= 256 else 8)
    else:
        save_samples_png(xs, png, f"{sampler}, {len(ts)} levels, {process!r}")
    click.echo(f"wrote {n} samples to {out} and a picture to {png}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo-output", help="Output folder.")
@click.option("--data", default="8gaussians", help="Built-in 2-D set.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (default: the demo's).")
@click.option("--seed", type=int, default=0, help="Seed.")
@click.option("--resume", is_flag=True, help="Continue an interrupted demo run in --out.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo(out, data, steps, seed, resume, no_progress):
    """Train a VP model on built-in 2-D data (~1 minute on 2 cores), sample it two ways, draw it."""
    from .demo import quick_config, run_demo

    changes = {"data": data, "seed": seed} | ({"steps": steps} if steps else {})
    try:
        m = run_demo(out, config=quick_config(**changes), progress=not no_progress, resume=resume)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as e:
        _fail(e)
    click.echo(f"data {m['data']}, {m['process']}, {m['train_steps']} steps in {m['train_seconds']} s")
    click.echo(
        f"sliced Wasserstein-2 to held-out data: DDPM {m['sw2_ddpm']:.4f}, "
        f"annealed Langevin {m['sw2_ald']:.4f}, noise floor {m['sw2_floor']:.4f}"
    )
    click.echo(f"figure: {m['figure']}")


@main.command()
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="Run directory or checkpoint folder.")
@click.option("--data", required=True, help="Built-in 2-D set (held-out draws) or an (N, D) .npy / .csv file.")
@click.option(
    "--method",
    type=click.Choice(["ode", "elbo", "vlb"]),
    default="ode",
    help="ode: exact probability-flow likelihood; elbo: continuous-time bound; vlb: DDPM's discrete bound.",
)
@click.option("--n", "n", type=click.IntRange(min=2), default=2000, help="Examples drawn from a built-in set.")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, help="Examples per batch.")
@click.option("--n-t", type=click.IntRange(min=1), default=16, help="Times drawn per example (elbo, vlb).")
@click.option("--rtol", type=float, default=1e-5, help="ODE solver relative tolerance.")
@click.option("--atol", type=float, default=1e-5, help="ODE solver absolute tolerance.")
@click.option("--hutchinson", is_flag=True, help="Estimate the divergence with a Rademacher probe (high dimension).")
@click.option("--seed", type=int, default=0, help="Seed of the held-out draw, times and probes.")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of their EMA.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def likelihood(ckpt, data, method, n, batch_size, n_t, rtol, atol, hutchinson, seed, no_ema, device, no_progress):
    """Negative log-likelihood of DATA under a checkpoint, in nats per example and bits per dimension."""
    from tqdm.auto import tqdm

    from .checkpoint import load_denoiser
    from .data import load_dataset
    from .dequantize import bits_per_dim
    from .likelihood import elbo, log_likelihood, vlb

    try:
        denoiser, process, _ = load_denoiser(ckpt, ema=not no_ema, device=device)
        denoiser = denoiser.double()  # likelihoods integrate in float64; so does the network here
        x = load_dataset(data, n, generator=torch.Generator().manual_seed(seed + 1)).to(device, torch.float64)
    except (ValueError, OSError) as e:
        _fail(e)
    gen = torch.Generator(device).manual_seed(seed)
    nll = []
    try:
        for xb in tqdm(x.split(batch_size), desc=f"{method} likelihood", disable=no_progress, leave=False):
            if method == "ode":
                lp = log_likelihood(
                    denoiser, process, xb, exact_trace=not hutchinson, rtol=rtol, atol=atol, generator=gen
                )
                nll.append(-lp.detach())
            elif method == "elbo":
                nll.append(-elbo(denoiser, process, xb, n_t=n_t, generator=gen)[0].detach())
            else:
                nll.append(vlb(denoiser, process, xb, n_t=n_t, generator=gen).detach())
    except ValueError as e:  # e.g. vlb on a continuous process, elbo on a discrete one
        _fail(e)
    nll = torch.cat(nll)
    mean, se = float(nll.mean()), float(nll.std() / len(nll) ** 0.5)
    d = x[0].numel()
    bound = "upper bound on " if method != "ode" else ""
    click.echo(f"{method}: {bound}NLL = {mean:.4f} +- {se:.4f} nats per example ({len(nll)} examples, dim {d})")
    click.echo(
        f"        = {float(bits_per_dim(torch.tensor(mean), d)):.4f} +- {se / (d * 0.6931471805599453):.4f} bits/dim"
    )


@main.command()
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(), help="Run directory or checkpoint folder.")
@click.option("--data", required=True, help="Image data: digits, digits16, or a folder / .npz / IDX / CIFAR path.")
@click.option("--n", "n", type=click.IntRange(min=2), default=1000, help="Generated images to evaluate.")
@click.option("--sampler", type=click.Choice(sorted(SAMPLERS)), default="dpmpp_2m", help="Sampling algorithm.")
@click.option("--steps", type=click.IntRange(min=1), default=20, help="Sampler steps.")
@click.option("--inception", type=click.Path(dir_okay=False), default=None, help="pytorch-fid Inception weights file.")
@click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None, help="Where the own feature net is cached."
)
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, help="KID subsets.")
@click.option("--pr-k", type=click.IntRange(min=1), default=3, help="k of the k-NN precision/recall.")
@click.option("--seed", type=int, default=0, help="Seed.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def evaluate(ckpt, data, n, sampler, steps, inception, cache_dir, kid_subsets, pr_k, seed, device, out, no_progress):
    """FID, KID and precision/recall of a checkpoint's samples against image DATA."""
    import json
    import os

    from . import timesteps
    from .checkpoint import load_denoiser
    from .data import load_images
    from .image_metrics import evaluate_images
    from .io import atomic_write
    from .nets.features import feature_net_for, load_inception
    from .samplers import INFO, progress_callback

    try:
        real, labels = load_images(data)
        denoiser, process, _ = load_denoiser(ckpt, device=device)
        if inception:
            net = load_inception(inception)
        else:
            cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "torchdiffusion", "features")
            name = data if data in ("digits", "digits16") else os.path.basename(os.path.normpath(data))
            net = feature_net_for(name, cache, images=real, labels=labels, device=device)
    except (ValueError, OSError) as e:
        _fail(e)
    gen = torch.Generator(device).manual_seed(seed)
    ts = getattr(timesteps, f"grid_{INFO[sampler].grid}")(process, steps)
    tick, bar = progress_callback(len(ts) - 1, sampler, disable=no_progress)
    x = process.prior_sample((n, *real.shape[1:]), generator=gen, device=device)
    with torch.no_grad():
        fake = SAMPLERS[sampler](denoiser, process, x, ts, generator=gen, callback=tick).cpu()
    bar.close()
    try:
        result = evaluate_images(
            fake,
            real,
            feature_net=net.to(device),
            kid_subsets=kid_subsets,
            pr_k=pr_k,
            generator=torch.Generator().manual_seed(seed),
        )
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(f"features: {result['features']}")
    click.echo(
        f"FID {result['fid']:.3f}   KID {result['kid_mean']:.4f} +- {result['kid_std']:.4f}   "
        f"precision {result['precision']:.3f}   recall {result['recall']:.3f}"
    )
    click.echo(f"({result['n_fake']} generated with {sampler}, {steps} steps; {result['n_real']} real)")
    if out:
        atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2, default=float) + "\n"))


@main.command()
def samplers():
    """List the samplers: order, network evaluations per step, default grid, stochastic or not, paper."""
    from .samplers import DEFAULT_SAMPLER, INFO

    click.echo(f"{'name':<14} {'order':<11} {'NFE/step':<24} {'grid':<7} {'noise':<6} paper")
    for name, info in INFO.items():
        noise = "yes" if info.stochastic else "no"
        click.echo(f"{name:<14} {info.order:<11} {info.nfe:<24} {info.grid:<7} {noise:<6} {info.paper}")
    click.echo(
        f"\nFor few steps: {DEFAULT_SAMPLER} (samplers.DEFAULT_SAMPLER) on a grid fitted to the model, "
        f"`sample --sampler {DEFAULT_SAMPLER} --grid fit` (docs/bench/samplers.md)."
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
