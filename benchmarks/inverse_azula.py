"""azula's posterior samplers on the exact Gaussian-mixture inverse problems (the azula anchor of ``bench_inverse.py``).

azula (v0.11.1, https://github.com/probabilists/azula) splits a diffusion model into a noise schedule, a denoiser
returning a posterior object for X given x_t, and a sampler. Its ``azula.guidance`` offers eight posterior methods for
y = A x + noise; each runs here the way its docstrings and tutorials show, with the exact prior denoiser in place of a
network and only the step count fitted to the NFE budget.

Common setup (what azula's users write):
    schedule   ``VPSchedule()`` (alpha_t = exp(t^2 log 1e-3), sigma_t = sqrt(1 - alpha_t^2 + 1e-6)), the schedule of
               azula's README; the samplers' default uniform time grid from t = 1 to 0 and ``sampler.init(shape)``
               (x_1 ~ N(0, alpha_1^2 + sigma_1^2)) as the start.
    denoiser   ``ExactDenoiser``: ``exact_x0`` (E[x0 | x_t] of the prior mixture, differentiable) returned as
               ``GaussianPosterior(mean, var)`` with var = sigma_t^2 / (alpha_t^2 + sigma_t^2), the variance azula's own
               ADM wrapper reports for a network without a learned variance. No azula 0.11.1 guidance method reads
               ``var``; they all use the mean (and its Jacobian through autograd).
    flattening examples are flattened to (B, D): the Krylov solvers of MMPS, DiffPIR and JFPS (``azula.linalg.solve``)
               act on the last axis, so azula's guidance tutorial flattens images too (``init((1, 3 * 256 * 256))``).
    A, y       A(x) = x A~^T with A~ the operator's dense matrix without its zero rows (a mask keeps only its observed
               entries, as ``A(x) = x[..., mask]``), y the matching observed numbers; zero rows would give 0 / 0 in
               TMPD and a zero twist variance in TDS. y is passed expanded to the batch, so the noise RePaint draws
               with ``randn_like(y)`` differs between samples.
    dtype      float32 (azula's default); ``exact_x0`` computes in float64 internally.
    seed       azula draws from the global RNG (``randn_like``, ``torch.multinomial``), so ``run`` seeds it inside
               ``torch.random.fork_rng``.
    clipping   no azula 0.11.1 code path used here clips or clamps x: the only clip is DDIM's variance fraction
               clip(eta tau, 0, 1), which cannot bind for 0 <= eta <= 1 (tau is in [0, 1]). (The ADM plugin's
               ``clip_mean`` belongs to that network wrapper, which is not used.)

Methods (label: class, paper; sampler; calls per step; differentiates through the denoiser?):
    dps       ``DPSSampler(zeta=1.0)``, Chung et al. 2023 (ICLR), "Diffusion Posterior Sampling for General Noisy
              Inverse Problems", Alg. 1: a DDPM step minus zeta grad_{x_t} ||y - A E[x0|x_t]|| (sigma_y is not
              used: zeta absorbs it); 1 call; yes.
              azula takes the norm of the residual of the WHOLE batch, ||R|| with R (n, M), so in a batch of n each
              example's step is divided by ||R|| ~ sqrt(n) times its own residual norm. Chung et al.'s step normalizes
              each example by its own residual (their images are sampled one at a time, as in azula's tutorial). To
              give every example that step in one batched call, ``run`` hands ``DPSSampler`` the observation 0 and
              the "operator" x -> -sum_i ||y - A x_i||: azula's ||0 - (-s)|| is then s = sum_i ||r_i||, whose
              gradient for example i is that of ||r_i|| alone: the one-example call, up to float rounding
              (``tests/test_bench_inverse_anchors.py`` checks a step against it). ``run_dps`` offers the two other
              calls: ``"loop"`` (one example per sampler call, the same steps about 100x slower) and ``"batch"``
              (azula's plain whole-batch call, each step ||r_i|| / ||R||, about 1 / sqrt(n), of the intended one).
    pgdm      ``PGDMSampler`` (DDIM, eta = 0), Song et al. 2023 (ICLR), "Pseudoinverse-Guided Diffusion Models for
              Inverse Problems": the noiseless guidance J^T (A^+ y - A^+ A E[x0|x_t]) scaled by alpha_s alpha_t
              (azula's PGDM does not use sigma_y); A^+ the dense pseudo-inverse of A~; 1 call; yes (a
              vector-Jacobian product).
    mmps      ``MMPSDenoiser(cov_y=sigma_y^2 I, solver="gmres", iterations=1)`` in ``DDIMSampler`` (eta = 0), Rozet et
              al. 2024 (NeurIPS), "Learning Diffusion Priors from Observations by Expectation Maximization": E[x0|x_t]
              + Cov A^T (Sigma_y + A Cov A^T)^{-1} (y - A E[x0|x_t]) with Tweedie's Cov = sigma_t^2 / alpha_t J,
              the solve by one GMRES iteration; 1 call; yes (J v products).
    tmpd      ``TMPDenoiser(var_y=sigma_y^2)`` in ``DDIMSampler``, Boys et al. 2023 (arXiv:2310.06721), "Tweedie
              Moment Projected Diffusions for Inverse Problems": the MMPS update with A Cov A^T replaced by the
              diagonal of its row sums, A Cov A^T 1; 1 call; yes. Those row sums include the off-diagonal
              covariances and can be near 0 or negative (on mix8d-r2 and img8-box they reach -0.02 and -0.19), where
              the update divides by them and overshoots: that is azula's TMPD, kept as is.
    diffpir   ``DiffPIRDenoiser(var_y, lmbda=10, solver="gmres", iterations=1)`` in ``DDIMSampler``, Zhu et al. 2023
              (CVPR Workshops), "Denoising Diffusion Models for Plug-and-Play Image Restoration": the data proximal
              step x = argmin ||y - A x||^2 / sigma_y^2 + lambda / rho_t ||x - E[x0|x_t]||^2, rho_t = sigma_t^2 /
              alpha_t^2, by one GMRES iteration; 1 call; no (only A is differentiated).
    jfps      ``JFPSDenoiser(cov_y=sigma_y^2 I, cov_x=Sigma_x, solver="cg", iterations=1)`` in ``DDIMSampler``; azula's
              Jacobian-free variant of MMPS (no paper cited in azula): the prior covariance Sigma_x replaces the
              Jacobian. Sigma_x is the prior's exact covariance as a ``FullCovariance`` (what
              ``FullCovariance.from_data`` converges to on training data); 1 call; no.
    tds       ``TDSSampler``, Wu et al. 2023 (NeurIPS), "Practical and Asymptotically Exact Conditional Sampling in
              Diffusion Models", Alg. 1: sequential Monte Carlo with the n samples as its particles, twist log N(y; A
              E[x0|x_t], sigma_y^2 + (sigma_t / alpha_t)^2 diag(A A^T)) as in azula's mixture guidance notebook, ending
              at t = 0 (that notebook stops at t = 0.1, which leaves noise on the samples); 1 call; yes.
    repaint   ``RePaintSampler(iterations=3)`` (DDIM, eta = 0), Lugmayr et al. 2022 (CVPR), "RePaint: Inpainting using
              Denoising Diffusion Probabilistic Models", Alg. 1 with r = 3 resamplings of jump length 1; noiseless masks
              only; 3 calls per step, so steps = nfe // 3; no.
The ``DDIMSampler`` around the denoiser-wrapping methods (mmps, tmpd, diffpir, jfps) keeps its default eta = 0, as in
azula's guidance tutorial (``DDIMSampler(cond_denoiser, steps=64)``); its mixture notebook (on the hmc branch, not
released) uses eta = 1, which changes the SW2 here by -36% to +13% depending on case and method, with no consistent
sign, except TMPD, 1.3x to 3x worse where it overshoots (ring2d-s05, mix8d-r2, img8-box at NFE 20 and 100, n = 1000).

Noise level sigma_y = 0 (the noiseless masks): azula documents no rule. DiffPIR divides by var_y, so it gets
``VAR_Y_FLOOR`` = 1e-6 (sigma_y = 1e-3, the schedule's own sigma_min); MMPS, JFPS, TMPD and TDS run with var_y = 0:
their divisors are A Cov A^T (MMPS, JFPS, positive definite on the observed rows), A Cov A^T 1 (TMPD, see above; a
floor of 1e-6 would not change its sign) and the twist's (sigma_t / alpha_t)^2 diag(A A^T) >= 1e-6 (TDS), and all
runs at sigma_y = 0 were finite.

Steps: one denoiser call per step except RePaint (3), and no extra final call, so steps = nfe (RePaint: nfe // 3) and
``run`` returns the calls made per sample (counted by ``ExactDenoiser``; a batch call counts once).
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import torch
from inverse_problems import Problem, exact_x0
from torch import Tensor

F64 = torch.float64
DTYPE = torch.float32
VAR_Y_FLOOR = 1e-6

METHODS: dict[str, str] = {
    "dps": "DPSSampler, zeta 1 (Chung et al. 2023), each example normalized by its own residual",
    "pgdm": "PGDMSampler, DDIM eta 0 (Song et al. 2023)",
    "mmps": "MMPSDenoiser, GMRES 1 iteration, in DDIMSampler (Rozet et al. 2024)",
    "tmpd": "TMPDenoiser in DDIMSampler (Boys et al. 2023)",
    "diffpir": "DiffPIRDenoiser, lambda 10, GMRES 1 iteration, in DDIMSampler (Zhu et al. 2023)",
    "jfps": "JFPSDenoiser, prior covariance, CG 1 iteration, in DDIMSampler (azula)",
    "tds": "TDSSampler, n particles, Gaussian twist (Wu et al. 2023)",
    "repaint": "RePaintSampler, 3 resamplings per step (Lugmayr et al. 2022), noiseless masks",
}
CALLS_PER_STEP = {"repaint": 3}

__all__ = ["METHODS", "available", "applies", "run", "run_dps", "ExactDenoiser"]


def available() -> bool:
    """Whether azula (its guidance module) imports."""
    if importlib.util.find_spec("azula") is None:
        return False
    try:
        importlib.import_module("azula.guidance")
    except Exception:  # installed but broken (e.g. a torch it does not support): not available
        return False
    return True


def applies(method: str, problem: Problem) -> bool:
    """RePaint needs a noiseless mask (y = m * x, its docstring); every other method takes any linear A and sigma_y."""
    _check(method)
    if method == "repaint":
        return problem.is_mask and problem.sigma_y == 0
    return True


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown azula method {method!r}; choose from {list(METHODS)}")


def _denoiser_class():
    from azula.denoise import Denoiser, GaussianPosterior

    class ExactDenoiser(Denoiser):
        """E[x0 | x_t] of the problem's prior on flattened examples (B, D), as azula's ``GaussianPosterior``.

        ``calls`` counts forward calls (a batch call counts once).
        """

        def __init__(self, problem: Problem, schedule):
            super().__init__()
            self.problem, self.schedule, self.calls = problem, schedule, 0

        def forward(self, x_t: Tensor, t: Tensor, **kwargs) -> GaussianPosterior:
            self.calls += 1
            alpha, sigma = self.schedule(t)
            B = x_t.shape[0]
            mean = exact_x0(self.problem, x_t.reshape(B, *self.problem.shape), alpha, sigma).reshape(x_t.shape)
            var = (sigma**2 / (alpha**2 + sigma**2)).to(x_t.dtype)
            return GaussianPosterior(mean=mean, var=var.reshape(-1, *[1] * (x_t.ndim - 1)).expand_as(x_t))

    return ExactDenoiser


def ExactDenoiser(problem: Problem, schedule):  # noqa: N802 - a class built lazily (azula is optional)
    """The exact prior denoiser as an ``azula.denoise.Denoiser`` (see ``_denoiser_class``)."""
    return _denoiser_class()(problem, schedule)


class _Measurement:
    """A~ (M', D) without the operator's zero rows, the matching y (1, M'), A~^+ and helpers, in ``DTYPE``."""

    def __init__(self, problem: Problem):
        M = problem.operator.matrix()
        rows = M.abs().sum(1) > 0
        self.A_mat = M[rows]
        self.y = problem.y.reshape(1, -1)[:, rows].to(DTYPE)
        self.pinv = torch.linalg.pinv(self.A_mat)
        self.row_norm2 = (self.A_mat**2).sum(1).to(DTYPE)  # diag(A A^T)
        self.var_y = problem.sigma_y**2

    def A(self, x: Tensor) -> Tensor:
        return x @ self.A_mat.to(x).T

    def A_inv(self, y: Tensor) -> Tensor:
        return y @ self.pinv.to(y).T


def _prior_covariance(problem: Problem):
    """The prior's exact covariance sum_k w_k (C_k + m_k m_k^T) - m m^T as azula's ``FullCovariance``."""
    from azula.linalg.covariance import FullCovariance

    p = problem.prior
    w, m, C = p.weights.to(F64), p.means.to(F64).reshape(len(p.weights), -1), p.covariances.to(F64)
    mean = w @ m
    cov = (w[:, None, None] * (C + m[:, :, None] * m[:, None, :])).sum(0) - mean[:, None] * mean[None, :]
    L, Q = torch.linalg.eigh((cov + cov.T) / 2)
    return FullCovariance(Q.to(DTYPE), L.to(DTYPE))


def _sampler(method: str, problem: Problem, steps: int, n: int, dps_norm: str = "example"):
    """The azula sampler of ``method`` (see the module docstring) and its exact denoiser. ``dps_norm``: "example"
    (each example's DPS step normalized by its own residual) or "batch" (azula's plain call: by the whole batch's)."""
    from azula.guidance import (
        DiffPIRDenoiser,
        DPSSampler,
        JFPSDenoiser,
        MMPSDenoiser,
        PGDMSampler,
        RePaintSampler,
        TDSSampler,
        TMPDenoiser,
    )
    from azula.linalg.covariance import IsotropicCovariance
    from azula.noise import VPSchedule
    from azula.sample import DDIMSampler

    den = ExactDenoiser(problem, VPSchedule())
    meas = _Measurement(problem)
    y = meas.y.expand(n, -1).contiguous()
    kw = {"steps": steps, "silent": True}
    if method == "dps" and dps_norm == "batch":
        return DPSSampler(den, y=y, A=meas.A, **kw), den
    if method == "dps":

        def minus_norms(x_hat: Tensor) -> Tensor:  # -sum_i ||y - A x_hat_i||, so that ||0 - it|| = sum_i ||r_i||
            return -torch.linalg.vector_norm(meas.y - meas.A(x_hat), dim=-1).sum().reshape(1)

        return DPSSampler(den, y=torch.zeros(1, dtype=DTYPE), A=minus_norms, **kw), den
    if method == "pgdm":
        return PGDMSampler(den, y=y, A=meas.A, A_inv=meas.A_inv, **kw), den
    if method == "mmps":
        cond = MMPSDenoiser(den, y=y, A=meas.A, cov_y=IsotropicCovariance(meas.var_y))
        return DDIMSampler(cond, **kw), den
    if method == "tmpd":
        return DDIMSampler(TMPDenoiser(den, y=y, A=meas.A, var_y=meas.var_y), **kw), den
    if method == "diffpir":
        cond = DiffPIRDenoiser(den, y=y, A=meas.A, var_y=max(meas.var_y, VAR_Y_FLOOR))
        return DDIMSampler(cond, **kw), den
    if method == "jfps":
        cov_x = _prior_covariance(problem)
        cond = JFPSDenoiser(den, y=y, A=meas.A, cov_y=IsotropicCovariance(meas.var_y), cov_x=cov_x)
        return DDIMSampler(cond, **kw), den
    if method == "tds":
        from azula.denoise import GaussianPosterior

        def twist(x_hat: Tensor, t: Tensor) -> Tensor:
            """log N(y; A x_hat, sigma_y^2 + t^2 diag(A A^T)) per measured number, t = sigma_t / alpha_t."""
            var = meas.var_y + t**2 * meas.row_norm2
            return GaussianPosterior(meas.A(x_hat), var).log_prob(y[: x_hat.shape[0]])

        return TDSSampler(den, twist=twist, **kw), den
    if method == "repaint":
        mask = problem.mask().reshape(1, -1) > 0
        y_full = problem.y.reshape(1, -1).to(DTYPE).expand(n, -1).contiguous()
        return RePaintSampler(den, y=y_full, mask=mask, **kw), den
    raise AssertionError(method)  # pragma: no cover - _check ran


def _steps(method: str, nfe: int) -> int:
    steps = nfe // CALLS_PER_STEP.get(method, 1)
    if steps < 1:
        raise ValueError(f"azula {method}: nfe = {nfe} is below one step ({CALLS_PER_STEP.get(method, 1)} calls)")
    return steps


def run(method: str, problem: Problem, nfe: int, n: int, seed: int) -> tuple[Tensor, int]:
    """n posterior samples (n, *problem.shape) in float32 from azula's ``method``, and the denoiser calls per sample.

    Methods that differentiate through the denoiser (a backward pass per call, not counted): dps, pgdm, mmps, tmpd,
    tds. diffpir and jfps differentiate only A; repaint none. dps normalizes each example's step by its own residual
    (see the module docstring and ``run_dps``).
    """
    _check(method)
    if not applies(method, problem):
        raise ValueError(f"azula {method} does not apply to {problem.name} (RePaint needs a noiseless mask)")
    if method == "dps":
        return run_dps(problem, nfe, n, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sampler, den = _sampler(method, problem, _steps(method, nfe), n)
        x0 = sampler(sampler.init((n, math.prod(problem.shape)), dtype=DTYPE))
    return x0.reshape(n, *problem.shape), den.calls


def run_dps(problem: Problem, nfe: int, n: int, seed: int, call: str = "example") -> tuple[Tensor, int]:
    """azula's DPS, n samples and the calls per sample. ``call``: "example" (one batched call, each example's step
    normalized by its own residual), "loop" (one sampler call per example: the same step, n times slower) or "batch"
    (azula's plain batched call: every step normalized by the residual norm of the whole batch)."""
    if call not in ("example", "loop", "batch"):
        raise ValueError(f"call must be 'example', 'loop' or 'batch', got {call!r}")
    steps, D = _steps("dps", nfe), math.prod(problem.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if call == "loop":
            sampler, den = _sampler("dps", problem, steps, 1, dps_norm="batch")  # a batch of one example
            x1, out = sampler.init((n, D), dtype=DTYPE), []
            for i in range(n):
                den.calls = 0
                out.append(sampler(x1[i : i + 1]))
            x0 = torch.cat(out)
        else:
            sampler, den = _sampler("dps", problem, steps, n, dps_norm="batch" if call == "batch" else "example")
            x0 = sampler(sampler.init((n, D), dtype=DTYPE))
    return x0.reshape(n, *problem.shape), den.calls
