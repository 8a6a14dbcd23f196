"""Shared fixtures: every noise process of the library, with readable ids.

A test that takes ``process`` runs for all of them; ``continuous_process`` only for the
continuous-time ones. A test file may shadow either name with its own ``parametrize``.
"""

import pytest
import torch

from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, SubVP
from torchdiffusion.names import SCHEDULES

CONTINUOUS = [VP(), SubVP(), VE(), Cosine(), EDM(), Flow()]
DISCRETE = [
    Discrete.from_schedule(SCHEDULES[schedule], T)
    for schedule in ("linear", "cosine", "sigmoid", "quadratic")
    for T in (1000, 50)
]
DISCRETE_IDS = [
    f"Discrete-{schedule}-T{T}" for schedule in ("linear", "cosine", "sigmoid", "quadratic") for T in (1000, 50)
]
CONTINUOUS_IDS = [type(p).__name__ for p in CONTINUOUS]

# The one statistical tolerance of the suite: a Monte Carlo estimate must lie within Z of its own
# standard errors of the exact value. Under the CLT a correct implementation misses by chance with
# two-sided probability p = erfc(Z / sqrt 2) per check: 5.7e-7 at Z = 5, 2.0e-9 at Z = 6. Sample
# variances have a skewed (chi-square) law, heavier in its right tail: at n = 500 the miss
# probability is 2.4e-6 at Z = 5 and 3.4e-8 at Z = 6. The fast suite makes about 10^3 such
# comparisons (941 uses of Z, counted one per element of a vector check, plus a few dozen written as
# k * se), so the expected number of false alarms, if its seeds changed or a platform's rounding
# moved a sample, is at most ~1e-3 at Z = 5 and ~3e-5 at Z = 6. Z = 6 makes it negligible; the
# price is power: a biased mean or variance is caught once the bias exceeds about 6 (not 5)
# standard errors, and each test sizes n so that the defect it guards against does.
Z = 6.0


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator with a fixed seed: every random draw in the suite is reproducible.
    Test modules import this module by name (``from conftest import Z, gen``): ``tests/`` has no
    ``__init__.py``, so pytest's default import mode puts it on ``sys.path`` and registers this file
    as the module ``conftest``, the same object the import returns (as for ``mixture_checks``)."""
    return torch.Generator().manual_seed(seed)


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
