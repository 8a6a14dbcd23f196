"""``torchdiffusion train-autoencoder``: the KL-regularized autoencoder of latent diffusion (Rombach et al. 2022),
checkpoints and log.csv in a run folder, and the latent scale factor measured on the training images."""

from __future__ import annotations

from pathlib import Path

import click

from ._shared import _device, _fail, threads_option
from .group import main


def _latent(ctx, param, value):
    from ...training.autoencoder import parse_latent

    try:
        return parse_latent(value)
    except ValueError as e:
        raise click.BadParameter(str(e).replace("latent must be", "expected"), ctx=ctx, param=param) from None


@main.command("train-autoencoder")
@click.option(
    "--data",
    default="digits16",
    help="Images: built-in (digits, digits16, shapes16, shapes32), or a path: an .npz, IDX file, CIFAR-10 or MNIST "
    "folder, or an image folder (with --image-size).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="Side length an image folder's images are resized to (image folders only).",
)
@click.option(
    "--latent",
    default="4x4x4",
    callback=_latent,
    help="The latent's shape CxHxW: channels x height x width, the side the image side divided by a power of 2 "
    "(16 x 16 images: 4x4x4 is a factor 4 with 4 channels).",
)
@click.option("--channels", type=click.IntRange(min=1), default=32, help="The autoencoder's base width.")
@click.option(
    "--kl-weight",
    type=click.FloatRange(min=0),
    default=1e-6,
    help="Weight of KL(q(z|x) || N(0, I)) against the pixel error summed over pixels (the paper's 1e-6).",
)
@click.option(
    "--reconstruction", type=click.Choice(["l1", "l2"]), default="l1", help="Pixel error: |x' - x| or (x' - x)^2."
)
@click.option("--steps", type=click.IntRange(min=1), default=2000, help="Training steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="Peak learning rate (Adam).")
@click.option(
    "--ema-decay",
    type=click.FloatRange(0, 1),
    default=None,
    help="EMA decay of the weights [default: no EMA].",
)
@click.option("--flip", is_flag=True, help="Random left-right flips of the batches.")
@click.option("--seed", type=int, default=0, help="Seed of initialisation, batch order, noise and the scale factor.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, help="Steps between checkpoints.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/autoencoder", help="Run directory.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last checkpoint (bit-exact with the same --steps).",
)
@click.option("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@threads_option
def train_autoencoder(data, image_size, latent, channels, kl_weight, reconstruction, steps, batch_size, lr,
                      ema_decay, flip, seed, checkpoint_every, out, resume, device, no_progress):  # fmt: skip
    """Train the autoencoder of latent diffusion on images (Rombach et al. 2022, Sec. 3 and App. G).

    A KL-regularized convolutional autoencoder (pixel error plus a small KL to N(0, I); no perceptual or adversarial
    term, so it trains on a CPU). Each checkpoint records the latent scale factor, 1 / std of latents z ~ q(z|x) of
    the training images (the paper's Sec. 4.3.2), and the reconstruction error.
    """
    from ...training.autoencoder import AutoencoderConfig
    from ...training.autoencoder import train_autoencoder as run_train
    from ...training.checkpoint import CheckpointError, find_checkpoint

    run_dir = Path(out)
    if resume and find_checkpoint(run_dir) is None and not (run_dir / "log.csv").exists():
        what = "does not exist" if not run_dir.exists() else "holds no checkpoint/ (nor a log.csv)"
        raise click.BadParameter(
            f"nothing to resume: {run_dir} {what}; check --out, or drop --resume to start a new run",
            param_hint="--resume",
        )
    _device(device)
    try:
        cfg = AutoencoderConfig(
            data=data, data_options={} if image_size is None else {"size": image_size}, latent=latent,
            channels=channels, kl_weight=kl_weight, reconstruction=reconstruction, steps=steps,
            batch_size=batch_size, lr=lr, ema_decay=ema_decay, flip=flip, seed=seed,
            checkpoint_every=checkpoint_every, device=device,
        )  # fmt: skip
        res = run_train(cfg, run_dir, resume=resume, progress=not no_progress)
    except (ValueError, TypeError, OSError, CheckpointError, ArithmeticError) as e:
        _fail(e)
    err, c = res.config["reconstruction_error"], res.config
    shape = "x".join(map(str, c["latent_shape"]))
    click.echo(
        f"trained {steps} steps: {'x'.join(map(str, c['image_shape']))} images -> {shape} latents; reconstruction "
        f"error on {c['measured_on']} training images: mean |error| {err['mae']:.4g}, mse {err['mse']:.4g} "
        f"(PSNR {'inf' if err['psnr'] is None else format(err['psnr'], '.2f')} dB)"
    )
    click.echo(f"latent scale factor {c['scale_factor']:.6g}; checkpoint in {run_dir / 'checkpoint'}")
