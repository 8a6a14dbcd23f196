"""MMPS: moment matching posterior sampling (Rozet, Andry, Lanusse & Louppe 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.measurements import Measurement
from ..core.predictions import x0_shift
from ..core.process import NoiseProcess
from ..samplers import _common
from ..samplers.ddim import ddim_step
from ._common import observation

__all__ = ["sample_mmps", "mmps_x0", "mmps_update", "conjugate_gradient"]


def conjugate_gradient(matvec, b: Tensor, iterations: int) -> Tensor:
    """Solve S u = b for a symmetric positive definite S given as ``matvec``, per example of the batch (the first
    axis), by ``iterations`` steps of conjugate gradients from u = 0 (Hestenes & Stiefel 1952). In exact arithmetic
    M steps solve an M-dimensional system exactly; fewer give the best solution in the Krylov space. An example
    meeting a direction of non-positive curvature stops there (S from a trained network may be indefinite)."""
    dims = tuple(range(1, b.ndim))

    def dot(p, q):
        return (p * q).sum(dims, keepdim=True)

    u, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), dot(r, r)
    for _ in range(iterations):
        Sp = matvec(p)
        pSp = dot(p, Sp)
        # an example whose direction has no positive curvature (a learned Jacobian need not be positive definite) or
        # whose residual is 0 stops where it is: a step along it would not decrease the quadratic
        go = (pSp > 0) & (rr > 0)
        step = torch.where(go, rr / torch.where(go, pSp, 1.0), 0.0)
        u, r = u + step * p, r - step * Sp
        rr_new = dot(r, r)
        p = torch.where(go, r + rr_new / torch.where(go, rr, 1.0) * p, p)
        rr = torch.where(go, rr_new, rr)
    return u


def mmps_x0(denoiser, x: Tensor, t: Tensor, alpha: float, sigma: float, measurement: Measurement, y: Tensor,
            cg_iterations: int, **cond) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(E[x0 | x_t, y] under MMPS's Gaussian p(x0 | x_t), the unguided x0_hat), both detached.

    Tweedie's second moment gives the covariance of p(x0 | x_t) from the denoiser's Jacobian J = d x0_hat / d x_t:
    V = (sigma^2 / alpha) J (Rozet et al. 2024, Eq. 9; exact for the exact denoiser). With p(x0 | x_t) ~
    N(x0_hat, V), y = A x0 + sigma_y n is Gaussian given x_t, and the conditional mean is the Gaussian update

        E[x0 | x_t, y] = x0_hat + V A^T (A V A^T + sigma_y^2 I)^{-1} (y - A x0_hat)        (their Eqs. 10-11),

    the solve by ``conjugate_gradient`` with V v as a vector-Jacobian product (J^T v: the same as J v for the exact
    denoiser, whose Jacobian is symmetric). Cost: one forward pass and cg_iterations + 1 backward passes.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0_hat = denoiser(xg, t, **cond)
        return mmps_update(x0_hat, xg, alpha, sigma, measurement, y, cg_iterations), x0_hat.detach()


def mmps_update(x0_hat: Tensor, xg: Tensor, alpha: float, sigma: float, measurement: Measurement, y: Tensor,
                cg_iterations: int) -> Tensor:  # fmt: skip
    """``mmps_x0``'s Gaussian update of x0_hat = denoiser(xg) (with its graph to xg), detached; the graph is kept
    for the caller's own backward passes."""
    A, sy2 = measurement.operator, float(measurement.sigma_y) ** 2
    with torch.enable_grad():

        def cov(v: Tensor) -> Tensor:
            """V v = (sigma^2 / alpha) J^T v: Tweedie's second moment has the factor of Tweedie's first, the x0 shift
            of a score shift (``x0_shift``); here the score shift is J^T v."""
            return x0_shift(torch.autograd.grad(x0_hat, xg, grad_outputs=v, retain_graph=True)[0], alpha, sigma)

        def S(v: Tensor) -> Tensor:  # (A V A^T + sigma_y^2 I) v
            return A(cov(A.adjoint(v))) + sy2 * v

        u = conjugate_gradient(S, y - A(x0_hat.detach()), cg_iterations)
        shift = cov(A.adjoint(u))  # V A^T u: the x0 shift of MMPS's score J^T A^T u
    return (x0_hat.detach() + shift).detach()


def sample_mmps(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    measurement: Measurement,
    *,
    cg_iterations: int = 1,
    eta: float = 1.0,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Rozet et al. 2024 (Sec. 3, "moment matching posterior sampling"): the DDIM step with ``eta`` (1: DDPM's
    ancestral step) from the conditional x0 estimate of ``mmps_x0``, which replaces the isotropic guess of PiGDM
    (r_t^2 I) and the point estimate of DPS by the covariance of p(x0 | x_t) that the denoiser itself implies.

    For a Gaussian prior that covariance is exact, so with the exact denoiser the guided x0 is the exact
    E[x0 | x_t, y]; for a mixture it matches the first two moments of p(x0 | x_t) (not its modes), so the samples
    are not exact: the weights of the posterior's components are the usual casualty (``bench_inverse.py``). Any
    linear A and any sigma_y >= 0 (at sigma_y = 0, A V A^T must be invertible: true at every sigma > 0 for a model
    that keeps some variance in the measured directions); the final denoise is also guided. NFE: one call per
    step (with 1 + cg_iterations backward passes) and the final one.

    Args: as ``samplers.sample_ddim``; measurement: ``Measurement(A, y, sigma_y)``; cg_iterations: conjugate
        gradient steps of the solve (Rozet et al. use 1-3; the measurement's rank M makes it exact for the exact
        denoiser). Default 1: a trained network's Jacobian is neither symmetric nor positive definite, and more
        steps amplify that (on the digits U-Net, 3 steps left observed pixels up to 2.0 off and some samples
        saturated, 1 step 0.025); on the exact oracle 1 step is within ~30% of 10 (``bench_inverse.py``).
    """
    if not isinstance(cg_iterations, int) or cg_iterations < 1:
        raise ValueError(f"cg_iterations must be an int >= 1, got {cg_iterations!r}")
    y = observation(measurement, x, noiseless=None)
    x, g = _common.setup(process, x, ts)
    x = x.detach()
    nfe = 0
    for i in range(g.n):
        a, sig = g.alpha[i], g.sigma[i]
        x0, _ = mmps_x0(denoiser, x, g.time(i, x), a, sig, measurement, y, cg_iterations, **cond)
        nfe += 1
        x = ddim_step(g, i, x, x0, eta, generator)
        _common.report(callback, i, g, x, x0, nfe)
    if final_denoise and g.sigma[-1] > 0:
        x, _ = mmps_x0(denoiser, x, g.time(-1, x), g.alpha[-1], g.sigma[-1], measurement, y, cg_iterations, **cond)
    return x
