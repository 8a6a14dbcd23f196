"""Drawing a checkpoint's samples for `sample` and `evaluate`: class labels (--class / --labels), the batch loop."""

from __future__ import annotations

import click
import numpy as np
import torch


def _class_labels(cfg: dict, ckpt: str, klass: int | None, labels: str | None, n: int):
    """``(labels (n,) or None, description)`` for --class / --labels (or their default) on this checkpoint.

    A class-conditional net was trained on labels 0..K-1 only; its extra "unconditional" embedding K was
    never trained, so sampling it without labels gives noise. By default such a model gets labels spread
    evenly, i mod K; a model without classes refuses labels.
    """
    classes = cfg["net"].get("num_classes")
    if klass is None and labels is None:
        if not classes:
            return None, ""
        return torch.arange(n) % classes, f"labels i mod {classes} (all classes evenly; choose with --class/--labels)"
    option = "--class" if labels is None else "--labels"
    if klass is not None and labels is not None:
        raise click.BadParameter("give --class K or --labels L1,L2,..., not both", param_hint=option)
    if not classes:
        raise click.BadParameter(
            f"{ckpt} is not class-conditional (trained without labels, class_conditional: false); drop {option}",
            param_hint=option,
        )
    if klass is not None:
        values = torch.tensor([klass])
    elif labels.endswith(".npy"):
        try:
            arr = np.load(labels, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"cannot read {labels}: {e}", param_hint=option) from None
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise click.BadParameter(
                f"{labels} must hold a 1-D array of integer labels, got {arr.dtype} of shape {arr.shape}",
                param_hint=option,
            )
        values = torch.from_numpy(arr.astype(np.int64))
    else:
        try:
            values = torch.tensor([int(v) for v in labels.split(",")])
        except ValueError:
            raise click.BadParameter(
                f"{labels!r} is not a comma-separated list of integers (e.g. 0,3,7) or a .npy file", param_hint=option
            ) from None
    bad = values[(values < 0) | (values >= classes)]
    if len(bad):
        raise click.BadParameter(
            f"label {int(bad[0])} is out of range: this model knows classes 0..{classes - 1}", param_hint=option
        )
    if len(values) > n:
        raise click.BadParameter(f"{len(values)} labels for {n} samples (--n); give at most {n}", param_hint=option)
    how = f"class {klass}" if klass is not None else f"labels {labels} (label i = L[i mod {len(values)}])"
    return values.repeat(-(-n // len(values)))[:n], how


def _draw(sampler, denoiser, process, shape, n, batch_size, ts, gen, device, labels, no_progress, kwargs, record):
    """``n`` samples of ``shape`` in batches of ``batch_size``: each batch draws its prior noise and then runs
    the sampler, both from ``gen``, so one seed and batch size always give the same samples (another batch
    size consumes the stream in another order). ``record`` (or None) is called on the first batch's start
    and returns a sampler callback that records it. The loop is ``pipeline.draw_samples``, which
    ``td.load(run).sample`` runs too: one seed gives the same samples here and in Python."""
    from ...names import get_sampler
    from ..pipeline import draw_samples

    fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    name = sampler if isinstance(sampler, str) else sampler.__name__.removeprefix("sample_")
    return draw_samples(fn, denoiser, process, shape, n, ts, batch_size=batch_size, generator=gen,
                        device=device, labels=labels, progress=not no_progress, desc=f"{name} ({n} samples)",
                        watch_first=record, **kwargs)  # fmt: skip
