"""Time (noise-level) embeddings for networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sin/cos features of a scalar (Vaswani et al. 2017; Ho et al. 2020, Sec. 4).

    Frequencies are geometric from 1 to 1/max_period; ``scale`` multiplies the input first
    (the Preconditioned wrapper feeds c_noise = -lam/4, of order 1; scale = 100 spreads
    the frequencies over 0.01 to 100).
    """

    name = "sinusoidal"  # its name in a net spec (names.EMBEDDINGS)

    def __init__(self, dim: int, max_period: float = 10_000.0, scale: float = 100.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale

    def forward(self, c: Tensor) -> Tensor:  # (B,) -> (B, dim)
        arg = self.scale * c.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (Tancik et al. 2020; Song et al. 2021, NCSN++)."""

    name = "fourier"

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        g = torch.Generator().manual_seed(seed)  # fixed, so a checkpoint rebuilds the same features
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, c: Tensor) -> Tensor:  # (B,) -> (B, dim)
        arg = 2 * math.pi * c.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def check_embedding(time_embedding) -> None:
    """A time embedding is a module class called with its width (SinusoidalEmbedding, FourierEmbedding)."""
    if not (isinstance(time_embedding, type) and issubclass(time_embedding, nn.Module)):
        raise TypeError(
            f"time_embedding must be a module class such as SinusoidalEmbedding or FourierEmbedding, got "
            f"{time_embedding!r}; names become embeddings through torchdiffusion.names.EMBEDDINGS"
        )
