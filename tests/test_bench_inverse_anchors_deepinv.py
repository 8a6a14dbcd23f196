"""Smoke tests of the deepinv and diffusers adapters of ``benchmarks/bench_inverse.py`` (``inverse_deepinv.py``,
``inverse_diffusers.py``): other libraries' posterior samplers driven by the exact mixture denoiser.

Skipped where the library is missing: diffusers with ``pytest.importorskip``; deepinv through the adapter's
``available()``, since deepinv only imports with the adapter's torchvision stand-in.

Checked on the 2-D ring with the first coordinate observed at y = 0.6 cos(pi / 4) (prior mean of that coordinate:
0): every method returns (n, *shape) finite samples, makes at most ``nfe`` denoiser calls, and moves the sample mean
of the observed coordinate from the prior mean toward y by more than 4 standard errors of that mean (a sampler that
ignored y, or pushed away from it, fails). Also: the torchvision stand-in is gone from ``sys.modules`` once deepinv
is imported; deepinv's physics is the problem's operator (to float64 rounding); a seed fixes a run; RePaint's call
count follows diffusers' documented jump schedule, it keeps the observed entries (its mask is 1 = keep), and its
x0 clip to [-1, 1] does not bind.
"""

import importlib
import importlib.util
import sys

import pytest
import torch

from _bench_inverse import bench_module, toward_y

F64 = torch.float64
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(F64).eps

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def problems():
    return bench_module("inverse_problems").make_problems(["ring2d-s05", "ring2d-s0", "mix8d-r2", "img8-sr2"])


# -- deepinv ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinv_adapter():
    mod = bench_module("inverse_deepinv")
    if not mod.available():
        pytest.skip("deepinv is not installed (or does not import): pip install deepinv --no-deps")
    return mod


def _stubs_in_sys_modules(mod) -> list[str]:
    return [k for k, v in list(sys.modules.items()) if mod._is_stub(v)]


def test_torchvision_stub_only_while_importing():
    mod = bench_module("inverse_deepinv")
    if "torchvision" in sys.modules:
        pytest.skip("a real torchvision is loaded: the stand-in is not used")
    with mod._torchvision_stub():
        import torchvision  # the stand-in

        assert mod._is_stub(torchvision)
        assert sys.modules["torchvision.transforms.functional"] is torchvision.transforms.functional
        with pytest.raises(RuntimeError, match="torchvision is not installed"):
            torchvision.transforms.functional.rotate(torch.zeros(1, 1, 2, 2), 90)
    assert "torchvision" not in sys.modules and not _stubs_in_sys_modules(mod)


def test_torchvision_stub_gone_after_deepinv_import(dinv_adapter):
    assert "deepinv" in sys.modules
    assert not _stubs_in_sys_modules(dinv_adapter)
    if importlib.util.find_spec("torchvision") is None:
        assert not [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]


