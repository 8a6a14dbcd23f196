"""Guidance: denoiser -> denoiser maps that steer sampling towards a condition (seed 003, "flexible conditioning").

``classifier_free`` (Ho & Salimans 2022) with a guidance interval (Kynkäänniemi et al. 2024) and rescale (Lin et
al. 2024); ``classifier_guidance`` (Dhariwal & Nichol 2021) with any noise-conditional classifier's log-probability;
``exact.py``: the exact class-conditional denoiser and classifier of a Gaussian mixture (its components are the
classes), against which every guidance method is proven. A guided denoiser is a denoiser: every sampler runs it.
"""

from .cfg import classifier_free
from .classifier import NoiseConditionalClassifier, classifier_guidance
from .exact import mixture_class_denoiser, mixture_classifier

__all__ = [
    "classifier_free",
    "classifier_guidance",
    "NoiseConditionalClassifier",
    "mixture_class_denoiser",
    "mixture_classifier",
]
