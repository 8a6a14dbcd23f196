"""What a network is trained to minimise: the denoising loss and its weightings over time."""

from .denoising import WEIGHTINGS, denoising_loss, sample_t, weight

__all__ = ["denoising_loss", "weight", "sample_t", "WEIGHTINGS"]
