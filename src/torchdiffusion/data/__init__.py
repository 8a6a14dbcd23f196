"""Data: built-in 2-D toy distributions, user arrays (``.npy`` / ``.csv``) and images.

Images come as float32 (N, C, H, W) in [-1, 1]: the bundled 8x8 digits (no download), coloured shapes drawn
from a seed, MNIST and Fashion-MNIST IDX files, CIFAR-10 python batches, image folders and ``.npz`` arrays.
Nothing is downloaded unless ``download_images`` is called.
"""

from .arrays import SUPPORTED_SUFFIXES, load_array, load_dataset
from .image_files import (
    IMAGE_EXTENSIONS,
    load_cifar10,
    load_idx,
    load_idx_folder,
    load_image_folder,
    load_npz,
    read_image,
    read_mask,
)
from .images import DOWNLOADABLE, IMAGE_DATASETS, is_image_spec, load_digits, load_images, random_flip
from .images import download as download_images
from .shapes import COLOURS, SHAPES, draw_shapes, load_shapes, make_shapes, shape_params
from .toy import (
    LABELED_TOY_DATASETS,
    TOY_DATASETS,
    checkerboard,
    circles,
    eight_gaussians,
    eight_gaussians_mixture_params,
    make_2d,
    moons,
    pinwheel,
    swiss_roll,
)

__all__ = [
    "LABELED_TOY_DATASETS",
    "SUPPORTED_SUFFIXES",
    "TOY_DATASETS",
    "checkerboard",
    "circles",
    "eight_gaussians",
    "eight_gaussians_mixture_params",
    "load_array",
    "load_dataset",
    "make_2d",
    "moons",
    "pinwheel",
    "swiss_roll",
    "IMAGE_DATASETS",
    "is_image_spec",
    "IMAGE_EXTENSIONS",
    "DOWNLOADABLE",
    "download_images",
    "load_digits",
    "load_images",
    "load_cifar10",
    "load_idx",
    "load_idx_folder",
    "load_image_folder",
    "load_npz",
    "read_image",
    "read_mask",
    "random_flip",
    "SHAPES",
    "COLOURS",
    "make_shapes",
    "load_shapes",
    "shape_params",
    "draw_shapes",
]
