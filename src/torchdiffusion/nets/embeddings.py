"""Time (noise-level) embeddings for networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sin/cos features of a scalar (Vaswani et al. 2017; Ho et al. 2020, Sec. 4).

    Frequencies are geometric, omega_j = max_period^(-j / (half - shift)) for j = 0..half-1; ``scale``
    multiplies the input first (the Preconditioned wrapper feeds c_noise = -lam/4, of order 1; scale = 100
    spreads the frequencies over 0.01 to 100). The features are [cos, sin], or [sin, cos] with
    ``sin_first``. ``shift = 1, sin_first = True, scale = 1`` is Ho et al.'s own embedding of the integer
    step (their TF code's ``get_timestep_embedding``), which diffusers' ``Timesteps`` reproduces with
    ``flip_sin_to_cos=False, freq_shift=1`` (``interop.diffusers`` reads both settings).
    """

    name = "sinusoidal"  # its name in a net spec (names.EMBEDDINGS)

    def __init__(
        self, dim: int, max_period: float = 10_000.0, scale: float = 100.0, shift: float = 0.0, sin_first: bool = False
    ):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        half = dim // 2
        if not half - shift > 0:
            raise ValueError(f"shift must be below half the embedding dim ({half}), got {shift}")
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - shift))
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale, self.sin_first = scale, sin_first

    def forward(self, c: Tensor) -> Tensor:  # (B,) -> (B, dim)
        arg = self.scale * c.to(self.freqs.dtype)[:, None] * self.freqs[None]
        parts = [torch.sin(arg), torch.cos(arg)] if self.sin_first else [torch.cos(arg), torch.sin(arg)]
        return torch.cat(parts, dim=1)


class TableEmbedding(nn.Module):
    """A learned table of ``num`` rows, one per integer input 0..num-1, read with linear interpolation between
    rows (and clamped to the ends) so that fractional inputs are defined too.

    At an integer it is the row itself, exactly: diffusers' "learned" time embedding (an ``nn.Embedding`` of the
    integer step, ``interop.diffusers``), which also carries a preconditioned network's embedding of
    c_noise(t) at the integer steps when that network is exported.
    """

    name = "table"

    def __init__(self, dim: int, num: int = 1000):
        super().__init__()
        if num < 1:
            raise ValueError(f"num (the table's rows) must be >= 1, got {num}")
        self.weight = nn.Parameter(torch.randn(num, dim))

    def forward(self, c: Tensor) -> Tensor:  # (B,) -> (B, dim)
        c = c.to(self.weight.dtype).clamp(0, self.weight.shape[0] - 1)
        i = c.floor().long().clamp(max=self.weight.shape[0] - 2) if self.weight.shape[0] > 1 else c.long()
        frac = (c - i)[:, None]
        if self.weight.shape[0] == 1:
            return self.weight[i]
        return self.weight[i] * (1 - frac) + self.weight[i + 1] * frac


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
