"""The exact log-likelihood of a diffusion model along its probability-flow ODE (conventions: ``likelihood``)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..core.process import NoiseProcess, as_time, batch_time
from ._common import F64, gauss_logp, index_cond

_ADAPTIVE = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq's adaptive solvers


def _divergence(y: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """div_x y (B,) for y, x (B, D): exactly (D backward passes) or by Hutchinson with probes (P, B, D)."""
    if not y.requires_grad:  # y does not depend on x
        return torch.zeros(x.shape[0], dtype=y.dtype, device=y.device)
    if probes is None:
        cols = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1])]
        return torch.stack(cols, 1).sum(1)
    vjps = [torch.autograd.grad(y, x, e, retain_graph=True)[0] for e in probes]
    return torch.stack([(g * e).sum(1) for g, e in zip(vjps, probes)]).mean(0)


def _ode_logp(denoiser, process, x, probes, t0, t1, rtol, atol, method, cond):
    """Integrate d/dt [x, delta] = [v, div v] from t0 to t1; return (delta, x_T, nfe)."""
    shape, dtype, (B, D) = x.shape, x.dtype, x.flatten(1).shape
    nfe = 0

    def fn(t, state):
        nonlocal nfe
        nfe += 1
        # v = c_x x + c_0 x0_hat (the process's probability-flow velocity): div v = D c_x + c_0 div x0_hat.
        c_x, c_0 = process.ode_velocity_coeffs(t)
        with torch.enable_grad():
            xg = state[0].detach().requires_grad_(True)
            x0_hat = denoiser(xg.reshape(shape).to(dtype), batch_time(t, xg, dtype), **cond).reshape(B, -1).to(F64)
            div = D * c_x + c_0 * _divergence(x0_hat, xg, probes)
        return c_x * state[0] + c_0 * x0_hat.detach(), div.detach()

    state = (x.detach().reshape(B, -1).to(F64), torch.zeros(B, dtype=F64, device=x.device))
    ts = torch.tensor([t0, t1], dtype=F64, device=x.device)
    # step_t: adaptive steps land on t1 instead of evaluating past it (undefined beyond t_max for Cosine).
    options = {"step_t": ts} if method in _ADAPTIVE else None
    xs, delta = odeint(fn, state, ts, rtol=rtol, atol=atol, method=method, options=options)
    return delta[-1], xs[-1].reshape(shape), nfe


def log_likelihood(
    denoiser,
    process: NoiseProcess,
    x: Tensor,
    *,
    exact_trace: bool | None = None,
    n_probes: int = 1,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    t_start: float | None = None,
    t_end: float | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    return_info: bool = False,
    **cond,
):
    """log p_{t_start}(x) by the instantaneous change of variables (Chen et al. 2018, Thm 1; Song et
    al. 2021, Eq. 39 and Appendix D.2), per example (B,), in nats.

    Along the probability-flow ODE dx/dt = v(x, t) = alpha' x0_hat + sigma' eps_hat (``NoiseProcess.ode_velocity``),
    d log p_t(x(t)) / dt = -div v, so integrating d/dt [x, delta] = [v, div v] from t_start to t_end
    (torchdiffeq ``odeint``, float64) gives log p_{t_start}(x) = log N(x_T; 0, sigma(t_end)^2 I) + delta.
    With v = c_x x + c_0 x0_hat (c_x = sigma'/sigma, c_0 = alpha' - sigma' alpha/sigma), div v =
    D c_x + c_0 div x0_hat: only the denoiser's divergence is computed, exactly (D backward passes;
    default for D <= 16) or by the Hutchinson-Skilling estimate E[e^T (d x0_hat/dx) e] (Hutchinson
    1989; Skilling 1989) with ``n_probes`` probes per example, Rademacher or Gaussian, drawn once per
    call from ``generator`` and held fixed along the ODE, as Song et al. do: the result is then an
    unbiased estimate of the log-density (for Gaussian probes, leaving out the known D c_x removes
    its share of the variance).

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat, differentiable in x.
        process: the noise process. x: points (B, ...), not modified.
        t_start, t_end: default ``process.t_min``, ``process.t_max``.
        batch_size: examples per ODE solve (all by default); ``progress`` shows a bar over batches.
        return_info: also return {"nfe": ODE function evaluations (= denoiser calls), summed over
            batches, "prior": log N(x_T; 0, sigma^2 I) (B,), "delta": int div v dt (B,), "x_T"}.
    """
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")
    t0 = process.t_min if t_start is None else float(t_start)
    t1 = process.t_max if t_end is None else float(t_end)
    B, D = x.shape[0], x[0].numel()
    exact = D <= 16 if exact_trace is None else exact_trace
    probes = None
    if not exact:  # drawn once per call, so the result does not depend on batch_size
        if probe == "gaussian":
            probes = torch.randn(n_probes, B, D, generator=generator, device=x.device, dtype=F64)
        else:
            probes = torch.randint(0, 2, (n_probes, B, D), generator=generator, device=x.device).to(F64) * 2 - 1
    size = batch_size or B
    starts = range(0, B, size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="log-likelihood", unit="batch", dynamic_ncols=True, leave=False)
    deltas, x_ends, nfe = [], [], 0
    for lo in starts:
        sl = slice(lo, lo + size)
        sub = index_cond(cond, B, sl)
        p = None if probes is None else probes[:, sl]
        delta, x_end, n = _ode_logp(denoiser, process, x[sl], p, t0, t1, rtol, atol, method, sub)
        deltas.append(delta)
        x_ends.append(x_end)
        nfe += n
    delta, x_end = torch.cat(deltas), torch.cat(x_ends)
    var = float(process.sigma(as_time(t1))) ** 2
    prior = gauss_logp(x_end.reshape(B, -1), 0.0, var)
    if return_info:
        return prior + delta, {"nfe": nfe, "prior": prior, "delta": delta, "x_T": x_end}
    return prior + delta
