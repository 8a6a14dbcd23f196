"""Shared fixtures: every noise process of the library, with readable ids.

A test that takes ``process`` runs for all of them; ``continuous_process`` only for the
continuous-time ones. A test file may shadow either name with its own ``parametrize``.
"""

import pytest
import torch

from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, SubVP

CONTINUOUS = [VP(), SubVP(), VE(), Cosine(), EDM(), Flow()]
DISCRETE = [
    Discrete.from_schedule(schedule, T) for schedule in ("linear", "cosine", "sigmoid", "quadratic") for T in (1000, 50)
]
DISCRETE_IDS = [
    f"Discrete-{schedule}-T{T}" for schedule in ("linear", "cosine", "sigmoid", "quadratic") for T in (1000, 50)
]
CONTINUOUS_IDS = [type(p).__name__ for p in CONTINUOUS]


@pytest.fixture(params=CONTINUOUS + DISCRETE, ids=CONTINUOUS_IDS + DISCRETE_IDS)
def process(request):
    return request.param


@pytest.fixture(params=CONTINUOUS, ids=CONTINUOUS_IDS)
def continuous_process(request):
    return request.param


@pytest.fixture(scope="module")
def single_thread():
    """Run a module with one intra-op thread: its tensors are small, and several threads per
    process (worse under pytest-xdist, whose workers share the cores) can make each op orders of
    magnitude slower. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    # One intra-op thread per test process: `make test` runs two xdist workers on two cores, and
    # the tensors here are small, so more threads only contend (see ``single_thread`` above).
    torch.set_num_threads(1)
