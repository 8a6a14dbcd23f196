"""Probability-flow ODE samplers: Euler, Heun (Karras et al. 2022), RK4 and adaptive (torchdiffeq).

The probability-flow ODE dx = [f x - g^2/2 score] dt (Song et al. 2021, Eq. 13) is the process's:
``NoiseProcess.ode_velocity_coeffs`` gives (c_x, c_0) with dx/dt = c_x x + c_0 x0_hat (= alpha' x0_hat +
sigma' eps_hat, finite at the noise end of Flow; Karras et al.'s (x - x0_hat)/t on EDM). The samplers take
those coefficients at the grid's times once, as floats, and each velocity costs two tensor operations. The
end policy is in ``_common``: a step that lands on sigma(s) = 0 returns x0_hat(x_t, t) (1 NFE; on EDM
exactly the Euler step to 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..core.process import NoiseProcess, batch_time
from . import _common

__all__ = ["sample_euler", "sample_heun", "sample_rk4", "sample_ode_adaptive"]


def _velocity_coeffs(process: NoiseProcess, t: Tensor) -> list[tuple[float, float]]:
    """(c_x, c_0) of the probability-flow velocity at each time of t, as floats (inf/nan where sigma = 0: unused)."""
    c_x, c_0 = process.ode_velocity_coeffs(t)
    return list(zip(c_x.tolist(), c_0.tolist()))


def _velocity(x: Tensor, x0_hat: Tensor, c: tuple[float, float]) -> Tensor:
    """dx/dt = c_x x + c_0 x0_hat."""
    return torch.add(c[0] * x, x0_hat, alpha=c[1])


def sample_euler(
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
    """Euler's method on the probability-flow ODE (Song et al. 2021, Eq. 13, written with the denoiser).

    x_s = x_t + (s - t) [alpha'(t) x0_hat + sigma'(t) eps_hat]. First order, 1 NFE per step. On EDM
    with ts = k-diffusion's sigmas (without its final 0) it is k-diffusion's ``sample_euler``.

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat.
        process: the noise process.
        x: (B, ...) start at ts[0]; not modified.
        ts: decreasing float64 times, n + 1 points for n steps.
        final_denoise: return x0_hat at ts[-1] (see ``samplers._common``).
        generator: unused (deterministic); accepted for the common signature.
        callback: called with {"i", "t", "x", "x0_hat", "nfe"} after each step.
    Returns:
        samples shaped like x. NFE = len(ts) - 1, plus 1 for the final denoising step.
    """
    x, g = _common.setup(process, x, ts)
    v, dt = _velocity_coeffs(process, g.ts[:-1]), (g.ts[1:] - g.ts[:-1]).tolist()
    for i in range(g.n):
        x0_hat = denoiser(x, g.time(i, x), **cond)
        if g.lands[i]:
            x = x0_hat
        else:  # x + dt (c_x x + c_0 x0_hat), with its scalars gathered
            (c_x, c_0), h = v[i], dt[i]
            x = torch.add((1.0 + h * c_x) * x, x0_hat, alpha=h * c_0)
        _common.report(callback, i, g, x, x0_hat, i + 1)
    return _common.finish(denoiser, g, x, final_denoise, cond)


def sample_heun(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    churn: float = 0.0,
    t_min_churn: float = 0.0,
    t_max_churn: float = math.inf,
    s_noise: float = 1.0,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1) with optional churn (Algorithm 2).

    Algorithm 1 in general form, s(t) = alpha(t) and sigma_K(t) = sigma/alpha: an Euler step to s,
    then the trapezoidal correction x_s = x_t + (s - t)/2 (d(x_t, t) + d(x_euler, s)). 2 NFE per
    step; a step landing on sigma(s) = 0 is 1 NFE (Algorithm 1's Euler step to t_N = 0).

    Churn (Algorithm 2, lines 4-6) runs in the scaled variable y = x/alpha with noise level
    rho = sigma/alpha = exp(-lam), the alpha = 1 equivalent process (Karras Sec. 4): where
    rho(t_i) lies in [t_min_churn, t_max_churn] (S_tmin, S_tmax, in units of rho, as EDM's sigma)
    gamma_i = min(churn / N, sqrt(2) - 1), rho_hat = rho (1 + gamma_i), capped at rho(t_max),
    y_hat = y + sqrt(rho_hat^2 - rho^2) s_noise z, t_hat = t_from_lam(-log rho_hat) and
    x_hat = alpha(t_hat) y_hat; the step then runs from t_hat. N counts Karras' steps: len(ts) - 1,
    plus the final denoise (his step to t_N = 0). As in Algorithm 2 (and EDM, k-diffusion) z is
    drawn at every step once churn > 0; churn = 0 draws no noise. No churn where alpha(t) = 0.
    On EDM with ts = k-diffusion's sigmas (without its 0) this is k-diffusion's ``sample_heun``.

    Args:
        churn, t_min_churn, t_max_churn, s_noise: S_churn, S_tmin, S_tmax, S_noise of Algorithm 2.
        (others as in ``sample_euler``; ``generator`` is the only source of the churn noise.)
    Returns:
        samples shaped like x. NFE = 2 (len(ts) - 1), minus 1 if the last step lands on
        sigma = 0, plus 1 for the final denoising step.
    """
    if churn < 0 or s_noise < 0:
        raise ValueError(f"need churn >= 0 and s_noise >= 0, got {churn} and {s_noise}")
    x, g = _common.setup(process, x, ts)
    n, t, s = g.n, g.ts[:-1], g.ts[1:]
    n_karras = n + int(final_denoise and g.sigma[-1] > 0)
    # Algorithm 2's gamma_i and t_hat, in the noise level rho = sigma/alpha = exp(-lam) of y = x/alpha.
    rho, rho_max = torch.exp(-process.lam(t)), torch.exp(-process.lam(process.t_max))
    inside = torch.isfinite(rho) & (rho >= t_min_churn) & (rho <= t_max_churn)
    gamma = inside.to(rho) * min(churn / max(n_karras, 1), math.sqrt(2) - 1)  # float64, 0 outside
    rho_hat = torch.minimum(rho * (1 + gamma), rho_max)
    t_hat = process.t_from_lam(-torch.log(rho_hat)).clamp(max=process.t_max)
    t_hat = torch.where(gamma > 0, torch.where(rho_hat < rho_max, t_hat, process.t_max), t)
    a_t, a_hat = process.alpha(t), process.alpha(t_hat)
    churned = (gamma > 0).tolist()
    scale = torch.where(gamma > 0, a_hat / a_t, 1.0).tolist()
    std = torch.where(gamma > 0, a_hat * (rho_hat**2 - rho**2).clamp_min(0).sqrt() * s_noise, 0.0).tolist()
    v_hat, v_s, h = _velocity_coeffs(process, t_hat), _velocity_coeffs(process, s), (s - t_hat).tolist()
    t_hat_in, nfe = t_hat.to(x.dtype), 0
    for i in range(n):
        # Algorithm 2, lines 4-6: raise the noise level to t_hat.
        z = _common.noise_like(x, generator) if churn > 0 else None
        x_hat = scale[i] * x + std[i] * z if churned[i] else x
        x0_hat = denoiser(x_hat, batch_time(t_hat_in[i], x, x.dtype), **cond)
        nfe += 1
        if g.lands[i]:
            x = x0_hat
        else:
            # Euler step, then the 2nd-order correction (Algorithm 1, lines 5-8).
            d = _velocity(x_hat, x0_hat, v_hat[i])
            x_euler = torch.add(x_hat, d, alpha=h[i])
            d_2 = _velocity(x_euler, denoiser(x_euler, g.time(i + 1, x), **cond), v_s[i])
            nfe += 1
            x = torch.add(x_hat, d + d_2, alpha=h[i] / 2)
        _common.report(callback, i, g, x, x0_hat, nfe)
    return _common.finish(denoiser, g, x, final_denoise, cond)


