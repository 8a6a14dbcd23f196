"""`train`'s options as a TrainConfig: the --config file, the options typed after it, --set KEY=VALUE."""

from __future__ import annotations

import click


def _process_spec(process: str, schedule: str, T: int) -> dict:
    return {"name": "ddpm", "schedule": schedule, "T": T} if process == "ddpm" else {"name": process}


# What `train --data <images>` trains without --config: the U-Net and batch of configs/digits.yaml (1.1M
# parameters at 16x16; ~8 steps/s on 2 quiet cores), which suits the small built-in and 28x28 sets.
IMAGE_NET = {
    "name": "unet",
    "channels": 32,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [4],
    "dropout": 0.0,
}
IMAGE_DEFAULTS = {"batch_size": 64, "lr": 1e-3}


def _parse_overrides(ctx, param, values) -> tuple[tuple[str, object], ...]:
    """``KEY=VALUE`` strings -> (key, value parsed as YAML: numbers, true/false, null, [lists], {dicts})."""
    import yaml

    parsed = []
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE (e.g. steps=2000 or net.channels=64), got {text!r}")
        try:
            parsed.append((key.strip(), yaml.safe_load(value)))
        except yaml.YAMLError as e:
            raise click.BadParameter(f"{text!r}: the value is not valid YAML ({e})") from None
    return tuple(parsed)


def set_option(help: str):
    """The ``--set KEY=VALUE`` option (repeatable; VALUE is YAML) of the commands that build a TrainConfig."""
    return click.option("--set", "sets", multiple=True, callback=_parse_overrides, metavar="KEY=VALUE", help=help)


def _typed(ctx, name: str) -> bool:
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _train_config(ctx, config, fields, process, schedule, T, width, depth, sets=()):
    """The TrainConfig of `train`'s options: a --config file with the options typed after it, or the options alone.

    Options that could not take effect are refused rather than ignored: --schedule / --T (ddpm only),
    --width / --depth (the MLP of point data).
    """
    from ...data import is_image_spec
    from ...training.config import TrainConfig, merge_overrides

    typed = {k: v for k, v in fields.items() if _typed(ctx, k) or k == "distill"}
    base = TrainConfig.from_yaml(config, **typed, **dict(sets)) if config else None
    proc = dict(base.process) if base is not None and not _typed(ctx, "process") else {"name": process}
    for name, value in (("schedule", schedule), ("T", T)):
        if _typed(ctx, name):
            if proc["name"] != "ddpm":
                raise click.BadParameter(
                    f"--{name} applies to --process ddpm only (the discrete-time DDPM); the process here is "
                    f"{proc['name']!r}, whose noise levels are continuous curves: drop --{name} or use --process ddpm",
                    param_hint=f"--{name}",
                )
            proc[name] = value
    if proc["name"] == "ddpm" and base is None:
        proc = _process_spec("ddpm", schedule, T)
    images = is_image_spec(base.data if base is not None else fields["data"])
    net = dict(base.net) if base is not None else dict(IMAGE_NET if images else TrainConfig().net)
    for name, value in (("width", width), ("depth", depth)):
        if _typed(ctx, name):
            if net["name"] != "mlp":
                raise click.BadParameter(
                    f"--{name} sizes the MLP of point data; this run trains a {net['name']} "
                    f"({'image data' if images else 'from the config'}): set its size under net: in a --config file",
                    param_hint=f"--{name}",
                )
            net[name] = value
        elif base is None and not images:
            net[name] = value
    if base is not None:
        return TrainConfig.from_dict({**base.to_dict(), "process": proc, "net": net})
    if images:  # the batch and rate of the image net's config, unless typed
        fields = {**fields, **{k: v for k, v in IMAGE_DEFAULTS.items() if not _typed(ctx, k)}}
    cfg = TrainConfig(process=proc, net=net, **fields)
    return TrainConfig.from_dict(merge_overrides(cfg.to_dict(), dict(sets))) if sets else cfg