@pytest.mark.parametrize("name", ["ring2d-s05", "mix8d-r2", "img8-sr2"])
def test_deepinv_physics_is_the_operator(dinv_adapter, problems, name):
    """A, A^T and A^+ of the DecomposablePhysics (built from the SVD) equal the problem's, to float64 rounding."""
    p = problems[name]
    phys = dinv_adapter.physics_of(p)
    x = torch.randn(5, *p.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = p.operator(x)
    tol = 100 * p.operator.in_dim * EPS64  # a few SVD products of size D, entries O(1)
    assert torch.allclose(phys.A(x), y, rtol=0, atol=tol)
    assert torch.allclose(phys.A_adjoint(y), p.operator.adjoint(y), rtol=0, atol=tol)
    assert torch.allclose(phys.A_dagger(y), p.operator.pinv(y), rtol=0, atol=tol)


def test_deepinv_unknown_method(dinv_adapter, problems):
    with pytest.raises(ValueError, match="choose from"):
        dinv_adapter.applies("dinv-nope", problems["ring2d-s05"])
    assert not dinv_adapter.applies("dinv-pigdm", problems["ring2d-s0"])  # sigma_y = 0: deepinv divides 0 by 0
    with pytest.raises(ValueError, match="does not apply"):
        dinv_adapter.run("dinv-pigdm", problems["ring2d-s0"], 20, 10, 0)


DINV_METHODS = [
    "dinv-dps",
    "dinv-diffpir",
    "dinv-ddrm",
    "dinv-dps-annealed",
    "dinv-pigdm",
    "dinv-mmps",
    "dinv-ald",
    "dinv-scoresde",
    "dinv-ilvr",
]


def test_deepinv_methods_listed(dinv_adapter):
    assert list(dinv_adapter.METHODS) == DINV_METHODS


@pytest.mark.parametrize("method", DINV_METHODS)
def test_deepinv_method_on_ring(dinv_adapter, problems, method):
    p, nfe, n = problems["ring2d-s05"], 20, 1000
    x, calls = dinv_adapter.run(method, p, nfe, n, seed=0)
    assert x.shape == (n, *p.shape)
    assert bool(torch.isfinite(x).all())
    assert 0 < calls <= nfe
    toward_y(p, x)


def test_deepinv_seed_fixes_the_run(dinv_adapter, problems):
    p = problems["ring2d-s05"]
    for method in ("dinv-ddrm", "dinv-scoresde"):  # the global RNG, and a generator plus y's re-noising
        a, _ = dinv_adapter.run(method, p, 5, 50, seed=3)
        b, _ = dinv_adapter.run(method, p, 5, 50, seed=3)
        c, _ = dinv_adapter.run(method, p, 5, 50, seed=4)
        assert torch.equal(a, b) and not torch.equal(a, c)


# -- diffusers ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rp_adapter():
    pytest.importorskip("diffusers")
    return bench_module("inverse_diffusers")


@pytest.mark.parametrize("steps", [1, 9, 10, 11, 20, 21, 30, 45, 100])
def test_repaint_calls_follow_the_jump_schedule(rp_adapter, steps):
    """diffusers' set_timesteps jumps back at t = 0, j, 2j, ... < N - j, each time (n - 1) x j re-done steps."""
    jl, jn = 10, 10
    assert rp_adapter.repaint_calls(steps, jl, jn) == steps + (jn - 1) * jl * len(range(0, steps - jl, jl))


@pytest.mark.parametrize("nfe", [1, 20, 250])
def test_repaint_steps_fit_the_budget(rp_adapter, nfe):
    steps = rp_adapter.repaint_steps(nfe)
    assert rp_adapter.repaint_calls(steps) <= nfe < rp_adapter.repaint_calls(steps + 1)


def test_repaint_applies_to_noiseless_masks_only(rp_adapter, problems):
    assert rp_adapter.applies("diffusers-repaint", problems["ring2d-s0"])
    assert not rp_adapter.applies("diffusers-repaint", problems["ring2d-s05"])  # noisy
    assert not rp_adapter.applies("diffusers-repaint", problems["mix8d-r2"])  # not a mask
    with pytest.raises(ValueError, match="choose from"):
        rp_adapter.run("repaint", problems["ring2d-s0"], 20, 10, 0)
    with pytest.raises(ValueError, match="does not apply"):
        rp_adapter.run("diffusers-repaint", problems["img8-sr2"], 20, 10, 0)


def test_repaint_on_ring(rp_adapter, problems):
    p, nfe, n = problems["ring2d-s0"], 250, 1000  # 30 steps, 2 jump points: 210 calls
    x, calls = rp_adapter.run("diffusers-repaint", p, nfe, n, seed=0)
    assert x.shape == (n, *p.shape)
    assert bool(torch.isfinite(x).all())
    assert 0 < calls <= nfe
    toward_y(p, x)
    # the kept entry is y at the end (the last step has alpha_bar_prev = 1), in float32: mask 1 = keep
    y = float(p.y[0, 0])
    assert float((x[:, 0] - y).abs().max()) <= 4 * EPS32 * abs(y)
    assert float(x[:, 1].abs().mean()) > 0.3  # the hidden entry is generated (the modes are at +-0.42), not y's 0


def test_repaint_clip_does_not_bind(rp_adapter):
    """clip_sample (x0 clipped to [-1, 1]) is left on: the exact x0 never reaches the clip on these problems."""
    p = bench_module("inverse_problems").make_problems(["img8-box"])["img8-box"]
    _, calls, max_x0 = rp_adapter.repaint(p, 10, 200, seed=0)  # t = 900, 800, ..., 0: no jump
    assert calls == 10
    assert max_x0 < 1
