"""The command line: ``torchdiffusion train | distill | sample | likelihood | evaluate | demo | samplers |
train-classifier | train-autoencoder | inpaint | outpaint | colorize | upscale | edit | interpolate |
export-diffusers``.

Names given on the command line become objects through ``torchdiffusion.names`` (processes, networks,
samplers, targets, weightings, grids), whose keys are also the ``--help`` choice lists; everything else is the
Python API. Errors are reported as one clear line, found
before the work where they can be (devices, outputs, shapes, labels), and never leave a
half-written file behind. Idle OpenMP threads spin briefly, then sleep (``GOMP_SPINCOUNT=3000``, set by
``torchdiffusion/_openmp.py`` before torch loads); ``--threads`` sets torch's thread count.

One module per command (``train``, ``sample``, ``likelihood``, ``evaluate``, ``demo``, ``samplers``,
``train_classifier``, ``train_autoencoder``; ``restore`` holds inpaint / outpaint / colorize / upscale, ``edit``
edit / interpolate), each registering itself on the click group of ``group.py``. What they share: ``_shared.py``
(errors, threads, devices, outputs) and ``_sampling.py`` (class labels, the batch loop); ``_train_config.py`` turns
train's options into a TrainConfig. Heavy imports stay inside the command functions, so ``--help`` starts fast.
"""

from __future__ import annotations

from ...names import PREDICTIONS as TARGETS
from . import (  # noqa: F401  (registers the commands on main)
    demo,
    distill,
    edit,
    evaluate,
    export,
    likelihood,
    restore,
    sample,
    samplers,
    train,
    train_autoencoder,
    train_classifier,
)
from ._train_config import IMAGE_DEFAULTS, IMAGE_NET
from .group import main

__all__ = ["IMAGE_DEFAULTS", "IMAGE_NET", "TARGETS", "main"]
