"""Denoising losses and their weightings, all expressed once in x0 units.

A network predicting ``target`` (eps, x0, v, score, flow) is trained on

    L = E_t E_{x0, eps} [ w(t) * |out - target|^2 / D ],

where ``w`` is a weighting. Weightings are defined by their weight on |x0_hat - x0|^2 and
converted to the target's units with ``x0_error_scale`` (|dx0/dout|^2), so "elbo" means the
same bound whichever target the network predicts:

    simple      1 on the network's raw output: 1 in the target's own units (Ho et al. 2020, Eq. 14 for
                eps); for an output-preconditioned network (``sigma_data`` given, ``Preconditioned(...,
                predicts=target)``) 1 on its raw F, i.e. 1 / c_out^2 on |out - target|^2 (Karras et al.
                2022, Eq. 8; ``parameterization.output_scalings``)
    elbo        the true variational bound. Discrete: (snr(t-1) - snr(t)) / 2 per step
                (seed 003, "Final objective function"; Ho et al. 2020 Eq. 5); at t = 1 the
                decoder term 1 / (2 beta_1) (Gaussian decoder of variance beta_1).
                Continuous: -snr'(t) / 2 (Kingma et al. 2021, Eq. 17), divided by the density of
                the training times (``sample_t``) so that their mean is an unbiased estimate of the
                integral over [t_min, t_max].
    likelihood  g^2(t)/2 on the score error (Song et al. 2021b, "likelihood weighting"); equals
                -snr'(t)/2 in x0 units, the continuous bound.
    snr         snr(t) in x0 units = the eps loss; NCSN's lambda(sigma) = sigma^2 on the score
                (Song & Ermon 2019, Eq. 6) is this same weight ("sigma2" is an alias).
    min_snr     min(snr(t), gamma) in x0 units (Hang et al. 2023, gamma = 5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.predictions import PREDICTIONS, output_scalings, x0_error_scale, x0_to
from ..core.process import NoiseProcess, _as_t

__all__ = ["WEIGHTINGS", "weight", "sample_t", "denoising_loss"]

WEIGHTINGS = ("simple", "elbo", "likelihood", "snr", "sigma2", "min_snr")


def _x0_weight(weighting: str, process: NoiseProcess, t: Tensor, gamma: float) -> Tensor:
    """The weight on |x0_hat - x0|^2 (float64, shaped like t)."""
    if weighting in ("snr", "sigma2"):
        return process.snr(t)
    if weighting == "min_snr":
        return process.snr(t).clamp(max=gamma)
    if weighting == "likelihood" or (weighting == "elbo" and process.n_steps is None):
        # -snr'(t) = alpha^2 g^2 / sigma^4 (derivative of alpha^2/sigma^2 with f, g^2 of the process)
        a, s = process.alpha(t), process.sigma(t)
        return 0.5 * a**2 * process.g2(t) / s**4 / process.train_t_density(t)
    # elbo on a discrete process: the sum over t = 1..T, estimated with uniform integer t.
    snr_t, snr_prev = process.snr(t), process.snr(t - 1)
    decoder = 0.5 / process.sigma(t) ** 2  # 1 / (2 beta_1): at t = 1, alpha_bar_1 = 1 - beta_1
    per_step = torch.where(t <= 1, decoder, 0.5 * (snr_prev - snr_t))
    return per_step * process.n_steps


def weight(
    weighting: str,
    process: NoiseProcess,
    t: Tensor,
    target: str = "eps",
    gamma: float = 5.0,
    *,
    sigma_data: float | None = None,
) -> Tensor:
    """Weight w(t) on |out - target|^2 for a network predicting ``target`` (float64, shape of t).

    ``sigma_data``: the output is preconditioned (``Preconditioned(..., sigma_data, predicts=target)``), out =
    c_skip x + c_out F; "simple" is then unit weight on F. The other weightings, defined in x0 units, stay.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
    t = _as_t(t)
    if weighting == "simple":
        if sigma_data is None or target == "eps":  # eps: c_out = 1
            return torch.ones_like(t)
        _, c_out = output_scalings(target, process, t, t, sigma_data)  # t as x: float64, shaped like t
        return c_out**-2  # |out - target|^2 = c_out^2 |F - F_target|^2
    return _x0_weight(weighting, process, t, gamma) * x0_error_scale(target, process, t)


def sample_t(process: NoiseProcess, n: int, *, generator=None, device=None) -> Tensor:
    """Training times: uniform integers 1..T on a discrete process, else ``process.train_t`` of uniform u
    (uniform on [t_min, t_max] except where the process says otherwise: EDM's log-normal sigma)."""
    if process.n_steps is not None:
        return torch.randint(1, process.n_steps + 1, (n,), generator=generator, device=device).to(torch.float64)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return process.train_t(u)


def denoising_loss(
    model,
    process: NoiseProcess,
    x0: Tensor,
    *,
    target: str = "eps",
    weighting: str = "simple",
    gamma: float = 5.0,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    sigma_data: float | None = None,
    **cond,
) -> Tensor:
    """Per-example denoising loss (B,) (Ho et al. 2020, Algorithm 1; seed 003, "Training DDPM").

    Args:
        model: callable (x_t, t (B,), **cond) -> prediction of ``target``, shaped like x0.
        process: the noise process.
        x0: clean data (B, ...).
        target: one of PREDICTIONS ("eps", "x0", "v", "score", "flow").
        weighting: one of WEIGHTINGS (see the module docstring).
        generator: source of t and noise (ignored for those given).
        sigma_data: ``model`` is ``Preconditioned(..., sigma_data, predicts=target)``: see ``weight``.
    Returns:
        w(t) |out - target|^2 averaged over the non-batch dims, shape (B,).
    """
    if target not in PREDICTIONS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(PREDICTIONS)}")
    B = x0.shape[0]
    if t is None:
        t = sample_t(process, B, generator=generator, device=x0.device)
    t = _as_t(t).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = process.perturb(x0, t, noise)
    goal = x0_to(target, process, xt, t, x0, noise)
    out = model(xt, t.to(x0.dtype), **cond)
    err = ((out - goal) ** 2).flatten(1).mean(1)
    return weight(weighting, process, t, target, gamma, sigma_data=sigma_data).to(err) * err
