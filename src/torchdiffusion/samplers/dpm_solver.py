"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2023): exponential integrators in lam.

The probability-flow ODE, written in lam = log(alpha / sigma), has the exact solution (h = lam_s - lam_t)

    x_s = alpha_s / alpha_t x_t - alpha_s int_{lam_t}^{lam_s} e^{-lam} eps_hat dlam      (noise form)
    x_s = sigma_s / sigma_t x_t + sigma_s int_{lam_t}^{lam_s} e^{lam} x0_hat dlam        (data form)

(Lu et al. 2022, Prop. 3.1, Eq. 3.4; the data form is DPM-Solver++'s, Lu et al. 2023, Sec. 4). The linear
part is exact; the solvers only approximate eps_hat or x0_hat as a polynomial in lam, so x / alpha depends on
the grid only through lam and VP, VE, ... agree on one lam grid. (e^h - 1) forms are written with expm1; the
factors e^{-h} and 1 - e^{-h} of each step come from ``_common.Grid``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.predictions import eps_from
from ..core.process import NoiseProcess, batch_time
from . import _common

__all__ = ["sample_dpm_solver", "sample_dpm_solver_pp", "sample_dpm_solver_pp_sde", "sample_dpm_solver_pp_2s_ancestral"]

# Intermediate points of the single-step solvers at lam_t + r h (Lu et al. 2022, Algorithms 1 and 2).
_R = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}


def _midpoints(process: NoiseProcess, g: _common.Grid, order: int) -> list[tuple[Tensor, list, list, list]]:
    """For each r of ``_R[order]``: the times u = t_from_lam(lam_t + r h) of every step, and alpha, sigma, lam there."""
    lam_t = torch.tensor(g.lam[:-1], dtype=torch.float64)
    h = torch.tensor([hi if math.isfinite(hi) else 0.0 for hi in g.h], dtype=torch.float64)  # landing: unused
    mids = []
    for r in _R[order]:
        u = process.t_from_lam(lam_t + r * h).to(g.ts.device)
        mids.append((u, process.alpha(u).tolist(), process.sigma(u).tolist(), process.lam(u).tolist()))
    return mids


def _d_2m(g: _common.Grid, i: int, order: int) -> tuple[float, float]:
    """DPM-Solver++(2M)'s D = (1 + 1/(2 r)) m0 - 1/(2 r) m1, r = (lam_i - lam_{i-1}) / h, as the weights of (m0, m1)
    (Lu et al. 2023, Algorithm 2); at first order D = m0."""
    if order == 1:
        return (1.0, 0.0)
    r = g.h[i - 1] / g.h[i]
    return (1 + 1 / (2 * r), -1 / (2 * r))