def sample_rk4(
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
    """Classical Runge-Kutta 4 on the probability-flow ODE (Song et al. 2021, Eq. 13) in t.

    Stages at t, (t + s)/2 twice and s; x_s = x_t + (s - t)/6 (k1 + 2 k2 + 2 k3 + k4) (Kutta 1901;
    Hairer, Norsett & Wanner 1993, Sec. II.1). Fourth order, 4 NFE per step; a step landing on
    sigma(s) = 0 returns x0_hat(x_t, t) (1 NFE). Arguments as in ``sample_euler``.

    Returns:
        samples shaped like x. NFE = 4 (len(ts) - 1), minus 3 if the last step lands on sigma = 0,
        plus 1 for the final denoising step.
    """
    x, g = _common.setup(process, x, ts)
    t, s = g.ts[:-1], g.ts[1:]
    mid = (t + s) / 2
    v_t, v_m, v_s, dt = (*(_velocity_coeffs(process, u) for u in (t, mid, s)), (s - t).tolist())
    mid_in, nfe = mid.to(x.dtype), 0

    def velocity(y: Tensor, time: Tensor, c) -> Tensor:
        return _velocity(y, denoiser(y, batch_time(time, y, y.dtype), **cond), c)

    for i in range(g.n):
        x0_hat = denoiser(x, g.time(i, x), **cond)
        if g.lands[i]:
            x, nfe = x0_hat, nfe + 1
        else:
            h = dt[i]
            k1 = _velocity(x, x0_hat, v_t[i])
            k2 = velocity(x + (h / 2) * k1, mid_in[i], v_m[i])
            k3 = velocity(x + (h / 2) * k2, mid_in[i], v_m[i])
            k4 = velocity(x + h * k3, g.t_in[i + 1], v_s[i])
            x, nfe = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4), nfe + 4
        _common.report(callback, i, g, x, x0_hat, nfe)
    return _common.finish(denoiser, g, x, final_denoise, cond)


