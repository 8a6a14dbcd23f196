"""What a network is trained to minimise: the denoising loss and its weightings over time."""

from .denoising import denoising_loss, sample_t
from .weightings import ELBO, LIKELIHOOD, MIN_SNR, SIMPLE, SNR, MinSNR, Weighting

__all__ = ["denoising_loss", "sample_t", "Weighting", "SIMPLE", "ELBO", "LIKELIHOOD", "SNR", "MinSNR", "MIN_SNR"]