def sample_dpm_solver(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    order: int = 3,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Single-step DPM-Solver-1, -2, -3 in noise-prediction form (Lu et al. 2022, Eqs. 3.7-3.9, Algorithms 1-2).

    Per step t -> s with h = lam_s - lam_t, eps_t = eps_hat(x_t, t), and intermediate times u_k at lam_t + r_k h
    (``process.t_from_lam``; r_k is then recomputed from the lam of u_k): the loop body below is the paper's.
    Global order = ``order``; NFE = ``order`` per step (1 on a step landing on sigma = 0, which returns x0_hat,
    see ``samplers._common``), plus 1 for the final denoising step. Order 1 is DDIM with eta = 0.

    The noise form divides by alpha_t: a grid starting where alpha = 0 (Flow at t = 1) is refused; start at
    ``process.t_from_lam(timesteps.LAM_MIN)`` or use ``sample_dpm_solver_pp`` / ``sample_unipc`` (data form).

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat. process: the noise process.
        x: (B, ...) start; not modified. ts: decreasing times (n + 1 for n steps), e.g. ``grid_lam``.
        order: 1, 2 or 3. final_denoise, generator (unused: deterministic), callback: as in ``sample_ddpm``.
    """
    if order not in _R:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    x, g = _common.setup(process, x, ts)
    if any(a == 0.0 for a in g.alpha[:-1]):
        raise ValueError(
            "DPM-Solver's noise form divides by alpha(t) = 0 on this grid (e.g. Flow at t = 1); start below t_max, "
            "e.g. at process.t_from_lam(timesteps.LAM_MIN), or use sample_dpm_solver_pp / sample_unipc"
        )
    mids, nfe = _midpoints(process, g, order), 0

    def eps_at(k: int, i: int, y: Tensor) -> Tensor:  # eps_hat at the intermediate point u_k of step i
        nonlocal nfe
        u, a_u, s_u, _ = mids[k]
        nfe += 1
        return eps_from(y, denoiser(y, batch_time(u[i], y, y.dtype), **cond), a_u[i], s_u[i])

    for i in range(g.n):
        x0_hat, nfe = denoiser(x, g.time(i, x), **cond), nfe + 1
        if g.lands[i]:
            x = x0_hat
            _common.report(callback, i, g, x, x0_hat, nfe)
            continue
        s, h, a_t = i + 1, g.h[i], g.alpha[i]
        eps_t = eps_from(x, x0_hat, a_t, g.sigma[i])
        if order == 1:  # Eq. 3.7
            x = g.alpha[s] / a_t * x - g.sigma[s] * math.expm1(h) * eps_t
        elif order == 2:  # Algorithm 1, r1 = 1/2
            _, a_u, s_u, l_u = mids[0]
            r1 = (l_u[i] - g.lam[i]) / h
            x_u = a_u[i] / a_t * x - s_u[i] * math.expm1(r1 * h) * eps_t
            eps_u = eps_at(0, i, x_u)
            x = (
                g.alpha[s] / a_t * x
                - g.sigma[s] * math.expm1(h) * eps_t
                - g.sigma[s] / (2 * r1) * math.expm1(h) * (eps_u - eps_t)
            )
        else:  # Algorithm 2, r1 = 1/3, r2 = 2/3
            (_, a_1, s_1, l_1), (_, a_2, s_2, l_2) = mids
            r1, r2 = (l_1[i] - g.lam[i]) / h, (l_2[i] - g.lam[i]) / h
            x_u1 = a_1[i] / a_t * x - s_1[i] * math.expm1(r1 * h) * eps_t
            D1 = eps_at(0, i, x_u1) - eps_t
            x_u2 = (
                a_2[i] / a_t * x
                - s_2[i] * math.expm1(r2 * h) * eps_t
                - s_2[i] * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1) * D1
            )
            D2 = eps_at(1, i, x_u2) - eps_t
            x = (
                g.alpha[s] / a_t * x
                - g.sigma[s] * math.expm1(h) * eps_t
                - g.sigma[s] / r2 * (math.expm1(h) / h - 1) * D2
            )
        _common.report(callback, i, g, x, x0_hat, nfe)
    return _common.finish(denoiser, g, x, final_denoise, cond)


def sample_dpm_solver_pp(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    order: int = 2,
    lower_order_final: bool = True,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """Multistep DPM-Solver++(2M) and (3M) in data-prediction form (Lu et al. 2023, Algorithm 2 and Appendix).

    Per step t -> s with h = lam_s - lam_t, the values m0, m1, m2 of x0_hat at t_i, t_{i-1}, t_{i-2}, and
    r0 = (lam_t - lam_{i-1})/h, r1 = (lam_{i-1} - lam_{i-2})/h:

    - 1st order (warm-up): x_s = sigma_s/sigma_t x_t + alpha_s (1 - e^{-h}) m0  (= DDIM, eta = 0).
    - 2M (Algorithm 2): x_s = sigma_s/sigma_t x_t + alpha_s (1 - e^{-h}) ((1 + 1/(2 r0)) m0 - 1/(2 r0) m1).
    - 3M: D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1) ~ h x0',
      D2 = 2 (D1_0 - D1_1)/(r0 + r1) ~ h^2 x0'', phi1 = e^{-h} - 1, phi2 = phi1/h + 1, phi3 = phi2/h - 1/2:
      x_s = sigma_s/sigma_t x_t - alpha_s (phi1 m0 - phi2 D1 + phi3 D2), exact for x0_hat quadratic in lam.
      The reference code (dpm-solver's ``multistep_dpm_solver_third_update``, k-diffusion's
      ``sample_dpmpp_3m_sde``) has D2 without the factor 2, half the Taylor term h^2 phi3 x0'': its step
      is exact only for x0_hat linear in lam, i.e. second order. Here the step is third order.

    The differences D are linear in (m0, m1, m2), so each is computed as its three weights and the step costs one
    weighted sum of tensors. The first steps use lower orders (warm-up), see ``_common.multistep_orders`` (with
    ``lower_order_final`` the last steps do too when n < 10, as in the paper's code). Global order 2 for 2M; for
    3M the first-order first step leaves an O(h^2) term (small: x0_hat varies slowly at high noise), and order
    3 shows once the start is resolved (tests/test_sampler_dpm.py). NFE = 1 per step, plus 1 for the final
    denoising step. Finite where alpha_t = 0 (e^{-h} = 0 there).

    Args: as ``sample_dpm_solver``; order: 2 or 3 (1 gives DDIM); lower_order_final: see above.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    x, g = _common.setup(process, x, ts)
    orders = _common.multistep_orders(g.lam, order, lower_order_final)
    m: list[Tensor] = []  # x0_hat at t_i, t_{i-1}, t_{i-2}
    for i in range(g.n):
        m = [denoiser(x, g.time(i, x), **cond), *m[:2]]
        if g.lands[i]:
            x = m[0]
        else:
            s, h = i + 1, g.h[i]
            a_s = g.alpha[s]
            if orders[i] < 3:  # x_s = sigma_s/sigma_t x_t + alpha_s (1 - e^{-h}) D
                w = [a_s * g.one_minus_em[i] * d for d in _d_2m(g, i, orders[i])]
            else:  # x_s = sigma_s/sigma_t x_t - alpha_s (phi1 m0 - phi2 D1 + phi3 D2), D as weights of (m0, m1, m2)
                r0, r1 = g.h[i - 1] / h, g.h[i - 2] / h
                d10, d11 = (1 / r0, -1 / r0, 0.0), (0.0, 1 / r1, -1 / r1)  # D1_0, D1_1
                D1 = [p + r0 / (r0 + r1) * (p - q) for p, q in zip(d10, d11)]
                D2 = [2 * (p - q) / (r0 + r1) for p, q in zip(d10, d11)]
                phi1 = -g.one_minus_em[i]
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                w = [-a_s * (phi1 * (j == 0) - phi2 * D1[j] + phi3 * D2[j]) for j in range(3)]
            x = _common.combine(g.sigma[s] / g.sigma[i], x, w, m)
        _common.report(callback, i, g, x, m[0], i + 1)
    return _common.finish(denoiser, g, x, final_denoise, cond)


def sample_dpm_solver_pp_sde(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    eta: float = 1.0,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """SDE-DPM-Solver++(2M), "midpoint" form (Lu et al. 2023, Sec. 5 and Appendix; eta as in k-diffusion).

    Per step t -> s with h = lam_s - lam_t, r = (lam_t - lam_{i-1}) / h and m0, m1 as in ``sample_dpm_solver_pp``:

        x_s = sigma_s/sigma_t e^{-eta h} x_t + alpha_s (1 - e^{-(1 + eta) h}) ((1 + 1/(2r)) m0 - 1/(2r) m1)
              + sigma_s sqrt(1 - e^{-2 eta h}) z.

    eta = 1 is the paper's solver of the reverse SDE (its first step is DDPM's ancestral step); eta = 0
    is DPM-Solver++(2M) without the lower-order final step. The first step is first order (m1 = m0), as is
    a step after one from alpha = 0; no lower-order final step (as k-diffusion's ``sample_dpmpp_2m_sde``).
    NFE = 1 per step, plus 1 for the final denoising step; noise only from
    ``generator``, one draw per step not landing on the data.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x, g = _common.setup(process, x, ts)
    orders = _common.multistep_orders(g.lam, 2, False)
    m: list[Tensor] = []  # x0_hat at t_i, t_{i-1}
    for i in range(g.n):
        m = [denoiser(x, g.time(i, x), **cond), *m[:1]]
        if g.lands[i]:
            x = m[0]
        else:
            s, h, em = i + 1, g.h[i], g.em[i]
            D = _d_2m(g, i, orders[i])
            phi = _common.one_minus_exp(1 + eta, h, em)  # 1 - e^{-(1 + eta) h}
            x = _common.combine(g.sigma[s] / g.sigma[i] * em**eta, x, [g.alpha[s] * phi * w for w in D], m)
            std = g.sigma[s] * math.sqrt(_common.one_minus_exp(2 * eta, h, em)) if eta > 0 else 0.0
            if std > 0:
                x = torch.add(x, _common.noise_like(x, generator), alpha=std)
        _common.report(callback, i, g, x, m[0], i + 1)
    return _common.finish(denoiser, g, x, final_denoise, cond)


def sample_dpm_solver_pp_2s_ancestral(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    eta: float = 1.0,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """DPM-Solver++(2S) with ancestral noise ("DPM++ 2S a"): each step a deterministic single-step DPM-Solver++(2S)
    (Lu et al. 2023, Algorithm 1, r = 1/2) down to a level below the target, then fresh noise up to the target, as
    DDPM's ancestral step splits its variance (Ho et al. 2020, Eq. 7; the split of k-diffusion's
    ``sample_dpmpp_2s_ancestral``, Crowson 2022), written for any process in lam.

    Per step t -> s with h = lam_s - lam_t and sigma-tilde = sigma / alpha = e^{-lam}: the noise carries the share
    q = min(1, eta^2 (1 - e^{-2h})) of sigma-tilde_s^2, so the deterministic part ends at lam_d = lam_s -
    log(1 - q) / 2, h' = lam_d - lam_t, e^{-h'} = e^{-h} sqrt(1 - q):

        x_u = sigma_u/sigma_t x_t + alpha_u (1 - e^{-h'/2}) x0_hat(x_t, t),        lam_u = lam_t + h'/2
        x_s = sigma_s/sigma_t sqrt(1 - q) x_t + alpha_s (1 - e^{-h'}) x0_hat(x_u, u) + sigma_s sqrt(q) z.

    eta = 1 takes the noise of DDPM's posterior (q = 1 - e^{-2h}: the deterministic part lands at lam_d = 2 lam_s
    - lam_t); eta = 0 is the deterministic DPM-Solver++(2S), second order. Where q = 1 or alpha_t = 0 (h' is
    infinite: e^{-h'} = 0) the step is first order, x_s = sigma_s/sigma_t sqrt(1 - q) x_t + alpha_s x0_hat(x_t, t)
    + sigma_s sqrt(q) z (one call).
    NFE = 2 per step (1 on such steps and on a step landing on sigma = 0, which returns x0_hat), plus 1 for the final
    denoising step; noise only from ``generator``, one draw per step not landing on the data.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x, g = _common.setup(process, x, ts)
    nfe = 0
    for i in range(g.n):
        x0_hat, nfe = denoiser(x, g.time(i, x), **cond), nfe + 1
        if g.lands[i]:
            x = x0_hat
        else:
            s, h, em = i + 1, g.h[i], g.em[i]
            q = min(1.0, eta**2 * _common.one_minus_exp(2.0, h, em))  # noise share of sigma-tilde_s^2
            keep = math.sqrt(1.0 - q)  # sigma-tilde_d / sigma-tilde_s
            em_d = em * keep  # e^{-h'}
            h_d = h - 0.5 * math.log1p(-q) if q < 1.0 else math.inf  # h' = lam_d - lam_t
            D = x0_hat  # h' infinite (em_d = 0): first order, DDIM's step to lam_d
            if em_d > 0.0:  # the midpoint u at lam_t + h'/2, and x0_hat there
                u = process.t_from_lam(torch.tensor(g.lam[i] + 0.5 * h_d, dtype=torch.float64))
                a_u, s_u = float(process.alpha(u)), float(process.sigma(u))
                x_u = _common.combine(s_u / g.sigma[i], x, [a_u * _common.one_minus_exp(0.5, h_d, em_d)], [x0_hat])
                D, nfe = denoiser(x_u, batch_time(u.to(g.ts.device), x, x.dtype), **cond), nfe + 1
            x = _common.combine(
                g.sigma[s] / g.sigma[i] * keep, x, [g.alpha[s] * _common.one_minus_exp(1.0, h_d, em_d)], [D]
            )
            if q > 0:
                x = torch.add(x, _common.noise_like(x, generator), alpha=g.sigma[s] * math.sqrt(q))
        _common.report(callback, i, g, x, x0_hat, nfe)
    return _common.finish(denoiser, g, x, final_denoise, cond)
