"""Likelihoods of a diffusion model: the variational bounds and the exact ODE log-likelihood.

Convention (once, for this module and ``dequantize``):

- Every result is per example, shape (B,), in nats, summed over the D numbers of an example.
  Bits per dimension = nats / (D ln 2) (``dequantize.bits_per_dim``).
- Signs. ``log_likelihood`` and ``elbo`` return log p(x0) and a lower bound on it (higher is
  better). ``vlb_terms`` and ``vlb`` return losses, as Ho et al. 2020 Eq. 5 writes them:
  L = L_T + sum_t L_{t-1} + L_0 = -ELBO >= -log p(x0).
- Densities are those of x0 in the space the model sees. Data in another space (pixels, 8-bit
  cells) enter through an explicit change of variables: ``dequantize``.
- The prior at the noisy end t_end is N(0, sigma(t_end)^2 I), which is ``process.prior_logp`` at
  the default t_end = t_max: where alpha(t_end) x0 is not negligible, the results include that
  mismatch (a bound says so with its prior term; the ODE likelihood is off by
  log p_T(x_T) - log N(x_T; 0, sigma^2 I)).
- Noise, probes and times come only from ``generator``. Monte-Carlo estimates over several draws
  per example come with their standard error.
- Coefficients and ODE states are float64; the denoiser is called in the dtype of the data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint

from .dequantize import discretized_gaussian_logp
from .process import NoiseProcess, _as_t

__all__ = ["vlb_terms", "vlb", "elbo", "log_likelihood"]

F64 = torch.float64
_ADAPTIVE = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq's adaptive solvers
LAM_FLOOR = -15.0  # where lam(t_max) = -inf (Flow), the continuous bound starts at t_from_lam(LAM_FLOOR)


def _gauss_logp(x: Tensor, mean, var: float) -> Tensor:
    """log N(x; mean, var I) summed over dims 1.. of (B, D) float64 tensors."""
    return -0.5 * ((x - mean) ** 2 / var).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi * var)


def _kl_prior(process: NoiseProcess, x0: Tensor, t_end: float) -> Tensor:
    """KL(q(x_T | x0) || N(0, sigma(T)^2 I)) for x0 (B, D): the prior term L_T (Ho et al. 2020, Eq. 5)."""
    a, s = (float(c) for c in process.alpha_sigma(_as_t(t_end)))
    return 0.5 * (a**2 * x0**2 / s**2).sum(1)  # the variances match: only the mean term is left


def _index_cond(cond: dict, B: int, index) -> dict:
    """Per-example conditioning tensors (leading dim B) indexed like the examples; the rest as is."""
    return {k: v[index] if isinstance(v, Tensor) and v.ndim and v.shape[0] == B else v for k, v in cond.items()}


def _sq_err_rows(denoiser, process, x0, idx, t, generator, chunk, cond) -> Tensor:
    """||x0 - x0_hat(x_t, t)||^2 (float64) for rows (example idx[i], time t[i]), x_t ~ q(x_t | x0)."""
    out = []
    for lo in range(0, len(idx), chunk):
        i, tc = idx[lo : lo + chunk], t[lo : lo + chunk]
        xs = x0[i]
        xt = process.perturb(xs, tc, torch.randn(xs.shape, generator=generator, device=xs.device, dtype=xs.dtype))
        x0_hat = denoiser(xt, tc.to(xs.dtype), **_index_cond(cond, x0.shape[0], i))
        out.append(((xs - x0_hat).flatten(1).to(F64) ** 2).sum(1))
    return torch.cat(out)


def _per_example(contrib: Tensor, B: int, n: int) -> tuple[Tensor, Tensor]:
    """Mean over the n draws of each example (rows are example-major) and its standard error."""
    c = contrib.view(B, n)
    se = c.std(1) / math.sqrt(n) if n > 1 else torch.full((B,), math.nan, dtype=F64, device=c.device)
    return c.mean(1), se


def vlb_terms(
    denoiser,
    process: NoiseProcess,
    x0: Tensor,
    *,
    n_t: int | None = None,
    importance: bool = True,
    decoder: str = "gaussian",
    bins: int = 256,
    chunk: int = 65536,
    generator: torch.Generator | None = None,
    **cond,
) -> dict[str, Tensor]:
    """The terms of DDPM's variational bound (Ho et al. 2020, Eq. 5; seed 003, "ELBO"), each (B,).

    "prior"     L_T = KL(q(x_T | x0) || N(0, sigma_T^2 I)), closed form.
    "diffusion" sum_{t=2..T} L_{t-1}, L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) with one
                x_t ~ q(x_t | x0) per term. The model step is the posterior with x0_hat in place of
                x0 and Ho's fixed variance sigma_t^2 = beta-tilde_t (the posterior variance), so
                L_{t-1} = c_0^2 ||x0 - x0_hat||^2 / (2 beta-tilde_t) = (snr(t-1) - snr(t))/2 ||.||^2
                (Ho et al. 2020, Eq. 8; c_0 the x0-coefficient of the posterior mean, Eq. 7).
                n_t=None sums all T - 1 terms; else n_t draws of t per example, unbiased: with
                probability proportional to lam(t-1) - lam(t) (``importance``, the discrete form of
                uniform log-SNR sampling, Kingma et al. 2021) or uniform on 2..T.
    "decoder"   L_0 = -log p(x0 | x_1), p centred at x0_hat(x_1, 1) with variance sigma_1^2 = beta_1
                (the weight 1/(2 beta_1) of losses.py): "gaussian" is N(x0_hat, beta_1 I), a density;
                "discretized" is Ho's Eq. 13 for data on ``bins`` levels in [-1, 1], a probability.
    "total"     the sum: -ELBO >= -log p(x0) (a density for "gaussian", a probability mass for
                "discretized"). With n_t >= 2 also "stderr": that of "diffusion" over its n_t
                draws of (t, x_t), the bulk of the Monte-Carlo error (L_0 uses one x_1).

    Args:
        denoiser: (x, t (B,), **cond) -> x0_hat. process: a discrete-time process (``Discrete``).
        x0: data (B, ...). chunk: rows (example, t) per denoiser call. cond: per-example tensors
            are indexed along with x0.
    """
    T = process.n_steps
    if T is None:
        raise ValueError("vlb_terms needs a discrete-time process (Discrete); use elbo() in continuous time")
    if decoder not in ("gaussian", "discretized"):
        raise ValueError(f"decoder must be 'gaussian' or 'discretized', got {decoder!r}")
    B, dev = x0.shape[0], x0.device
    flat = x0.flatten(1).to(F64)
    terms = {"prior": _kl_prior(process, flat, float(T))}
    steps = torch.arange(2, T + 1, dtype=F64, device=dev)
    if n_t is None:  # every t = 2..T once per example
        n, t, scale = T - 1, steps.repeat(B), torch.ones((), dtype=F64)
    else:
        n = int(n_t)
        if importance:
            p = process.lam(steps - 1) - process.lam(steps)
            p = p / p.sum()
            k = torch.multinomial(p.to(dev), B * n, replacement=True, generator=generator)
            t, scale = steps[k], 1 / p[k]
        else:
            t = torch.randint(2, T + 1, (B * n,), generator=generator, device=dev).to(F64)
            scale = torch.full_like(t, float(T - 1))
    idx = torch.arange(B, device=dev).repeat_interleave(n)
    _, c_0, var = process.posterior_coeffs(t - 1, t)
    contrib = scale * c_0**2 / (2 * var) * _sq_err_rows(denoiser, process, x0, idx, t, generator, chunk, cond)
    if n_t is None:
        terms["diffusion"] = contrib.view(B, n).sum(1)
    else:
        terms["diffusion"], se = _per_example(contrib, B, n)
    # L_0: decoder at t = 1 with variance sigma_1^2 = 1 - alpha_bar_1 = beta_1.
    one = torch.ones(B, dtype=F64, device=dev)
    x1 = process.perturb(x0, one, torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype))
    x0_hat = denoiser(x1, one.to(x0.dtype), **cond).flatten(1).to(F64)
    var1 = float(process.sigma(_as_t(1.0))) ** 2
    if decoder == "gaussian":
        terms["decoder"] = -_gauss_logp(flat, x0_hat, var1)
    else:
        terms["decoder"] = -discretized_gaussian_logp(flat, x0_hat, math.sqrt(var1), bins)
    terms["total"] = terms["prior"] + terms["diffusion"] + terms["decoder"]
    if n_t is not None and n > 1:
        terms["stderr"] = se
    return terms


def vlb(denoiser, process: NoiseProcess, x0: Tensor, **kwargs) -> Tensor:
    """The negative ELBO of DDPM, -ELBO >= -log p(x0), in nats (B,): ``vlb_terms(...)["total"]``."""
    return vlb_terms(denoiser, process, x0, **kwargs)["total"]


def elbo(
    denoiser,
    process: NoiseProcess,
    x0: Tensor,
    *,
    n_t: int = 8,
    importance: bool = True,
    t_start: float | None = None,
    t_end: float | None = None,
    chunk: int = 65536,
    generator: torch.Generator | None = None,
    return_terms: bool = False,
    **cond,
):
    """Continuous-time ELBO <= log p(x0) (Kingma et al. 2021, Eq. 17-18, in x0 units), per example.

        -ELBO = KL(q(x_T | x0) || N(0, sigma_T^2 I))                                      prior
                + int_{t_start}^{t_end} -snr'(t)/2 E_eps ||x0 - x0_hat(x_t, t)||^2 dt         diffusion
                + E[-log N(x0; x_{t_start} / alpha, (sigma / alpha)^2 I)]                     reconstruction

    with -snr'(t) = alpha^2 g^2 / sigma^4. The reconstruction term does not depend on the model:
    x_{t_start}/alpha - x0 = (sigma/alpha) eps, so it is D/2 (1 + log 2 pi) - D lam(t_start).
    The diffusion integral is estimated with n_t draws per example. ``importance`` (default) draws
    lam uniformly on [lam(t_end), lam(t_start)]: snr = e^{2 lam} gives -snr'(t) dt = -2 snr dlam, so
    the integral is int snr(lam) E||x0 - x0_hat||^2 dlam = int E||eps - eps_hat||^2 dlam, and each
    draw contributes (lam(t_start) - lam(t_end)) snr ||x0 - x0_hat||^2 at t = t_from_lam(lam). Else t
    is uniform and a draw contributes (t_end - t_start) (-snr'(t)/2) ||x0 - x0_hat||^2. Where
    lam(t_end) = -inf (Flow at t = 1) the bound starts at t_end = t_from_lam(LAM_FLOOR), whose
    prior term alpha^2 ||x0||^2 / (2 sigma^2) is about 1e-13 ||x0||^2: a bound for the model whose
    reverse process starts there.

    Returns:
        (elbo (B,), stderr (B,)): stderr of the diffusion estimate (NaN for n_t = 1); with
        ``return_terms`` also a dict of the three losses "prior", "diffusion", "reconstruction".
    """
    if process.n_steps is not None:
        raise ValueError("elbo is the continuous-time bound; use vlb()/vlb_terms() on a discrete-time process")
    t0 = process.t_min if t_start is None else float(t_start)
    t1 = process.t_max if t_end is None else float(t_end)
    lam_hi, lam_lo = float(process.lam(_as_t(t0))), float(process.lam(_as_t(t1)))
    if not math.isfinite(lam_lo):
        t1, lam_lo = float(process.t_from_lam(_as_t(LAM_FLOOR))), LAM_FLOOR
    B, dev, D = x0.shape[0], x0.device, x0[0].numel()
    u = torch.rand(B * n_t, generator=generator, device=dev, dtype=F64)
    if importance:
        lam = lam_lo + (lam_hi - lam_lo) * u
        t, w = process.t_from_lam(lam), (lam_hi - lam_lo) * torch.exp(2 * lam)
    else:
        t = t0 + (t1 - t0) * u
        a, s = process.alpha_sigma(t)
        w = (t1 - t0) * a**2 * process.g2(t) / (2 * s**4)
    idx = torch.arange(B, device=dev).repeat_interleave(n_t)
    diffusion, se = _per_example(w * _sq_err_rows(denoiser, process, x0, idx, t, generator, chunk, cond), B, n_t)
    terms = {
        "prior": _kl_prior(process, x0.flatten(1).to(F64), t1),
        "diffusion": diffusion,
        "reconstruction": torch.full((B,), D / 2 * (1 + math.log(2 * math.pi)) - D * lam_hi, dtype=F64, device=dev),
    }
    est = -(terms["prior"] + terms["diffusion"] + terms["reconstruction"])
    return (est, se, terms) if return_terms else (est, se)


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
        # v = alpha' x0_hat + sigma' eps_hat = c_x x + c_0 x0_hat: div v = D c_x + c_0 div x0_hat.
        (a, s), da, ds = process.alpha_sigma(t), process.d_alpha(t), process.d_sigma(t)
        c_x, c_0 = ds / s, da - ds * a / s
        with torch.enable_grad():
            xg = state[0].detach().requires_grad_(True)
            x0_hat = denoiser(xg.reshape(shape).to(dtype), t.to(dtype).expand(B), **cond).reshape(B, -1).to(F64)
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

    Along the probability-flow ODE dx/dt = v(x, t) = alpha' x0_hat + sigma' eps_hat (``x0_to("flow")``),
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
        sub = _index_cond(cond, B, sl)
        p = None if probes is None else probes[:, sl]
        delta, x_end, n = _ode_logp(denoiser, process, x[sl], p, t0, t1, rtol, atol, method, sub)
        deltas.append(delta)
        x_ends.append(x_end)
        nfe += n
    delta, x_end = torch.cat(deltas), torch.cat(x_ends)
    var = float(process.sigma(_as_t(t1))) ** 2
    prior = _gauss_logp(x_end.reshape(B, -1), 0.0, var)
    if return_info:
        return prior + delta, {"nfe": nfe, "prior": prior, "delta": delta, "x_T": x_end}
    return prior + delta
