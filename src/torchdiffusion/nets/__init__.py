"""Networks: an MLP for low-dimensional data, a U-Net for images, a U-Net encoder classifier, time embeddings."""

from .classifier import UNetClassifier
from .embeddings import FourierEmbedding, SinusoidalEmbedding, TableEmbedding
from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet", "UNetClassifier", "FourierEmbedding", "SinusoidalEmbedding", "TableEmbedding"]
