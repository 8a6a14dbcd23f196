"""What every command shares: one-line errors, ``--threads``, ``--device``, outputs checked before the work."""

from __future__ import annotations

import click
import torch


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e)) from None


def _set_threads(ctx, param, value):
    if value is not None:
        torch.set_num_threads(value)
    return value


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    expose_value=False,
    callback=_set_threads,
    help="CPU threads for torch (torch.set_num_threads) [default: torch's, one per core]. On a CPU shared with "
    "other jobs fewer threads are faster; 1 avoids thread hand-offs altogether.",
)


def precision_option(help_text: str):
    """``--precision`` (auto, fp32, bf16, fp16): the network's arithmetic under torch.autocast, the sampler's own
    staying float32 (``app.pipeline.at_precision``)."""
    from ...names import PRECISIONS

    return click.option(
        "--precision", type=click.Choice(["auto", *PRECISIONS]), default="auto", show_default=True, help=help_text
    )


def _say_precision(precision: str) -> None:
    """One line when the network runs in reduced precision (what `sample` and `evaluate` print too)."""
    if precision != "fp32":
        click.echo(f"network in {precision} autocast (--precision fp32 for float32)")


def _available_devices() -> list[str]:
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return found + (["mps"] if mps is not None and mps.is_available() else [])


def _device(name: str) -> torch.device:
    """``name`` as a device of this machine, or a usage error naming the devices there are."""
    here = f"devices on this machine: {', '.join(_available_devices())}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise click.BadParameter(f"{name!r} is not a torch device name; {here}", param_hint="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise click.BadParameter(f"{name!r}: CUDA is not available ({why}); {here}", param_hint="--device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise click.BadParameter(f"{name!r}: no such GPU; {here}", param_hint="--device")
    if device.type not in ("cpu", "cuda") and name not in _available_devices():
        raise click.BadParameter(f"{name!r} is not available; {here}", param_hint="--device")
    return device


def _writable(path: str | None, option: str) -> None:
    """Check before the work that ``path`` can be written (at the end, after minutes of sampling)."""
    from ...utils.io import check_writable

    if path is not None:
        try:
            check_writable(path, option)
        except OSError as e:
            raise click.BadParameter(str(e), param_hint=option) from None


def _example_shape(cfg: dict) -> tuple[int, ...]:
    """The shape of one example of the checkpoint's model: (D,) for points, (C, H, H) for images."""
    from ..pipeline import example_shape

    return example_shape(cfg)
