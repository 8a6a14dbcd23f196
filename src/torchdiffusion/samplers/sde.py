"""Reverse-time SDE samplers: Euler-Maruyama and predictor-corrector (Song et al. 2021).

The reverse of the forward SDE dx = f x dt + g dW is (Anderson 1982; Song et al. 2021, Eq. 6)

    dx = [f(t) x - g2(t) score(x, t)] dt + g(t) dW-bar,      score = (alpha x0_hat - x) / sigma^2,

run from t_max down to t_min; its drift is the process's (``NoiseProcess.reverse_drift_coeffs``). Every
predictor step here is linear in x_t and x0_hat,

    x_s = c_x x_t + c_0 x0_hat(x_t, t) + std z,

with float64 coefficients computed once for the whole grid. Ends of the interval (policy of
``samplers._common``): a last step that lands on sigma(s) = 0 returns x0_hat(x_t, t) and runs no
corrector (there is no score at sigma = 0); a step whose coefficients are not finite, which happens
only where f or g2 is infinite at t (Flow at t = 1: f = -1/(1-t), g2 = 2t + 2t^2/(1-t)), is the
ancestral step q(x_s | x_t, x0 = x0_hat) instead (Ho et al. 2020, Eq. 7): at alpha_t = 0 it is
x_s = alpha_s x0_hat + sigma_s z, whose one-step error alpha_s^2 Var[x0 | x_t] = O(h^2) keeps weak
order 1. The reverse SDE itself is singular there (g2 ~ 2/(1-t)), so no form of its drift is finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.predictions import tweedie_score
from ..core.process import NoiseProcess, append_dims
from . import _common

__all__ = ["sample_reverse_sde", "sample_pc", "euler_maruyama", "reverse_diffusion"]


def euler_maruyama(process: NoiseProcess, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, Eq. 6), as the float64 (c_x, c_0, var) of the step
    x_s = c_x x_t + c_0 x0_hat + sqrt(var) z: x_s = x_t + (s - t) (reverse drift at t) + sqrt(g2(t) (t - s)) z."""
    d_x, d_0 = process.reverse_drift_coeffs(t)
    return 1 + (s - t) * d_x, (s - t) * d_0, process.g2(t) * (t - s)


