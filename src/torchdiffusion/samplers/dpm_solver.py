"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2023): exponential integrators in lam.

The probability-flow ODE, written in lam = log(alpha / sigma), has the exact solution (h = lam_s - lam_t)

    x_s = alpha_s / alpha_t x_t - alpha_s int_{lam_t}^{lam_s} e^{-lam} eps_hat dlam      (noise form)
    x_s = sigma_s / sigma_t x_t + sigma_s int_{lam_t}^{lam_s} e^{lam} x0_hat dlam        (data form)

(Lu et al. 2022, Prop. 3.1, Eq. 3.4; the data form is DPM-Solver++'s, Lu et al. 2023, Sec. 4). The linear
part is exact; the solvers only
approximate eps_hat or x0_hat as a polynomial in lam, so x / alpha depends on the grid only through
lam and VP, VE, ... agree on one lam grid. (e^h - 1) forms are written with expm1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.process import NoiseProcess
from . import _loop

__all__ = ["sample_dpm_solver", "sample_dpm_solver_pp", "sample_dpm_solver_pp_sde"]

# Intermediate points of the single-step solvers at lam_t + r h (Lu et al. 2022, Algorithms 1 and 2).
_R = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}


def grid_curves(process: NoiseProcess, ts: Tensor) -> tuple[list[float], list[float], list[float]]:
    """alpha, sigma, lam at every time of ``ts`` as float64 lists (lam = -inf where alpha = 0, +inf where sigma = 0)."""
    return process.alpha(ts).tolist(), process.sigma(ts).tolist(), process.lam(ts).tolist()


def one_minus_exp(h: float, em: float) -> float:
    """1 - e^{-h} as -expm1(-h); where h = inf (alpha_t = 0) it is 1 - em, with em = e^{-h} from the curves."""
    return -math.expm1(-h) if math.isfinite(h) else 1.0 - em


def multistep_orders(lam: list[float], order: int, lower_order_final: bool) -> list[int]:
    """The order of each step of a multistep method on a grid with these lam values.

    Warm-up: step i uses at most the i + 1 values x0_hat(t_i), x0_hat(t_{i-1}), ... whose lam is finite
    (a value at lam = -inf, alpha = 0, is infinitely far in lam and carries no information: dropped).
    ``lower_order_final``: the last steps use orders n - i when n < 10 (Lu et al. 2023's implementation).
    """
    n, orders, run = len(lam) - 1, [], 0
    for i in range(n):
        run = run + 1 if math.isfinite(lam[i]) else 0
        k = min(order, max(run, 1))
        orders.append(min(k, n - i) if lower_order_final and n < 10 else k)
    return orders


