"""What the data decide about a run: load them as the config names them, then fill in the network's input
shape, sigma_data and the data box."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..core import support
from ..data import IMAGE_DATASETS, load_dataset, load_images
from .config import TrainConfig


def is_image_spec(spec: str) -> bool:
    name = spec.lower()
    return spec in IMAGE_DATASETS or Path(spec).is_dir() or name.endswith((".npz", "-ubyte", "-ubyte.gz"))


def load_training_data(config: TrainConfig, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
    """``(data, labels or None)``: images (N, C, H, W) via ``data.load_images``, else points (N, D)."""
    if is_image_spec(config.data):
        return load_images(config.data, **config.data_options)
    if config.data_options:
        raise ValueError(f"data_options {config.data_options} apply to image data; {config.data!r} is not an image set")
    return load_dataset(config.data, config.n_data, generator=generator), None


def resolve_config(config: TrainConfig, data: Tensor, labels: Tensor | None) -> TrainConfig:
    """Fill in what the data decide: the net's input shape (and classes); if unset, sigma_data = std(data) and
    data_box = the data's bounding box (``support.data_box``, which sampling a loaded checkpoint clamps x0_hat to)."""
    net = dict(config.net)
    if data.ndim == 2:
        filled = {"dim": data.shape[1]}
    elif data.ndim == 4 and data.shape[2] == data.shape[3]:
        filled = {"in_channels": data.shape[1], "image_size": data.shape[2]}
    else:
        shape = tuple(data.shape)
        raise ValueError(f"data {config.data!r}: expected points (N, D) or square images (N, C, H, H), got {shape}")
    if config.class_conditional:
        if labels is None:
            raise ValueError(f"class_conditional needs labels, but the data {config.data!r} have none")
        filled["num_classes"] = int(labels.max()) + 1
    for key, value in filled.items():
        if net.get(key, value) != value:
            raise ValueError(f"net spec has {key}={net[key]} but the data {config.data!r} give {key}={value}")
        net[key] = value
    sigma_data = config.sigma_data if config.sigma_data is not None else data.double().std().item()
    box = list(config.data_box) if config.data_box is not None else list(support.data_box(data))
    return TrainConfig.from_dict({**config.to_dict(), "net": net, "sigma_data": float(sigma_data), "data_box": box})