def reverse_diffusion(process: NoiseProcess, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The reverse-diffusion predictor (Song et al. 2021, Eq. 46) with the exact forward step x_t = alpha_ts x_s +
    sigma_ts z, i.e. f_i(x) = (alpha_ts - 1) x, G_i = sigma_ts: x_s = (2 - alpha_ts) x_t + sigma_ts^2 score(x_t, t)
    + sigma_ts z, as the float64 (c_x, c_0, var) of x_s = c_x x_t + c_0 x0_hat + sqrt(var) z (Tweedie's score)."""
    a_t, sig_t = process.alpha_sigma(t)
    a_ts, var = a_t / process.alpha(s), process.transition_var(s, t)
    return 2 - a_ts - var / sig_t**2, var * a_t / sig_t**2, var


def _predictor_coeffs(process: NoiseProcess, ts: Tensor, predictor) -> tuple[list, list, list]:
    """(c_x, c_0, std) per step, as Python floats, for x_s = c_x x_t + c_0 x0_hat + std z."""
    t, s = ts[:-1], ts[1:]
    if predictor is None:  # the corrector alone moves x (Song et al.'s "corrector-only" sampler)
        c_x, c_0, var = torch.ones_like(t), torch.zeros_like(t), torch.zeros_like(t)
    else:
        c_x, c_0, var = predictor(process, t, s)
    # Noise end: where f or g2 is infinite (Flow at t = 1) take the ancestral step instead.
    p_x, p_0, p_var = process.posterior_coeffs(s, t)
    bad = ~(torch.isfinite(c_x) & torch.isfinite(c_0) & torch.isfinite(var))
    c_x, c_0, var = torch.where(bad, p_x, c_x), torch.where(bad, p_0, c_0), torch.where(bad, p_var, var)
    return c_x.tolist(), c_0.tolist(), var.clamp_min(0).sqrt().tolist()


def _norm(v: Tensor) -> Tensor:
    """Per-example Euclidean norm over all non-batch dims, shaped (B, 1, ...) to broadcast against v."""
    return append_dims(torch.linalg.vector_norm(v.flatten(1), dim=1), v.ndim)


def sample_pc(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    predictor=reverse_diffusion,
    n_corrector: int = 1,
    snr: float = 0.16,
    batch_norms: bool = True,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Appendix G, Algorithms 1-5).

    For each pair t > s of ``ts`` (Algorithm 1's order): one predictor step t -> s, then
    ``n_corrector`` Langevin corrector steps at the level s.

    Predictors (functions of (process, t, s) that give the step's coefficients), all linear in x_t and
    x0_hat(x_t, t), with alpha_ts = alpha_t / alpha_s and
    sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2 (the exact forward step x_t = alpha_ts x_s + sigma_ts z):

    - ``reverse_diffusion`` (Appendix E, Eq. 46: x_i = x_{i+1} - f_{i+1}(x_{i+1}) + G G^T s + G z, with
      f_{i+1}(x) = (alpha_ts - 1) x and G = sigma_ts from that forward step):
      x_s = (2 - alpha_ts) x_t + sigma_ts^2 score + sigma_ts z. On VE (alpha = 1) this is Algorithm 2's
      predictor x_i = x_{i+1} + (sigma_{i+1}^2 - sigma_i^2) s + sqrt(sigma_{i+1}^2 - sigma_i^2) z; on a
      DDPM grid (alpha_ts^2 = 1 - beta_{i+1}) it is Algorithm 3's (2 - sqrt(1 - beta)) x + beta s + sqrt(beta) z.
      (The variant (x_t + sigma_ts^2 score)/alpha_ts + sigma_ts/alpha_ts z, Eq. 46 applied to x/alpha,
      agrees to first order but its noise sigma_ts/alpha_ts explodes where alpha_ts is small: on Gaussian
      data, Discrete cosine T = 1000 with 50 and 10 steps, its variance errors are 63 and 4e4, against
      0.03 and 0.16 here.)
    - ``euler_maruyama``: x_s = x_t - (f x_t - g2 score)(t - s) + sqrt(g2 (t - s)) z (Eq. 6, f and g2 at t).
    - None: x is left as it is (the corrector-only sampler; n_corrector must then be >= 1).

    Langevin corrector at level s (Algorithms 4 and 5), with z ~ N(0, I) and g = score(x, s):

        eps = 2 a (snr ||z|| / ||g||)^2,      x <- x + eps g + sqrt(2 eps) z,

    so that ||eps g|| / ||sqrt(2 eps) z|| = sqrt(a) snr. Here a = alpha_ts^2 for the step into s: 1 on
    alpha = 1 processes (Algorithm 4) and 1 - beta_{i+1} on a DDPM grid (Algorithm 5's alpha_i = 1 - beta_i,
    up to O(beta^2); this one is defined at every level of any grid).

    Norms (``batch_norms``): False takes them per example over all non-batch dims, as Algorithms 4-5 read,
    and keeps examples independent. For a Gaussian of variance S in D dims ||g||^2 ~ chi^2_D / S, so
    E[eps] = 2 a snr^2 S D / (D - 2), infinite for D <= 2; and as eps grows where x is near a mode, the
    chain's stationary variance is about (1 + a snr^2) (D + 2) / (D - 2) S rather than S (measured on
    mixtures: x1.09 at D = 64, x1.04 at D = 256, x10-20 at D = 2). Negligible for images, wrong for 2-D
    toy data. True uses the batch averages of ||z|| and ||g||, the paper's rule for large batches and
    score_sde's code: it couples the examples of a batch but is sound in any dimension, so it is
    the default.

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat.
        process: the noise process.
        x: (B, ...) start, usually ``process.prior_sample``; not modified.
        ts: decreasing times (n + 1 points for n steps), e.g. ``grid_t(process, n)``.
        predictor: ``reverse_diffusion``, ``euler_maruyama`` or None, see above.
        snr: the "signal-to-noise" ratio r. 0.16 is Song et al.'s choice for VE (NCSN++, CIFAR-10) and
            score_sde's default config; their Table 5 reports r = 0.01 best for VP (DDPM) PC1000.
        n_corrector: Langevin corrector steps per level (M; the paper uses 1 for PC samplers; 0: none).
        batch_norms: see above.
        final_denoise: return x0_hat at ts[-1] (see ``samplers._common``).
        generator: the only source of noise.
        callback: called with {"i", "t", "x", "x0_hat", "nfe"} after each step (x0_hat: the last evaluation).
    Returns:
        samples shaped like x. NFE: per step, 1 for the predictor (0 for None) plus n_corrector for a
        Langevin corrector; a last step landing on sigma = 0 costs exactly 1. Plus 1 for the final
        denoising step when final_denoise and sigma(ts[-1]) > 0.
    """
    if predictor is not None and not callable(predictor):
        raise TypeError(f"predictor must be reverse_diffusion, euler_maruyama (or alike) or None, got {predictor!r}")
    if not isinstance(batch_norms, bool):
        raise TypeError(f"batch_norms must be True (batch averages) or False (per example), got {batch_norms!r}")
    if int(n_corrector) != n_corrector or n_corrector < 0 or not snr > 0:
        raise ValueError(f"need an integer n_corrector >= 0 and snr > 0, got {n_corrector} and {snr}")
    n_corr = int(n_corrector)
    if predictor is None and n_corr == 0:
        raise ValueError("predictor=None (corrector only) needs n_corrector >= 1")
    x, g = _common.setup(process, x, ts)
    c_x, c_0, std = _predictor_coeffs(process, g.ts, predictor)
    nfe, x0_hat = 0, None
    for i in range(g.n):
        s, last_to_data = i + 1, g.lands[i]  # only the last step can land on the data (sigma > 0 before it)
        if predictor is not None or last_to_data:
            x0_hat = denoiser(x, g.time(i, x), **cond)
            nfe += 1
            if last_to_data:  # x_s = x0_hat(x_t, t): the limit of every update as sigma(s) -> 0
                x = x0_hat
            else:
                x = torch.add(c_x[i] * x, x0_hat, alpha=c_0[i])
                x = torch.add(x, _common.noise_like(x, generator), alpha=std[i]) if std[i] > 0 else x
        a = (g.alpha[i] / g.alpha[s]) ** 2 if not last_to_data else 0.0  # Algorithm 5's alpha_i
        for _ in range(0 if last_to_data else n_corr):  # Langevin corrector at s (Algorithms 4-5)
            x0_hat = denoiser(x, g.time(s, x), **cond)
            nfe += 1
            score = tweedie_score(x, x0_hat, g.alpha[s], g.sigma[s])
            z = _common.noise_like(x, generator)
            # Norms in float32 at least (bfloat16 rounds a small score to 0); a score of norm 0 (x at a mode, or
            # rounded away) takes no corrector step rather than an infinite one.
            wide = torch.promote_types(x.dtype, torch.float32)
            nz, ng = _norm(z.to(wide)), _norm(score.to(wide))  # (B, 1, ...)
            if batch_norms:  # Song et al.'s large-batch rule: the average norm over the batch
                nz, ng = nz.mean(), ng.mean()
            ratio = torch.where(ng > 0, snr * nz / torch.where(ng > 0, ng, torch.ones_like(ng)), torch.zeros_like(ng))
            eps = (2 * a * ratio**2).to(x.dtype)
            x = x + eps * score + torch.sqrt(2 * eps) * z
        _common.report(callback, i, g, x, x0_hat, nfe)
    return _common.finish(denoiser, g, x, final_denoise, cond)


def sample_reverse_sde(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021, Eq. 6; Anderson 1982).

    For each pair t > s of ``ts``, with h = t - s and f, g2 evaluated at t,

        x_s = x_t - (f x_t - g2 score(x_t, t)) h + sqrt(g2 h) z,     score = (alpha x0_hat - x) / sigma^2,

    i.e. ``sample_pc(predictor=euler_maruyama, n_corrector=0)``. Weak order 1. Where f or g2 is
    infinite at t (Flow at t = 1) the step is the ancestral one, x_s = alpha_s x0_hat + sigma_s z there
    (module docstring); a last step to sigma = 0 returns x0_hat(x_t, t).

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat.
        process: the noise process.
        x: (B, ...) start, usually ``process.prior_sample``; not modified.
        ts: decreasing times, e.g. ``grid_t(process, n)`` (Song et al.'s uniform grid).
        final_denoise: return x0_hat at ts[-1] (see ``samplers._common``).
        generator: the only source of noise.
        callback: called with {"i", "t", "x", "x0_hat", "nfe"} after each step.
    Returns:
        samples shaped like x. NFE = len(ts) - 1, plus 1 for the final denoising step.
    """
    return sample_pc(
        denoiser,
        process,
        x,
        ts,
        predictor=euler_maruyama,
        n_corrector=0,
        final_denoise=final_denoise,
        generator=generator,
        callback=callback,
        **cond,
    )