def sample_ode_adaptive(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_nfe: bool = False,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor | tuple[Tensor, int]:
    """The probability-flow ODE (Song et al. 2021, Eq. 13) by an adaptive Runge-Kutta solver.

    torchdiffeq's ``odeint`` (Chen et al. 2018) with ``method`` "dopri5" (Dormand & Prince 1980,
    order 5(4), 6 NFE per accepted or rejected step plus 2 to choose the first step), as Song et
    al. 2021 (Sec. 4.3, RK45) do. Only the ends of ``ts`` matter: it integrates from ts[0] to ts[-1]
    with steps of its own choosing (landing exactly on ts[-1], so the curves are never evaluated
    beyond it). If sigma(ts[-1]) = 0, it integrates to ts[-2] and returns x0_hat there (``_common``).
    The state is integrated in float64 whatever x's dtype (rtol, atol are float64 tolerances); the
    denoiser sees x's dtype and the result is cast back. The error is controlled as an RMS over the
    whole batch (torchdiffeq's default, like scipy's RK45): steps are shared, so an example's result
    depends (within the tolerance) on the rest of the batch.

    Args:
        method: an adaptive torchdiffeq method ("dopri5", "dopri8", "bosh3", "adaptive_heun").
        rtol, atol: the solver's relative and absolute tolerances.
        return_nfe: also return the NFE (denoiser calls, final denoise included).
        (others as in ``sample_euler``.) The callback is called once, as for one step from ts[0]
        to ts[-1], with x at the end, x0_hat at ts[0] and the NFE of the integration.
    Returns:
        samples shaped like x, or (samples, nfe) if ``return_nfe``.
    """
    x, g = _common.setup(process, x, ts)
    ts = g.ts
    land = g.n > 0 and g.lands[-1]
    t_end = ts[-2] if land else ts[-1]
    nfe, first = 0, []

    def velocity(t: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        x0_hat = denoiser(y.to(x.dtype), batch_time(t, x, x.dtype), **cond)
        nfe += 1
        if not first:  # x0_hat at (x, ts[0]), for the callback
            first.append(x0_hat)
        return process.ode_velocity(y, t, x0_hat.to(y.dtype))

    y = x.to(torch.float64)
    if float(ts[0]) > float(t_end):
        t_span = torch.stack([ts[0], t_end])
        y = odeint(velocity, y, t_span, rtol=rtol, atol=atol, method=method, options={"step_t": t_end[None]})[-1]
    if land:  # the last step lands on the data: x0_hat at ts[-2] (at ts[0] for a 2-point grid)
        y = denoiser(y.to(x.dtype), batch_time(t_end, x, x.dtype), **cond)
        nfe += 1
        if not first:
            first.append(y)
    out = y.to(x.dtype)
    if g.n > 0:
        _common.report(callback, 0, g, out, first[0], nfe)
    out = _common.finish(denoiser, g, out, final_denoise, cond)
    nfe += int(final_denoise and g.sigma[-1] > 0)
    return (out, nfe) if return_nfe else out
