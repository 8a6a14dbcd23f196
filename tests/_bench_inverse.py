"""What the anchor-adapter tests of ``make bench-inverse`` share: loading a benchmarks/ module and the check that a
posterior sampler moved the observed coordinate towards y."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
F64 = torch.float64


def bench_module(name: str):
    """A benchmarks/ module; they import each other by plain name, so benchmarks/ goes on sys.path."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def toward_y(problem, x: torch.Tensor) -> None:
    """The observed coordinate's sample mean is closer to y than the prior mean is, by more than 4 standard errors."""
    y = float(problem.y[0, 0])
    w, means = problem.prior.weights.to(F64), problem.prior.means.to(F64).reshape(len(problem.prior.weights), -1)
    prior_mean = float((w / w.sum()) @ means[:, 0])  # 0 up to rounding: the ring is symmetric
    col = x[:, 0].to(F64)
    m, se = float(col.mean()), float(col.std()) / math.sqrt(len(col))
    assert abs(m - y) < abs(prior_mean - y) - 4 * se, (m, y, se)
