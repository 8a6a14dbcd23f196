"""Straightness (Liu et al. 2023, Eq. 5) against its closed form on Gaussian data.

For x0 ~ N(mu, v I) the flow of the linear interpolation x_t = (1 - t) x0 + t z is x_t = (1 - t) mu + r(t) z with
r(t) = sqrt((1 - t)^2 v + t^2), so S = E|z|^2 / d * integral_0^1 (r'(t) - 1 + sqrt v)^2 dt. At v = 1:
r' = (2t - 1) / r and the integral is 2 - pi / 2 (substitute u = 2t - 1: integral of u^2 / (1 + u^2) over [-1, 1]).
A point mass (v -> 0) has straight trajectories: S -> 0.
"""

import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import VP, Flow, GaussianMixture
from torchdiffusion.evaluation.straightness import straightness


@pytest.mark.parametrize("process", [Flow(), VP()], ids=["Flow", "VP"])
def test_straightness_of_a_unit_gaussian_is_two_minus_half_pi(process):
    n, d = 4000, 2
    z = torch.randn(n, d, generator=gen(0), dtype=torch.float64)
    mix = GaussianMixture([1.0], [[0.5, -0.3]], [[1.0, 1.0]])
    got = straightness(mix.denoiser(process), process, z, steps=200)
    exact_per_unit = 2 - math.pi / 2
    # S = c * mean |z|^2 / d, whose relative standard error is sqrt(2 / (n d)); the Riemann sum over 200 steps
    # of a smooth integrand adds O(1/200) relative (bounded here by 2 / 200).
    scale = float(z.pow(2).mean())
    tol = exact_per_unit * scale * (Z * math.sqrt(2 / (n * d)) + 2 / 200)
    assert abs(got - exact_per_unit * scale) < tol


def test_a_point_mass_flows_straight():
    z = torch.randn(500, 2, generator=gen(1), dtype=torch.float64)
    mix = GaussianMixture([1.0], [[0.5, -0.3]], [[1e-8, 1e-8]])
    point = straightness(mix.denoiser(Flow()), Flow(), z, steps=50)
    spread = GaussianMixture([1.0], [[0.5, -0.3]], [[1.0, 1.0]])
    assert point < 1e-3 * straightness(spread.denoiser(Flow()), Flow(), z, steps=50)
