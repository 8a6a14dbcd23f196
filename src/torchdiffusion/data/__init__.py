"""Data: built-in 2-D toy distributions and loaders for user arrays (``.npy`` / ``.csv``)."""

from .arrays import SUPPORTED_SUFFIXES, load_array, load_dataset
from .toy import (
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
]
