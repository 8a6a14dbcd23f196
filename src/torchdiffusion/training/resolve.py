"""What the data decide about a run: load them as the config names them, then fill in the network's input
shape, sigma_data and the data box."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import support
from ..data import IMAGE_DATASETS, LABELED_TOY_DATASETS, is_image_spec, load_dataset, load_images, make_2d
from .config import TrainConfig


def load_training_data(config: TrainConfig, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
    """``(data, labels or None)``: images (N, C, H, W) via ``data.load_images``, else points (N, D).

    A class-conditional run on a labeled built-in 2-D set (``data.LABELED_TOY_DATASETS``) gets each point's
    component as its label; the points are those an unconditional run draws (the same random numbers).
    """
    if config.autoencoder is not None:
        if not is_image_spec(config.data):
            raise ValueError(
                f"a latent model (autoencoder={config.autoencoder!r}) trains on images, not {config.data!r}"
            )
        return encode_images(config.autoencoder, *load_images(config.data, **config.data_options))
    if is_image_spec(config.data):
        return load_images(config.data, **config.data_options)
    if config.data_options:
        raise ValueError(f"data_options {config.data_options} apply to image data; {config.data!r} is not an image set")
    if config.class_conditional and config.data in LABELED_TOY_DATASETS:
        return make_2d(config.data, config.n_data, generator=generator, return_labels=True)
    return load_dataset(config.data, config.n_data, generator=generator), None


def encode_images(autoencoder: str, images: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The training data of a latent model: the scaled latents scale_factor * E[z | x] of ``images`` under the
    ``train-autoencoder`` run ``autoencoder`` (Rombach et al. 2022, Sec. 3: the diffusion model learns p(z)), and
    the labels unchanged. The means of q(z | x) (not draws) keep the data set fixed: with the paper's small KL
    weight q is nearly a point mass, its standard deviation far below the latents' spread."""
    from .autoencoder import encode_dataset, load_autoencoder

    ae, meta = load_autoencoder(autoencoder)
    if tuple(images.shape[1:]) != tuple(meta["image_shape"]):
        raise ValueError(
            f"the autoencoder {autoencoder} encodes images of shape {tuple(meta['image_shape'])}, but the data are "
            f"{tuple(images.shape[1:])}: train on the data it was trained on ({meta.get('data')!r})"
        )
    return encode_dataset(ae, images, float(meta["scale_factor"])), labels


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
            with_labels = ", ".join(sorted(LABELED_TOY_DATASETS))
            raise ValueError(
                f"class_conditional needs labels, but the data {config.data!r} have none; labeled data: the "
                f"2-D sets {with_labels}, the images {', '.join(sorted(IMAGE_DATASETS))}, MNIST / CIFAR-10 files"
            )
        # A labeled 2-D set's classes are its components, all of them even if a small draw misses one.
        toy_classes = LABELED_TOY_DATASETS.get(config.data) if data.ndim == 2 else None
        filled["num_classes"] = toy_classes or int(labels.max()) + 1
    if config.super_resolution:
        f = config.super_resolution
        if data.ndim != 4 or data.shape[2] % f:
            raise ValueError(
                f"super_resolution={f} pools images by {f} x {f}; the data {config.data!r} of shape "
                f"{tuple(data.shape[1:])} are not images whose size is a multiple of {f}"
            )
        filled["cond_channels"] = data.shape[1]  # the low-resolution image's channels, concatenated to x_t
    for key, value in filled.items():
        if net.get(key, value) != value:
            raise ValueError(f"net spec has {key}={net[key]} but the data {config.data!r} give {key}={value}")
        net[key] = value
    sigma_data = config.sigma_data if config.sigma_data is not None else data.double().std().item()
    box = list(config.data_box) if config.data_box is not None else list(support.data_box(data))
    return TrainConfig.from_dict({**config.to_dict(), "net": net, "sigma_data": float(sigma_data), "data_box": box})
