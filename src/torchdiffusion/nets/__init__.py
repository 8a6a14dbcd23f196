"""Networks: an MLP for low-dimensional data, time embeddings."""

from .embeddings import EMBEDDINGS, FourierEmbedding, SinusoidalEmbedding
from .mlp import MLP

NETS = {"mlp": MLP}

__all__ = ["MLP", "NETS", "EMBEDDINGS", "FourierEmbedding", "SinusoidalEmbedding"]
