"""What the bounds and the ODE likelihood share: float64, Gaussian log-densities, per-example conditioning."""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


def gauss_logp(x: Tensor, mean, var: float) -> Tensor:
    """log N(x; mean, var I) summed over dims 1.. of (B, D) float64 tensors."""
    return -0.5 * ((x - mean) ** 2 / var).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi * var)


def index_cond(cond: dict, B: int, index) -> dict:
    """Per-example conditioning tensors (leading dim B) indexed like the examples; the rest as is."""
    return {k: v[index] if isinstance(v, Tensor) and v.ndim and v.shape[0] == B else v for k, v in cond.items()}
