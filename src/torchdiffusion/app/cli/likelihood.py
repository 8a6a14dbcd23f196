"""``torchdiffusion likelihood``: negative log-likelihood of data under a checkpoint (ode, elbo, vlb)."""

from __future__ import annotations

import click
import torch

from ._shared import _device, _example_shape, _fail, threads_option
from .group import main


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
@click.option(
    "--rtol", type=click.FloatRange(min=0, min_open=True), default=1e-5, help="ODE solver relative tolerance (> 0)."
)
@click.option(
    "--atol", type=click.FloatRange(min=0, min_open=True), default=1e-5, help="ODE solver absolute tolerance (> 0)."
)
@click.option("--hutchinson", is_flag=True, help="Estimate the divergence with a Rademacher probe (high dimension).")
@click.option("--seed", type=int, default=0, help="Seed of the held-out draw, times and probes.")
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of their EMA.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@threads_option
def likelihood(ckpt, data, method, n, batch_size, n_t, rtol, atol, hutchinson, seed, no_ema, device, no_progress):
    """Negative log-likelihood of DATA under a checkpoint, in nats per example and bits per dimension."""
    from tqdm.auto import tqdm

    from ...data import load_dataset
    from ...likelihood.bounds import elbo, vlb
    from ...likelihood.dequantize import bits_per_dim
    from ...likelihood.ode import log_likelihood
    from ...training.objective import is_consistency
    from ..pipeline import load_model

    device = _device(device)
    try:
        denoiser, process, cfg = load_model(ckpt, ema=not no_ema, device=device)
        if is_consistency(cfg.get("objective", "denoising")):
            raise ValueError(
                f"{ckpt} is a {cfg['objective']!r} model: its output is a sample, not E[x0 | x_t], so it has no "
                "probability-flow ODE to integrate; measure its teacher's likelihood, or its samples"
            )
        if cfg.get("autoencoder"):
            raise ValueError(
                f"{ckpt} is a latent model: its likelihood is that of the latents s E[z | x], not of images (the "
                "decoder adds no density; Rombach et al. 2022). In Python: pipe = td.load(run); "
                "td.log_likelihood(pipe.denoiser, pipe.process, pipe.autoencoder.encode(images))"
            )
        denoiser = denoiser.double()  # likelihoods integrate in float64; so does the network here
        x = load_dataset(data, n, generator=torch.Generator().manual_seed(seed + 1)).to(device, torch.float64)
    except (ValueError, OSError) as e:
        _fail(e)
    shape = _example_shape(cfg)
    if tuple(x.shape[1:]) != shape:
        kind = f"{shape[0]}-D points" if len(shape) == 1 else f"images {'x'.join(map(str, shape))}"
        raise click.BadParameter(
            f"the model in {ckpt} was trained on {kind} (data {cfg.get('data')!r}), but {data!r} has examples of "
            f"shape {tuple(x.shape[1:])}; give data of the model's dimension",
            param_hint="--data",
        )
    discrete = process.discrete
    if method == "vlb" and not discrete:
        raise click.BadParameter(
            f"vlb is DDPM's discrete-time bound and needs a discrete-time process (trained with --process ddpm); "
            f"this checkpoint's process is {process!r}: use --method elbo (continuous-time bound) or ode",
            param_hint="--method",
        )
    if method == "elbo" and discrete:
        raise click.BadParameter(
            f"elbo is the continuous-time bound; this checkpoint's process is discrete-time ({process!r}): use "
            "--method vlb (DDPM's discrete bound) or ode",
            param_hint="--method",
        )
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