def _multistep_loop(denoiser, process, x, ts, c_x, w, c_z, final_denoise, generator, callback, cond) -> Tensor:
    """x_s = c_x x_t + sum_j w_j x0_hat(t_{i-j}) + c_z z for each step i; x0_hat at t_i is the step's 1 NFE."""
    lands = [_loop.lands_on_data(process, s) for s in ts[1:]]
    hist: list[Tensor] = []  # x0_hat at t_i, t_{i-1}, t_{i-2}
    for i in range(len(ts) - 1):
        x0_hat = denoiser(x, _loop.batch_t(ts[i], x), **cond)
        hist = [x0_hat, *hist[:2]]
        if lands[i]:
            x = x0_hat
        else:
            y = c_x[i] * x
            for wj, mj in zip(w[i], hist):
                y = y + wj * mj
            x = y + c_z[i] * _loop.noise_like(x, generator) if c_z[i] > 0 else y
        _loop.report(callback, i, ts[i], x, x0_hat, i + 1)
    return _loop.finish(denoiser, process, x, ts[-1], final_denoise, cond)


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

    With eps_hat = (x - alpha x0_hat) / sigma and, per step t -> s, h = lam_s - lam_t:

    - order 1 (Eq. 3.7): x_s = alpha_s/alpha_t x_t - sigma_s (e^h - 1) eps_t  (= DDIM with eta = 0).
    - order 2 (Algorithm 1, r1 = 1/2): u at lam_t + r1 h,
      x_u = alpha_u/alpha_t x_t - sigma_u (e^{r1 h} - 1) eps_t,
      x_s = alpha_s/alpha_t x_t - sigma_s (e^h - 1) eps_t - sigma_s/(2 r1) (e^h - 1) (eps_u - eps_t).
    - order 3 (Algorithm 2, r1 = 1/3, r2 = 2/3): D1 = eps_u1 - eps_t, D2 = eps_u2 - eps_t,
      x_u2 = alpha_u2/alpha_t x_t - sigma_u2 (e^{r2 h} - 1) eps_t - sigma_u2 r2/r1 ((e^{r2 h} - 1)/(r2 h) - 1) D1,
      x_s = alpha_s/alpha_t x_t - sigma_s (e^h - 1) eps_t - sigma_s/r2 ((e^h - 1)/h - 1) D2.

    Intermediate times are ``process.t_from_lam(lam_t + r h)``; r is then recomputed from the lam of that time.
    Global order = ``order``; NFE = ``order`` per step (1 on a step landing on sigma = 0, which returns
    x0_hat, see ``samplers._loop``), plus 1 for the final denoising step.

    The noise form divides by alpha_t: a grid starting where alpha = 0 (Flow at t = 1) is refused; start at
    ``process.t_from_lam(timesteps.LAM_MIN)`` or use ``sample_dpm_solver_pp`` / ``sample_unipc`` (data form).

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat. process: the noise process.
        x: (B, ...) start; not modified. ts: decreasing times (n + 1 for n steps), e.g. ``grid_lam``.
        order: 1, 2 or 3. final_denoise, generator (unused: deterministic), callback: as in ``sample_ddpm``.
    """
    if order not in _R:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    x, ts = _loop.prepare(x, ts)
    a, sg, lam = grid_curves(process, ts)
    if any(ai == 0.0 for ai in a[:-1]):
        raise ValueError(
            "DPM-Solver's noise form divides by alpha(t) = 0 on this grid (e.g. Flow at t = 1); start below t_max, "
            "e.g. at process.t_from_lam(timesteps.LAM_MIN), or use sample_dpm_solver_pp / sample_unipc"
        )
    lam_t = torch.tensor(lam[:-1], dtype=torch.float64)
    h_all = torch.tensor(lam[1:], dtype=torch.float64) - lam_t
    h_all = torch.where(torch.isfinite(h_all), h_all, 0.0)  # the step landing on data needs no midpoints
    mids = []
    for r in _R[order]:
        tu = process.t_from_lam(lam_t + r * h_all)
        mids.append((tu, *grid_curves(process, tu)))
    # stages[i]: (t, alpha, sigma, A, B, C) with y = A x_t - B eps_t - C D_prev (Algorithms 1-2), last one at s
    stages = []
    for i in range(len(ts) - 1):
        if sg[i + 1] == 0.0:  # lands on data: no stages
            stages.append([])
            continue
        h, a_t = lam[i + 1] - lam[i], a[i]
        pts = [(tu[i], au[i], su[i], lu[i] - lam[i]) for tu, au, su, lu in mids] + [(ts[i + 1], a[i + 1], sg[i + 1], h)]
        r = [hk / h for *_, hk in pts]
        st = []
        for k, (tk, ak, sk, hk) in enumerate(pts):
            e = math.expm1(hk)
            if k == 0:
                C = 0.0
            elif order == 2:  # final stage of Algorithm 1
                C = sk * e / (2 * r[0])
            elif k == 1:  # x_u2 of Algorithm 2
                C = sk * r[1] / r[0] * (e / hk - 1)
            else:  # final stage of Algorithm 2
                C = sk / r[1] * (e / hk - 1)
            st.append((tk, ak, sk, ak / a_t, sk * e, C))
        stages.append(st)
    lands = [_loop.lands_on_data(process, s) for s in ts[1:]]
    nfe = 0
    for i in range(len(ts) - 1):
        x0_hat = denoiser(x, _loop.batch_t(ts[i], x), **cond)
        nfe += 1
        if lands[i]:
            x = x0_hat
        else:
            eps_t = (x - a[i] * x0_hat) / sg[i]
            d = None
            for k, (tk, ak, sk, A, B, C) in enumerate(stages[i]):
                y = A * x - B * eps_t if d is None else A * x - B * eps_t - C * d
                if k == len(stages[i]) - 1:
                    x = y
                else:  # the model at the intermediate point u_k
                    d = (y - ak * denoiser(y, _loop.batch_t(tk, y), **cond)) / sk - eps_t
                    nfe += 1
        _loop.report(callback, i, ts[i], x, x0_hat, nfe)
    return _loop.finish(denoiser, process, x, ts[-1], final_denoise, cond)


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

    The first steps use lower orders (warm-up), see ``multistep_orders`` (with ``lower_order_final``
    the last steps do too when n < 10, as in the paper's code). Global order 2 for 2M; for 3M the
    first-order first step leaves an O(h^2) term (small: x0_hat varies slowly at high noise), and order
    3 shows once the start is resolved (tests/test_sampler_dpm.py). NFE = 1 per step, plus 1 for the
    final denoising step. Finite where alpha_t = 0 (e^{-h} = 0 there, see ``one_minus_exp``).

    Args: as ``sample_dpm_solver``; order: 2 or 3 (1 gives DDIM); lower_order_final: see above.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    x, ts = _loop.prepare(x, ts)
    a, sg, lam = grid_curves(process, ts)
    c_x, w = [], []
    for i, k in enumerate(multistep_orders(lam, order, lower_order_final)):
        if sg[i + 1] == 0.0:  # lands on data
            c_x.append(0.0), w.append([])
            continue
        h = lam[i + 1] - lam[i]
        phi = one_minus_exp(h, sg[i + 1] * a[i] / (a[i + 1] * sg[i]))
        c_x.append(sg[i + 1] / sg[i])
        if k == 1:
            w.append([a[i + 1] * phi])
        elif k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            w.append([a[i + 1] * phi * (1 + 1 / (2 * r0)), -a[i + 1] * phi / (2 * r0)])
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d10 = torch.tensor([1 / r0, -1 / r0, 0.0], dtype=torch.float64)  # weights of (m0, m1, m2)
            diff = d10 - torch.tensor([0.0, 1 / r1, -1 / r1], dtype=torch.float64)
            d1, d2 = d10 + r0 / (r0 + r1) * diff, 2 * diff / (r0 + r1)
            phi1 = -phi
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            m0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
            w.append((-a[i + 1] * (phi1 * m0 - phi2 * d1 + phi3 * d2)).tolist())
    c_z = [0.0] * len(c_x)
    return _multistep_loop(denoiser, process, x, ts, c_x, w, c_z, final_denoise, generator, callback, cond)


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
    x, ts = _loop.prepare(x, ts)
    a, sg, lam = grid_curves(process, ts)
    c_x, w, c_z = [], [], []
    for i, k in enumerate(multistep_orders(lam, 2, False)):
        if sg[i + 1] == 0.0:  # lands on data
            c_x.append(0.0), w.append([]), c_z.append(0.0)
            continue
        h = lam[i + 1] - lam[i]
        em = sg[i + 1] * a[i] / (a[i + 1] * sg[i])  # e^{-h} from the curves (0 where alpha_t = 0)
        c_x.append(sg[i + 1] / sg[i] * em**eta)
        phi = one_minus_exp((1 + eta) * h, em ** (1 + eta))
        c_z.append(sg[i + 1] * math.sqrt(one_minus_exp(2 * eta * h, em ** (2 * eta)) if eta > 0 else 0.0))
        if k == 1:
            w.append([a[i + 1] * phi])
        else:
            r = (lam[i] - lam[i - 1]) / h
            w.append([a[i + 1] * phi * (1 + 1 / (2 * r)), -a[i + 1] * phi / (2 * r)])
    return _multistep_loop(denoiser, process, x, ts, c_x, w, c_z, final_denoise, generator, callback, cond)
