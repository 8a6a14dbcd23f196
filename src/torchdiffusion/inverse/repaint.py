"""RePaint: inpainting with an unconditional DDPM and resampling (Lugmayr et al. 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.measurements import Mask, Measurement
from ..core.process import NoiseProcess
from ..samplers import _common
from ..samplers.ddim import ddim_step
from ._common import observation

__all__ = ["sample_repaint", "repaint_schedule", "repaint_budget"]


def repaint_schedule(n: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """The indices of ``ts`` that RePaint visits on an n-step grid, from 0 (ts[0], noise) to n (ts[n], data).

    Lugmayr et al. 2022, Sec. 4.2 and their code's ``get_schedule_jump`` (with ``n_sample = 1``), written on grid
    indices: index i is their time T - i. A move i -> i + 1 is one reverse step; a move i -> i - j (j =
    ``jump_length``) is one jump back to the noisier ts[i - j]. The jump points are the indices i = n, n - j, n - 2j,
    ... with i > j (their times 0, j, 2j, ... < T - j); the first time the walk reaches a jump point it jumps back
    ``jump_n_sample - 1`` times, re-descending j steps after each jump. So each block of j steps ending at a jump
    point is run ``jump_n_sample`` times, the blocks above the first jump point once, and the walk makes
    n + (jump_n_sample - 1) j len(range(n, j, -j)) reverse steps.

    Their code climbs the j levels one forward step q(x_{t+1} | x_t) at a time; the chain of Gaussian transitions
    is one transition q(x_t | x_s) from s = ts[i] to t = ts[i - j], which ``sample_repaint`` draws at once (the
    same law, one draw instead of j).
    """
    for name, v in (("n", n), ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"repaint_schedule: {name} must be a positive int, got {v!r}")
    j = jump_length
    jumps = {i: jump_n_sample - 1 for i in range(n, j, -j)}  # jump point -> jumps left
    path, i = [0], 0
    while i < n:
        i += 1
        path.append(i)
        if jumps.get(i, 0) > 0:
            jumps[i] -= 1
            i -= j
            path.append(i)
    return path


def repaint_calls(n: int, jump_length: int, jump_n_sample: int) -> int:
    """Denoiser calls of ``sample_repaint`` on an n-step grid: one per reverse step of the schedule, and the
    final denoise."""
    path = repaint_schedule(n, jump_length, jump_n_sample)
    return sum(1 for a, b in zip(path[:-1], path[1:]) if b > a) + 1


def repaint_budget(nfe: int) -> dict:
    """RePaint's knobs for a budget of ``nfe`` denoiser calls: ``{"steps", "jump_length", "jump_n_sample"}``.

    Lugmayr et al.'s jumps (length 10, 10 resamplings: about 10 calls per step) where the budget buys at least two
    blocks of them; below, shorter jumps with fewer resamplings (5/5, 3/3, 2/2, none), so that the chain keeps at
    least nfe / 4 distinct steps. ``steps`` is the largest grid whose calls fit.
    """
    if not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"repaint_budget: nfe must be an int >= 2 (a step and the final denoise), got {nfe!r}")

    def fit(jl: int, jn: int) -> int:
        n = 0
        while repaint_calls(n + 1, jl, jn) <= nfe:
            n += 1
        return n

    for jl, jn in ((10, 10), (5, 5), (3, 3), (2, 2)):
        n = fit(jl, jn)
        if n >= max(2 * jl, nfe // 4):
            return {"steps": n, "jump_length": jl, "jump_n_sample": jn}
    return {"steps": fit(1, 1), "jump_length": 1, "jump_n_sample": 1}


def sample_repaint(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    ts,
    measurement: Measurement,
    *,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    callback=None,
    **cond,
) -> Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1 and Eqs. 8-10, with the jumps of Sec. 4.2).

    Inpainting only: ``measurement`` must be ``Measurement(Mask(m) or Outpaint(...), y, 0)``, y = m * x0; other
    operators are refused (use ``sample_ddnm`` or ``sample_ddrm`` for any A at sigma_y = 0, ``sample_dps`` /
    ``sample_pigdm`` for noisy y), and so is sigma_y > 0 (the known part is taken as exact). Each reverse step
    t = ts[i] -> s = ts[i+1] is

        x_s^known   = alpha_s y + sigma_s eps,  eps ~ N(0, I)       (Eq. 8: a draw of q(x_s | x0 = y))
        x_s^unknown = DDPM ancestral step from x_t                  (Eq. 9: q(x_s | x_t, x0_hat), ``ddim_step``, eta 1)
        x_s         = m * x_s^known + (1 - m) * x_s^unknown          (Eq. 10)

    and the walk over ``ts`` is ``repaint_schedule(len(ts) - 1, jump_length, jump_n_sample)``: after a block of
    ``jump_length`` steps it jumps back with the forward transition q(x_t | x_s), exact for any process,

        x_t = (alpha_t / alpha_s) x_s + sigma_ts z,  sigma_ts^2 = ``process.transition_var(s, t)``,

    and re-descends, so the unknown part harmonizes with the known one (``jump_n_sample`` passes of each block).
    The paper's defaults (j = 10, r = 10 on 250 steps) are kept; they cost about r times the steps (NFE below),
    and a grid of n <= j steps has no jump (plain Algorithm 1 with U = 1). At ts[-1] (``final_denoise``, sigma > 0)
    the result is m * y + (1 - m) * x0_hat, Algorithm 1's last step with eps = 0, so A x = y exactly; without
    ``final_denoise`` the known part is the draw alpha y + sigma eps at ts[-1]. Not exact in general: the unknown
    part sees y only through x_t; the resampling reduces, never removes, the mismatch. Exact (up to the DDPM steps'
    discretization) when the prior makes the masked and unmasked entries independent.

    Args: as ``samplers.sample_ddpm``; measurement: ``Measurement(Mask(m), y, 0)``, y of batch 1 or B;
        jump_length: j >= 1, the steps of a jump ("jump_length"); jump_n_sample: r >= 1, the passes over each
        block ("jump_n_sample"; r = 1: no resampling). callback: called after each reverse step with {"i" (the
        grid index it started from, repeated when a block is resampled), "t", "x", "x0_hat", "nfe"}.
    Returns:
        samples shaped like x. NFE = n + (r - 1) j len(range(n, j, -j)) for n = len(ts) - 1, plus 1 for the final
        denoising step.
    """
    y = observation(measurement, x, noiseless="sample_repaint")
    A = measurement.operator
    if not isinstance(A, Mask):
        raise ValueError(
            f"sample_repaint is for inpainting masks (Mask, Outpaint), got {type(A).__name__}; "
            "use sample_ddnm or sample_ddrm (sigma_y = 0) or sample_dps / sample_pigdm for other operators"
        )
    x, g = _common.setup(process, x, ts)
    path = repaint_schedule(g.n, jump_length, jump_n_sample)
    m = A.mask.to(device=x.device) > 0  # where (not lerp) keeps y exact: u + (y - u) rounds
    y = torch.where(m, y, 0.0)  # the known entries; whatever y holds where m = 0 is ignored
    # the forward jumps ts[i] -> ts[i - j], their coefficients once (a jump never starts at ts[0])
    starts = sorted({a for a, b in zip(path, path[1:]) if b < a})
    s_t = g.ts[starts] if starts else g.ts[:0]
    t_t = g.ts[[a - jump_length for a in starts]] if starts else g.ts[:0]
    jump_std = dict(zip(starts, process.transition_var(s_t, t_t).sqrt().tolist()))
    nfe = 0
    for a, b in zip(path, path[1:]):
        if b == a + 1:  # reverse step ts[a] -> ts[b]: Eqs. 8-10
            x0_hat = denoiser(x, g.time(a, x), **cond)
            nfe += 1
            unknown = ddim_step(g, a, x, x0_hat, 1.0, generator)
            known = g.alpha[b] * y
            if g.sigma[b] > 0:
                known = torch.add(known, _common.noise_like(x, generator), alpha=g.sigma[b])
            x = torch.where(m, known, unknown)  # m * known + (1 - m) * unknown
            _common.report(callback, a, g, x, x0_hat, nfe)
        else:  # jump back ts[a] -> ts[b]: x_t ~ q(x_t | x_s)
            x = torch.add(g.alpha[b] / g.alpha[a] * x, _common.noise_like(x, generator), alpha=jump_std[a])
    if final_denoise and g.sigma[-1] > 0:
        x = torch.where(m, y, denoiser(x, g.time(-1, x), **cond))
    return x
