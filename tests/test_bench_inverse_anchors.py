"""Smoke tests of the inverse-problem anchors of ``benchmarks/bench_inverse.py`` (the other libraries' posterior
samplers, driven by the exact mixture denoiser). Each adapter is skipped where its library is not installed
(``pip install -e '.[compare]'``).

What is checked is the glue, on the 2-D ring with the first coordinate observed at y = 0.6 cos(pi / 4) (prior mean
of that coordinate: 0): every method returns (n, *shape) finite samples, makes at most ``nfe`` denoiser calls, and
moves the sample mean of the observed coordinate from the prior mean toward y, by more than 4 standard errors of
that mean (a sampler that ignored y, or pushed away from it, fails). For azula, also: its measurement A~ (the
operator without zero rows) is the operator, and the per-example DPS call takes each example's one-example step.
"""

import math

import pytest
import torch

from _bench_inverse import bench_module, toward_y

F64 = torch.float64

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


# -- azula --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def azula_adapter():
    pytest.importorskip("azula")
    return bench_module("inverse_azula")


@pytest.fixture(scope="module")
def ring_problems():
    return bench_module("inverse_problems").make_problems(["ring2d-s05", "ring2d-s0"])


AZULA_METHODS = ["dps", "pgdm", "mmps", "tmpd", "diffpir", "jfps", "tds", "repaint"]


@pytest.mark.parametrize("method", AZULA_METHODS)
def test_azula_method_on_ring(azula_adapter, ring_problems, method):
    assert set(AZULA_METHODS) == set(azula_adapter.METHODS)
    # RePaint assumes y = m * x exactly: the noiseless ring; everything else on the noisy one
    name = "ring2d-s0" if method == "repaint" else "ring2d-s05"
    problem = ring_problems[name]
    assert azula_adapter.applies(method, problem)
    n, nfe = 96, 12
    x, calls = azula_adapter.run(method, problem, nfe, n, seed=0)
    assert x.shape == (n, *problem.shape)
    assert bool(torch.isfinite(x).all())
    assert 1 <= calls <= nfe
    toward_y(problem, x)


def test_azula_applies_and_refuses(azula_adapter, ring_problems):
    noisy = ring_problems["ring2d-s05"]
    assert not azula_adapter.applies("repaint", noisy)  # sigma_y > 0
    with pytest.raises(ValueError, match="noiseless mask"):
        azula_adapter.run("repaint", noisy, 12, 4, seed=0)
    with pytest.raises(ValueError, match="choose from"):
        azula_adapter.applies("ddrm", noisy)


@pytest.mark.parametrize("name", ["ring2d-s05", "mix8d-r2"])
def test_azula_dps_step_is_the_one_example_step(azula_adapter, name, monkeypatch):
    """The batched per-example DPS call (residual sum_i ||r_i||) takes, for every example, the step of azula's DPS run
    on that example alone; azula's plain batched call (residual ||R||) does not. Noise is zeroed so steps compare."""
    problem = bench_module("inverse_problems").make_problems([name])[name]
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # the DDPM noise term, identical in both
    B, D = 6, math.prod(problem.shape)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 0.5
    together, _ = azula_adapter._sampler("dps", problem, 10, B, dps_norm="example")
    alone, _ = azula_adapter._sampler("dps", problem, 10, 1, dps_norm="batch")
    plain, _ = azula_adapter._sampler("dps", problem, 10, B, dps_norm="batch")
    t, s = together.timesteps[3], together.timesteps[4]
    got = together.step(x, t, s)
    want = torch.cat([alone.step(x[i : i + 1], t, s) for i in range(B)])
    M = int(azula_adapter._Measurement(problem).y.shape[1])
    # float32 rounding of the length-(D + M) reductions, the only thing that differs between batch and one example
    tol = 8 * (D + M) * torch.finfo(torch.float32).eps * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol
    # the plain batched call scales example i's guidance (the step minus the unguided zeta = 0 step) by
    # ||r_i|| / ||R|| < 1, ||R||^2 = sum_i ||r_i||^2 (1 / sqrt(6) for equal residuals): shorter, here by over 20 %
    plain_guidance = plain.step(x, t, s) - _unguided(plain, x, t, s)
    own_guidance = want - _unguided(plain, x, t, s)
    assert float(plain_guidance.norm()) < 0.8 * float(own_guidance.norm())


def _unguided(sampler, x, t, s):
    zeta, sampler.zeta = sampler.zeta, 0.0
    try:
        return sampler.step(x, t, s)
    finally:
        sampler.zeta = zeta


def test_azula_measurement_is_the_operator(azula_adapter):
    """A~ x (zero rows dropped) equals the operator's output on its nonzero rows, to float64 rounding."""
    problems = bench_module("inverse_problems").make_problems(["img8-box", "img8-sr2", "mix8d-r2"])
    g = torch.Generator().manual_seed(0)
    for p in problems.values():
        meas = azula_adapter._Measurement(p)
        x = torch.randn(5, *p.shape, generator=g, dtype=F64)
        full = p.operator(x).reshape(5, -1)
        rows = p.operator.matrix().abs().sum(1) > 0
        got = meas.A(x.reshape(5, -1))
        D = math.prod(p.shape)
        assert torch.allclose(got, full[:, rows], rtol=0, atol=4 * D * torch.finfo(F64).eps * float(x.abs().max()))
        assert torch.equal(meas.y.to(F64), p.y.reshape(1, -1)[:, rows].to(meas.y.dtype).to(F64))
