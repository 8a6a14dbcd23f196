"""Weightings of the denoising loss over time, as objects, each defined once in x0 units.

A network predicting ``target`` (eps, x0, v, score, flow) is trained on

    L = E_t E_{x0, eps} [ w(t) * |out - target|^2 / D ],

where ``w`` is a weighting. Weightings are defined by their weight on |x0_hat - x0|^2 and
converted to the target's units with ``Prediction.x0_error_scale`` (|dx0/dout|^2), so ``ELBO`` means the
same bound whichever target the network predicts:

    SIMPLE      1 on the network's raw output: 1 in the target's own units (Ho et al. 2020, Eq. 14 for
                eps); for an output-preconditioned network (``sigma_data`` given, ``Preconditioned(...,
                predicts=target)``) 1 on its raw F, i.e. 1 / c_out^2 on |out - target|^2 (Karras et al.
                2022, Eq. 8; ``Prediction.output_scalings``)
    ELBO        the true variational bound. Discrete: (snr(t-1) - snr(t)) / 2 per step
                (seed 003, "Final objective function"; Ho et al. 2020 Eq. 5); at t = 1 the
                decoder term 1 / (2 beta_1) (Gaussian decoder of variance beta_1); summed over
                t = 1..T, i.e. divided by the probability 1/T of each training t.
                Continuous: -snr'(t) / 2 (Kingma et al. 2021, Eq. 17), divided by the density of
                the training times (``process.train_t_density``) so that their mean is an unbiased estimate of the
                integral over [t_min, t_max].
    LIKELIHOOD  g^2(t)/2 on the score error (Song et al. 2021b, "likelihood weighting"); equals
                -snr'(t)/2 in x0 units, the continuous bound.
    SNR         snr(t) in x0 units = the eps loss; NCSN's lambda(sigma) = sigma^2 on the score
                (Song & Ermon 2019, Eq. 6) is this same weight (the name "sigma2" is an alias).
    MinSNR(g)   min(snr(t), gamma) in x0 units (Hang et al. 2023, gamma = 5: ``MIN_SNR``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.predictions import EPS, SCORE, Prediction
from ..core.process import NoiseProcess, as_time

__all__ = ["Weighting", "SIMPLE", "ELBO", "LIKELIHOOD", "SNR", "MinSNR", "MIN_SNR"]


class Weighting:
    """A weight over time: ``weighting(process, t, target, sigma_data=None)`` is w(t) on |out - target|^2 for a
    network predicting ``target`` (float64, shape of t); subclasses define ``x0_weight``, w on |x0_hat - x0|^2."""

    name = ""

    def x0_weight(self, process: NoiseProcess, t: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(
        self, process: NoiseProcess, t, target: Prediction = EPS, *, sigma_data: float | None = None
    ) -> Tensor:
        """``sigma_data``: the output is preconditioned (``Preconditioned(..., sigma_data, predicts=target)``);
        only ``SIMPLE`` depends on it."""
        t = as_time(t)
        return self.x0_weight(process, t) * target.x0_error_scale(process, t)

    def __repr__(self) -> str:
        return self.name.upper()


class _Simple(Weighting):
    name = "simple"

    def __call__(self, process, t, target=EPS, *, sigma_data=None):
        t = as_time(t)
        if sigma_data is None or target is EPS:  # eps: c_out = 1
            return torch.ones_like(t)
        _, c_out = target.output_scalings(process, t, t, sigma_data)  # t as x: float64, shaped like t
        return c_out**-2  # |out - target|^2 = c_out^2 |F - F_target|^2


class _ELBO(Weighting):
    name = "elbo"

    def __call__(self, process, t, target=EPS, *, sigma_data=None):
        return _bound_weight(self, process, t, target, sigma_data)

    def x0_weight(self, process, t):
        if not process.discrete:
            return LIKELIHOOD.x0_weight(process, t)
        # the sum over t = 1..T of the steps' weights, the decoder's 1 / (2 beta_1) at t = 1
        decoder = 0.5 / process.sigma(t) ** 2  # at t = 1, sigma^2 = 1 - alpha_bar_1 = beta_1
        per_step = torch.where(t <= 1, decoder, process.elbo_weight(t, t - 1))
        return per_step / process.train_t_density(t)


class _Likelihood(Weighting):
    name = "likelihood"

    def x0_weight(self, process, t):
        return process.elbo_weight(t) / process.train_t_density(t)  # -snr'(t) / 2 over the density of t

    def __call__(self, process, t, target=EPS, *, sigma_data=None):
        return _bound_weight(self, process, t, target, sigma_data)


def _bound_weight(weighting: Weighting, process, t, target, sigma_data):
    """The continuous bound's weight in eps or score units from its closed form, -snr'/2 (sigma/alpha)^2 = (alpha
    sigma' - alpha' sigma) / (alpha sigma) (score: times sigma^2), which is +inf where alpha = 0 (Flow at t = 1), its
    limit, instead of 0 times infinity; other targets (and the discrete ELBO) as every weighting."""
    if process.discrete or target not in (EPS, SCORE):
        return Weighting.__call__(weighting, process, t, target, sigma_data=sigma_data)
    t = as_time(t)
    a, sig = process.alpha_sigma(t)
    w = (a * process.d_sigma(t) - process.d_alpha(t) * sig) / (a * sig) / process.train_t_density(t)
    return w if target is EPS else sig**2 * w


class _SNR(Weighting):
    name = "snr"

    def x0_weight(self, process, t):
        return process.snr(t)

    def __call__(self, process, t, target=EPS, *, sigma_data=None):
        # In eps and score units the weight has a closed form that stays finite where alpha = 0 (0 times infinity
        # in snr x0_error_scale): snr (sigma / alpha)^2 = 1, snr (sigma^2 / alpha)^2 = sigma^2.
        if target is EPS:
            return torch.ones_like(as_time(t))
        if target is SCORE:
            return process.sigma(as_time(t)) ** 2
        return super().__call__(process, t, target, sigma_data=sigma_data)


class MinSNR(Weighting):
    """min(snr(t), gamma) in x0 units (Hang et al. 2023)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0):
        if not gamma > 0:
            raise ValueError(f"MinSNR needs gamma > 0, got {gamma}")
        self.gamma = float(gamma)

    def x0_weight(self, process, t):
        return process.snr(t).clamp(max=self.gamma)

    def __call__(self, process, t, target=EPS, *, sigma_data=None):
        # As SNR's: min(snr, gamma) (sigma / alpha)^2 = min(1, gamma / snr), 1 where alpha = 0; score: sigma^2 times it.
        if target in (EPS, SCORE):
            t = as_time(t)
            w = (self.gamma / process.snr(t)).clamp(max=1.0)
            return w if target is EPS else process.sigma(t) ** 2 * w
        return super().__call__(process, t, target, sigma_data=sigma_data)

    def __repr__(self) -> str:
        return f"MinSNR(gamma={self.gamma:g})"


SIMPLE, ELBO, LIKELIHOOD, SNR, MIN_SNR = _Simple(), _ELBO(), _Likelihood(), _SNR(), MinSNR(5.0)
