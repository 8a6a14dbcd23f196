"""MMPS, moment matching posterior sampling (Rozet et al. 2024): the conjugate-gradient solve, and the proof that
for a Gaussian prior the moment-matched x0 is the exact E[x0 | x_t, y], so that the sampler is then DDPM run on the
exact posterior's denoiser (``GaussianMixture.conditional_denoiser``)."""

from __future__ import annotations

import pytest
import torch

from conftest import gen
from torchdiffusion import VP, Cosine, GaussianMixture, grid_lam, sample_ddim
from torchdiffusion.core.measurements import Dense, Downsample, Mask, Measurement
from torchdiffusion.inverse import sample_mmps
from torchdiffusion.inverse.mmps import conjugate_gradient, mmps_x0

F64 = torch.float64
EPS = torch.finfo(F64).eps


def test_conjugate_gradient_is_exact_in_m_steps():
    """In exact arithmetic CG solves an M x M SPD system in M steps; in float64 its error is about M eps cond(S) |u|
    (here cond = 500), allowed 4 times over."""
    g = gen(0)
    M, B = 6, 4
    Q, _ = torch.linalg.qr(torch.randn(B, M, M, generator=g, dtype=F64))
    S = Q @ torch.diag_embed(torch.linspace(1.0, 500.0, M, dtype=F64).expand(B, M)) @ Q.mT
    b = torch.randn(B, M, generator=g, dtype=F64)
    u = conjugate_gradient(lambda v: (S @ v[..., None])[..., 0], b, M)
    torch.testing.assert_close(u, torch.linalg.solve(S, b), rtol=0, atol=4 * 500 * M * EPS * float(u.abs().max()))


def _gaussian():
    g = gen(1)
    D = 5
    L = torch.randn(D, D, generator=g, dtype=F64) / D**0.5
    # a diagonal GaussianMixture with one component: a Gaussian prior, its exact denoiser linear in x_t
    return GaussianMixture([1.0], torch.randn(1, D, generator=g, dtype=F64), 0.2 + torch.rand(1, D, generator=g)), L


@pytest.mark.parametrize("sigma_y", [0.0, 0.1])
@pytest.mark.parametrize("process", [VP(), Cosine()], ids=["vp", "cosine"])
def test_the_moment_matched_x0_of_a_gaussian_is_the_exact_conditional_mean(sigma_y, process):
    prior, L = _gaussian()
    A = Dense(L[:3])
    meas = Measurement.observe(A, prior.sample(1, generator=gen(2)), sigma_y, generator=gen(3))
    exact = prior.conditional_denoiser(process, meas)
    x = torch.randn(16, 5, generator=gen(4), dtype=F64)
    for t in (0.05, 0.3, 0.8):
        tt = torch.full((16,), t, dtype=F64)
        a, s = (float(v) for v in process.at(torch.tensor(t, dtype=F64), torch.zeros(1, dtype=F64)))
        y = meas.y.expand(16, -1)
        got, _ = mmps_x0(prior.denoiser(process), x, tt, a, s, meas, y, cg_iterations=3)  # M = 3 rows: exact
        want = exact(x, tt)
        # two routes to the same Gaussian update: autograd VJPs and CG against the exact posterior's Cholesky;
        # each rounds at D eps cond(S) |x0| with cond(A V A^T + sigma_y^2) below ~1e2 here, allowed 20x over
        torch.testing.assert_close(got, want, rtol=0, atol=1e4 * EPS * (1 + float(want.abs().max())))


@pytest.mark.parametrize(
    "op", [Mask(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])), Downsample(2, shape=(1, 2, 4))], ids=["mask", "pool"]
)
def test_on_a_gaussian_it_is_ddpm_on_the_exact_posterior(op):
    """sample_mmps(prior's denoiser) and sample_ddim(eta = 1) with the exact conditional denoiser take the same steps
    from the same noise: equal to the rounding of the linear algebra over the steps."""
    D = op.in_dim
    prior = GaussianMixture([1.0], torch.zeros(1, D, dtype=F64), torch.linspace(0.2, 0.9, D, dtype=F64)[None],
                            op.in_shape)  # fmt: skip
    meas = Measurement.observe(op, prior.sample(1, generator=gen(5)), 0.05, generator=gen(6))
    p = VP()
    x = p.prior_sample((64, *op.in_shape), generator=gen(7), dtype=F64)
    ts = grid_lam(p, 30)
    a = sample_mmps(prior.denoiser(p), p, x, ts, meas, cg_iterations=D, generator=gen(8))
    b = sample_ddim(prior.conditional_denoiser(p, meas), p, x, ts, eta=1.0, generator=gen(8))
    # the same 30 steps and noise; per step the two x0's differ by the rounding of the CG solve (D eps cond, cond of
    # A V A^T up to ~1e3 at the last, small-sigma step), carried through contracting DDPM updates: 1e6 eps covers it
    torch.testing.assert_close(a, b, rtol=0, atol=1e6 * EPS)


def test_bad_input_is_refused():
    prior, L = _gaussian()
    meas = Measurement(Dense(L[:2]), torch.zeros(1, 2, dtype=F64), 0.1)
    x = torch.randn(4, 5, dtype=F64)
    with pytest.raises(ValueError, match="cg_iterations must be an int >= 1"):
        sample_mmps(prior.denoiser(VP()), VP(), x, grid_lam(VP(), 3), meas, cg_iterations=0)
    with pytest.raises(ValueError, match="the operator takes"):
        sample_mmps(prior.denoiser(VP()), VP(), torch.randn(4, 3, dtype=F64), grid_lam(VP(), 3), meas)
