"""Networks: an MLP for low-dimensional data, a U-Net for images, time embeddings."""

from .embeddings import FourierEmbedding, SinusoidalEmbedding
from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet", "FourierEmbedding", "SinusoidalEmbedding"]
