"""UniPC: a unified predictor-corrector for diffusion ODEs (Zhao et al. 2023), data-prediction form."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.process import NoiseProcess
from . import _common

__all__ = ["sample_unipc"]


def unipc_rhos(h: float, rks: list[float], p: int, bh1: bool) -> tuple[float, list[float], list[float]]:
    """B(h) and the predictor / corrector weights rho^p, rho^c of one UniPC step (Zhao et al. 2023, Sec. 3).

    rks are r_k = (lam_{i-k} - lam_i) / h, k = 1..p-1. With phi_k the exponential-integrator functions
    of -h, the order conditions are R rho = b, R_{jk} = r_k^{j-1} (r_p = 1), b_j = (-h) phi_{j+1}(-h) j! / B(h)
    (the order conditions behind Theorem 3.1). As in the paper's code: UniP-2 uses rho^p = 1/2 and UniC-1 rho^c = 1/2,
    their limits as h -> 0.
    """
    hh = -h
    B = hh if bh1 else math.expm1(hh)
    h_phi = math.expm1(hh) / hh - 1  # hh phi_2(hh)
    b, fact = [], 1
    for j in range(1, p + 1):
        b.append(h_phi * fact / B)
        fact *= j + 1
        h_phi = h_phi / hh - 1 / fact
    r = torch.tensor([*rks, 1.0], dtype=torch.float64)
    R = torch.stack([r ** (j - 1) for j in range(1, p + 1)])
    bt = torch.tensor(b, dtype=torch.float64)
    if p == 1:
        rho_p = []
    elif p == 2:
        rho_p = [0.5]
    else:
        rho_p = torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
    rho_c = [0.5] if p == 1 else torch.linalg.solve(R, bt).tolist()
    return B, rho_p, rho_c


def sample_unipc(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    *,
    order: int = 2,
    bh1: bool = False,
    lower_order_final: bool = True,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """UniPC multistep sampler: UniP-p predictor, UniC corrector, data prediction (Zhao et al. 2023, Sec. 3).

    Per step t_i -> s = t_{i+1}, h = lam_s - lam_i, m_k = x0_hat at t_{i-k} (m_0 at t_i), r_k = (lam_{i-k} - lam_i)/h,
    D_k = (m_k - m_0) / r_k and B(h) = e^{-h} - 1 ("bh2") or -h ("bh1"):

        x~_s  = sigma_s/sigma_i x_i + alpha_s (1 - e^{-h}) m_0                              (DDIM part)
        x_s^p = x~_s - alpha_s B(h) sum_{k<p} rho^p_k D_k                                    (UniP-p, Sec. 3.2)
        m_s   = x0_hat(x_s^p, s)                                                             (the step's 1 NFE)
        x_s   = x~_s - alpha_s B(h) (sum_{k<p} rho^c_k D_k + rho^c_p (m_s - m_0))            (UniC-p, Sec. 3.1)

    The corrector reuses m_s, which the next step needs anyway, so NFE = 1 per step (plus 1 for the
    final denoising step); it is not applied after the last step (nothing would reuse it). UniP-p has
    order p and UniC raises it to p + 1 (Theorem 3.1). Warm-up and ``lower_order_final`` (last steps of
    lower order when n < 10, as in DPM-Solver++'s code; UniPC's own code does so for every n, which caps
    the global order at 2) as ``_common.multistep_orders``. A step from alpha = 0 (Flow at t = 1) is a
    DDIM step without corrector; a step landing on sigma = 0 returns m_0 (``samplers._common``).

    Args: as ``sample_dpm_solver``; order: predictor order p (1, 2 or 3; global order p + 1, for p = 3
        approached once the first-order start matters less, see tests/test_sampler_dpm.py);
        bh1: B(h) = h (the paper's "bh1") instead of e^h - 1 ("bh2", in the paper's sign convention).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if not isinstance(bh1, bool):
        raise TypeError(f"bh1 must be True (B(h) = h) or False (B(h) = e^h - 1), got {bh1!r}")
    x, g = _common.setup(process, x, ts)
    orders = _common.multistep_orders(g.lam, order, lower_order_final)
    m = [denoiser(x, g.time(0, x), **cond)] if g.n > 0 else []  # x0_hat at t_i, t_{i-1}, ...
    nfe = len(m)
    for i in range(g.n):
        m0, s, h, p = m[0], i + 1, g.h[i], orders[i]
        if g.lands[i]:
            x = m0
            _common.report(callback, i, g, x, m0, nfe)
            continue
        a_s, c_x = g.alpha[s], g.sigma[s] / g.sigma[i]
        if math.isfinite(h):  # UniP-p: the DDIM part plus B(h) sum rho^p_k D_k, gathered as weights of m_0, m_k
            rks = [(g.lam[i - k] - g.lam[i]) / h for k in range(1, p)]
            B, rho_p, rho_c = unipc_rhos(h, rks, p, bh1)
            D = [1 / r for r in rks]  # D_k = (m_k - m_0) / r_k
            w_p = [a_s * g.one_minus_em[i] + a_s * B * sum(rho * d for rho, d in zip(rho_p, D))]
            w_p += [-a_s * B * rho * d for rho, d in zip(rho_p, D)]
        else:  # from alpha = 0: the DDIM step, no corrector
            w_p = [a_s * g.one_minus_em[i]]
        x_pred = _common.combine(c_x, x, w_p, m)
        if i == g.n - 1:  # nothing would reuse x0_hat(x_s^p, s): no corrector after the last step
            x = x_pred
        else:
            m_s = denoiser(x_pred, g.time(s, x_pred), **cond)
            nfe += 1
            if math.isfinite(h):  # UniC-p: the same with rho^c, plus rho^c_p (m_s - m_0)
                w_c = [a_s * g.one_minus_em[i] + a_s * B * (sum(rho * d for rho, d in zip(rho_c, D)) + rho_c[-1])]
                w_c += [-a_s * B * rho * d for rho, d in zip(rho_c, D)]
                x = torch.add(_common.combine(c_x, x, w_c, m), m_s, alpha=-a_s * B * rho_c[-1])
            else:
                x = x_pred
            m = [m_s, *m[: order - 1]]
        _common.report(callback, i, g, x, m0, nfe)
    return _common.finish(denoiser, g, x, final_denoise, cond)
