"""Editing with a diffusion model: SDEdit (Meng et al. 2022) and DDIM inversion and interpolation (Song, Meng &
Ermon 2021, Secs. 4.3 and 5.3), with spherical interpolation of latents (Shoemake 1985).

    sdedit             noise a guide x0' up to t0 (its ``strength``) and sample back: p(x0 | x_t0)
    ddim_invert        the deterministic DDIM map run from data to noise (encode x0 into x_T)
    interpolate        slerp between two latents
    ddim_interpolate   invert two images, slerp their latents, decode with DDIM
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch
from torch import Tensor

from ..core.process import NoiseProcess
from ..core.timesteps import grid_lam
from ..samplers import _common
from ..samplers.ancestral import sample_ddpm
from ..samplers.ddim import sample_ddim

__all__ = ["sdedit", "ddim_invert", "interpolate", "ddim_interpolate"]


def sdedit(
    denoiser,
    process: NoiseProcess,
    x0_guide: Tensor,
    strength: float,
    *,
    sampler=sample_ddpm,
    steps: int = 100,
    grid=grid_lam,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """SDEdit (Meng et al. 2022, Algorithm 1): perturb the guide to an intermediate time t0 and run the reverse
    process from there,

        t0 = t_min + strength (t_max - t_min),   x_t0 = alpha(t0) x0' + sigma(t0) z,   z ~ N(0, I),
        x0 = sampler(x_t0, ts),                  ts = grid(process, steps, t_start=t0)  (t0 down to t_min).

    ``strength`` in (0, 1] is the paper's t0 on its SDE time t in [0, 1] (they use t0 in [0.3, 0.6]), and the
    ``strength`` of the usual img2img (a fraction strength of the schedule's T steps): linear in t. On VP, VE,
    SubVP, Cosine, Flow and Discrete t is such a time (the paper's VE has the same geometric sigma(t)); on EDM t is
    the noise level sigma itself, so there strength = sigma(t0) / 80 and 0.5 is already nearly pure noise.

    The exact law of the output. With the exact denoiser and the exact reverse-time SDE, the path from x_t0 has the
    forward process's law given x_t0 (Anderson 1982), so x0 is a draw of p(x0 | x_t0). Since q(x_t0 | x0) =
    N(alpha x0, sigma^2 I) (alpha, sigma at t0), p(x0 | x_t0 = y) is exactly the posterior of the linear inverse
    problem y = A x0 + sigma_y n with A = alpha I and sigma_y = sigma (``GaussianMixture.posterior(Measurement(
    Dense(alpha I), y, sigma))``). That holds for a *fixed* start y, i.e. a fixed noise draw z (``noise``). Over
    z the output law is the average E_z[p(x0 | x_t0 = alpha x0' + sigma z)], which is *not* the posterior given
    y = alpha x0': for a Gaussian prior N(m, v) per coordinate, with k = alpha v / (alpha^2 v + sigma^2) and
    P = v sigma^2 / (alpha^2 v + sigma^2) (the posterior variance),

        E[x0 | x_t0] = m + k (x_t0 - alpha m),  Var[x0 | x_t0] = P,
        output ~ N(m + alpha k (x0' - m),  P + k^2 sigma^2),

    the posterior's mean but a larger variance (the spread of E[x0 | x_t0] over z). For a Gaussian mixture the
    component label k follows E_z[r_k(alpha x0' + sigma z)], r_k the responsibilities of p_t0.

    Which sampler. The law above is that of a stochastic reverse process (the default, DDPM's ancestral step, is
    the discretization of the reverse SDE that the paper runs; its error is O(h)). A deterministic sampler (DDIM
    with eta = 0, ``DEFAULT_SAMPLER``) instead pushes N(alpha x0', sigma^2 I) through the probability-flow map,
    which sends p_t0 to p_0 but each start to one point: for Gaussian data x0 = m + c/alpha (x_t0 - alpha m),
    c = alpha sqrt(v / (alpha^2 v + sigma^2)), so the output is N(m + c (x0' - m), c^2 sigma^2 / alpha^2): closer to
    the guide (c > c^2 = alpha k) and less spread. Both end with the sampler's final denoising at t_min, which
    removes a variance of order (sigma/alpha)(t_min)^2 from the law.

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat. process: the noise process.
        x0_guide: (B, ...) the guides x0' (a stroke painting, an image to edit); repeat one to get B edits.
        strength: in (0, 1]; 1 starts from t_max (a sample that ignores the guide up to alpha(t_max) x0').
        sampler: any ``sample_xxx(denoiser, process, x, ts, *, generator, callback, **cond)``; pass knobs with
            ``functools.partial``.
        steps: the number of sampler steps on [t_min, t0] (not on the whole [t_min, t_max]).
        grid: a grid function ``grid(process, n, t_start=)`` (``core.timesteps``: grid_lam, grid_t, grid_karras,
            grid_quadratic); grid_discrete has no t_start: the continuous grids run on Discrete too.
        noise: z, standard normal like x0_guide; drawn from ``generator`` if not given.
        generator: the only source of noise (the start's, then the sampler's). callback: passed to the sampler.
    Returns:
        the edits, shaped like x0_guide.
    """
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 < float(strength) <= 1.0:
        raise ValueError(
            f"strength must be a number in (0, 1] (the fraction of [t_min, t_max] noised; Meng et al. 2022's t0), "
            f"got {strength!r}"
        )
    if not isinstance(x0_guide, Tensor) or x0_guide.ndim < 1:
        raise ValueError("x0_guide must be a tensor with a batch dimension (B, ...)")
    t0 = process.t_min + float(strength) * (process.t_max - process.t_min)
    if not t0 > process.t_min:
        raise ValueError(f"strength {strength} maps to t0 = t_min = {process.t_min}: nothing to edit; use more")
    if "t_start" not in inspect.signature(grid).parameters:
        raise TypeError(f"grid must take t_start (grid_lam, grid_t, grid_karras, grid_quadratic), got {grid!r}")
    ts = grid(process, steps, t_start=t0)
    if noise is None:
        noise = _common.noise_like(x0_guide, generator)
    elif not isinstance(noise, Tensor) or noise.shape != x0_guide.shape:
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor shaped like x0_guide {tuple(x0_guide.shape)}, got {got}")
    x = process.perturb(x0_guide, torch.tensor(t0, dtype=torch.float64), noise.to(x0_guide))
    return sampler(denoiser, process, x, ts, generator=generator, callback=callback, **cond)


def ddim_invert(denoiser, process: NoiseProcess, x0: Tensor, ts, *, callback=None, **cond) -> Tensor:
    """DDIM inversion: the deterministic DDIM map run from data to noise (Song, Meng & Ermon 2021, Sec. 4.3: the
    ODE of their Eq. 14, d(x/alpha) = eps_hat d(sigma/alpha), integrated forward to encode x0 into x_T; their
    Sec. 5.4 decodes it back, with a reconstruction error that falls with the number of steps).

    ``ts`` is the decreasing grid a decoder (``sample_ddim``) would use; the inversion walks it backwards from
    ts[-1] to ts[0], starting with x0 as the state at ts[-1] (so sigma(ts[-1]) > 0 is required: the grid
    functions' default end t_min). Each step s -> t (s = ts[i+1], t = ts[i], t noisier) is DDIM's with the
    roles swapped and x0_hat taken at the current point (the usual inversion, an explicit step):

        x0_hat = D(x_s, s),  eps_hat = (x_s - alpha_s x0_hat) / sigma_s,  x_t = alpha_t x0_hat + sigma_t eps_hat,

    i.e. x_t = sigma_t/sigma_s x_s - alpha_s sigma_t/sigma_s (1 - e^{-h}) x0_hat, h = lam_s - lam_t > 0: the
    first-order exponential integrator (Euler in sigma/alpha with eps_hat frozen) of the probability-flow ODE,
    exact when x0_hat is constant along the path (a point mass). Decoding with DDIM (x0_hat at *its* current
    point) is not its exact inverse: the round trip ``sample_ddim(..., ddim_invert(x0, ts), ts, final_denoise=
    False) - x0`` is O(h), first order in the step like each map (an implicit inversion with x0_hat at the
    target, solved by fixed-point iteration, would undo DDIM exactly; not done here). Where alpha(ts[0]) = 0
    (Flow at t = 1) the last step gives x_T = eps_hat, finite.

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat. process: the noise process.
        x0: (B, ...) data, read as the state at ts[-1]; not modified.
        ts: decreasing times, e.g. ``grid_lam(process, n)``; the same grid decodes.
        callback: called with {"i", "t", "x", "x0_hat", "nfe"} after each step, t the time x now sits at.
    Returns:
        x at ts[0], shaped like x0. NFE = len(ts) - 1.
    """
    x, g = _common.setup(process, x0, ts)
    if g.sigma[-1] <= 0:
        raise ValueError(
            f"DDIM inversion starts from x0 as the state at ts[-1] = {float(g.ts[-1])}, where sigma = 0: "
            "eps_hat = (x - alpha x0_hat) / sigma is undefined there; end the grid at t_min (sigma > 0)"
        )
    for k, i in enumerate(range(g.n - 1, -1, -1)):  # the step ts[i+1] -> ts[i]
        x0_hat = denoiser(x, g.time(i + 1, x), **cond)
        ratio = g.sigma[i] / g.sigma[i + 1]
        # alpha_t - alpha_s sigma_t/sigma_s = -alpha_s sigma_t/sigma_s (1 - e^{-h}), 1 - e^{-h} by expm1 (Grid)
        x = torch.add(ratio * x, x0_hat, alpha=-g.alpha[i + 1] * ratio * g.one_minus_em[i])
        if callback is not None:
            callback({"i": k, "t": float(g.ts[i]), "x": x, "x0_hat": x0_hat, "nfe": k + 1})
    return x


def interpolate(x_a: Tensor, x_b: Tensor, weights) -> Tensor:
    """Spherical linear interpolation (Shoemake 1985), as the DDIM paper interpolates inverted latents (Song, Meng
    & Ermon 2021, Sec. 5.3 and App. D.5): with theta the angle between x_a and x_b (each read as one vector),

        slerp(w) = sin((1 - w) theta) / sin(theta) x_a + sin(w theta) / sin(theta) x_b.

    w = 0 and 1 give x_a and x_b exactly; the angle to x_a is w theta (linear in w); for |x_a| = |x_b| every
    slerp(w) has that norm, so Gaussian latents stay on the shell where N(0, sigma^2 I) puts its mass (a linear
    mix would shrink them). Weights outside [0, 1] extrapolate along the same great circle. Parallel inputs
    (theta ~ 0) fall back to the linear mix, the limit; opposite ones (theta = pi) span no unique plane: refused.

    Args:
        x_a, x_b: two tensors of the same shape S (one example each; batch two latents with
            ``torch.stack([interpolate(a, b, w) ...])``).
        weights: a number or a 1-d sequence / tensor of n finite weights.
    Returns:
        (n, *S), or S for a single number.
    """
    if not isinstance(x_a, Tensor) or not isinstance(x_b, Tensor) or x_a.shape != x_b.shape:
        raise ValueError("x_a and x_b must be tensors of the same shape (one example each)")
    scalar = isinstance(weights, numbers.Real) or (isinstance(weights, Tensor) and weights.ndim == 0)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() == 0 or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be finite numbers, got {weights!r}")
    a, b = x_a.reshape(-1).to(torch.float64), x_b.reshape(-1).to(torch.float64)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        raise ValueError("slerp needs two non-zero vectors (the angle to 0 is undefined)")
    ua, ub = a / na, b / nb
    # the angle by Kahan's formula 2 atan2(|ua - ub|, |ua + ub|): accurate near 0 and pi, where acos is not
    theta = float(2 * torch.atan2((ua - ub).norm(), (ua + ub).norm()))
    sin_t = math.sin(theta)
    if math.pi - theta < 1e-7:
        raise ValueError("x_a and x_b point in opposite directions: the slerp between them is not unique")
    if sin_t < 1e-7:  # parallel: the slerp weights tend to 1 - w and w (error O(theta^2) below this)
        ca, cb = 1 - w, w
    else:
        ca, cb = torch.sin((1 - w) * theta) / sin_t, torch.sin(w * theta) / sin_t
    out = ca[:, None] * a + cb[:, None] * b
    out = out.reshape(w.numel(), *x_a.shape).to(x_a.dtype)
    return out[0] if scalar else out


def ddim_interpolate(
    denoiser,
    process: NoiseProcess,
    x0_a: Tensor,
    x0_b: Tensor,
    n: int,
    ts,
    *,
    final_denoise: bool = False,
    **cond,
) -> Tensor:
    """Interpolate two examples through their DDIM latents (Song, Meng & Ermon 2021, Sec. 5.3): invert both with
    ``ddim_invert`` on ``ts``, slerp the latents at n weights evenly spaced in [0, 1] (``interpolate``) and decode
    the n latents with ``sample_ddim`` (eta = 0) on the same grid. The first and last frames are the round trips
    of x0_a and x0_b (equal to them up to the O(h) round-trip error of ``ddim_invert``); with ``final_denoise``
    False the decoder returns the state at ts[-1], the inverse of the inversion's start.

    Args:
        x0_a, x0_b: two examples of the same shape S (unbatched). n: the number of frames, >= 2.
        ts: decreasing times, ending where sigma > 0 (see ``ddim_invert``). **cond: the denoiser's conditioning.
    Returns:
        (n, *S): the frames from x0_a to x0_b. NFE = 2 (len(ts) - 1) to invert, n (len(ts) - 1) to decode.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (the frames, ends included), got {n!r}")
    if not isinstance(x0_a, Tensor) or not isinstance(x0_b, Tensor) or x0_a.shape != x0_b.shape:
        raise ValueError("x0_a and x0_b must be tensors of the same shape (one example each, unbatched)")
    latents = ddim_invert(denoiser, process, torch.stack([x0_a, x0_b]), ts, **cond)
    frames = interpolate(latents[0], latents[1], torch.linspace(0, 1, int(n), dtype=torch.float64))
    return sample_ddim(denoiser, process, frames, ts, final_denoise=final_denoise, **cond)
