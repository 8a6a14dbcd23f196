"""Exponential-integrator samplers (samplers/ddim.py, dpm_solver.py, unipc.py) against closed forms.

- Gaussian data N(m, v) per coordinate: the exact denoiser is linear and the probability-flow ODE
  (Song et al. 2021, Eq. 13) maps x_t to x_s = alpha_s m + sqrt(alpha_s^2 v + sigma_s^2) /
  sqrt(alpha_t^2 v + sigma_t^2) (x_t - alpha_t m). Each solver must show its order on a log-log fit
  of the max error over 64 starts, on a grid uniform in lam from -3 to 3.
- Equivalences: DDIM(eta = 0) = DPM-Solver-1 (Lu et al. 2022, Sec. 4.1); DDIM(eta = 1) = DDPM
  ancestral sampling with the same noise (Song et al. 2021b, Eq. 16); exponential integrators give
  the same x / alpha on VP and VE for one lam grid (Lu et al. 2022, Prop. 3.1).
- A Gaussian mixture (testing.py): samples from exact p_T come out with the mixture's weights,
  mean and covariance (Z standard errors, conftest.Z).
- Parity with k-diffusion's DPM-Solver++(2M) and its SDE variant on EDM, when its sampling module loads.
Float64 on the CPU, fixed seeds.
"""

import math

import pytest
import torch

from conftest import Z, gen
from mixture_checks import gaussian_flow_map, observed_order
from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, GaussianMixture, SubVP
from torchdiffusion.core.processes import beta_linear
from torchdiffusion.core.timesteps import grid_discrete, grid_karras, grid_lam, grid_t
from torchdiffusion.samplers import count_nfe, sample_ddpm
from torchdiffusion.samplers.ddim import sample_ddim
from torchdiffusion.samplers.dpm_solver import (
    sample_dpm_solver,
    sample_dpm_solver_pp,
    sample_dpm_solver_pp_2s_ancestral,
    sample_dpm_solver_pp_sde,
)
from torchdiffusion.samplers.unipc import sample_unipc

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _with(fn, **kw):
    return lambda d, p, x, ts, **more: fn(d, p, x, ts, **kw, **more)


# name: (sampler, NFE per step, stochastic)
SAMPLERS = {
    "ddim": (_with(sample_ddim), 1, False),
    "ddim-eta1": (_with(sample_ddim, eta=1.0), 1, True),
    "dpm1": (_with(sample_dpm_solver, order=1), 1, False),
    "dpm2": (_with(sample_dpm_solver, order=2), 2, False),
    "dpm3": (_with(sample_dpm_solver, order=3), 3, False),
    "pp2m": (_with(sample_dpm_solver_pp, order=2), 1, False),
    "pp3m": (_with(sample_dpm_solver_pp, order=3), 1, False),
    "pp2m-sde": (_with(sample_dpm_solver_pp_sde), 1, True),
    "pp2s": (_with(sample_dpm_solver_pp_2s_ancestral, eta=0.0), 2, False),
    "pp2s-a": (_with(sample_dpm_solver_pp_2s_ancestral), 2, True),
    "unipc1": (_with(sample_unipc, order=1), 1, False),
    "unipc2": (_with(sample_unipc, order=2), 1, False),
    "unipc3": (_with(sample_unipc, order=3), 1, False),
    "unipc2-bh1": (_with(sample_unipc, order=2, bh1=True), 1, False),
}
ODE = [name for name, (_, _, stochastic) in SAMPLERS.items() if not stochastic]
MULTISTEP = [name for name in SAMPLERS if name.startswith(("pp", "unipc")) and name != "pp2m-sde"]

M, V = [1.5, -0.7], [0.3, 2.5]
GAUSS = GaussianMixture([1.0], [M], [V])
GM2 = GaussianMixture([0.2, 0.3, 0.5], [[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], [[0.5, 0.1], [0.2, 0.6], [0.3, 0.3]])
GM4 = GaussianMixture(GM2.weights, GM2.means.repeat(1, 2), GM2.variances.repeat(1, 2), shape=(1, 2, 2))


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64)


def _run(name, process, x, ts, gm=GM2, seed=0, denoiser=None, **kw):
    return SAMPLERS[name][0](denoiser or gm.denoiser(process), process, x, ts, generator=gen(seed), **kw)


def _noise_form_start(name, process, ts):
    """DPM-Solver's noise form needs alpha(ts[0]) > 0: drop a first time with alpha = 0 (Flow at t = 1)."""
    return ts[1:] if name.startswith("dpm") and float(process.alpha(ts[0])) == 0.0 else ts


def _exact_start(process, gm, n, seed, t=None):
    """Exact samples of p_t (data pushed through q(x_t | x0)): only the sampler's error is measured."""
    g = gen(seed)
    x0 = gm.sample(n, generator=g)
    t = process.t_max if t is None else t
    return process.perturb(x0, _t(t), torch.randn(x0.shape, generator=g, dtype=F64))


def _flow_map(process, x, t, s):
    """The exact probability-flow ODE map x_t -> x_s on this file's Gaussian data."""
    return gaussian_flow_map(process, x, t, s, M, V)


# --- convergence order on Gaussian data -------------------------------------------------------------

LAM0, LAM1 = -3.0, 3.0  # where x0_hat(lam) bends: the asymptotic order is visible from n = 10
ORDER_PROCESSES = {
    "VP": VP(),
    "VE": VE(),
    "EDM": EDM(),
    "Cosine": Cosine(),
    "SubVP": SubVP(),
    "Flow": Flow(),
    "Discrete": Discrete.from_schedule(beta_linear, 1000),
}
# Global orders: DDIM / DPM-Solver-k: k (Lu et al. 2022, Thm. 3.2); DPM-Solver++(2M) and (2S): 2 (Lu et al.
# 2023, Algorithms 1-2; 2S is the ancestral sampler at eta = 0); 3M: 2 on a uniform grid, from its first-order
# first step (3 with a resolved start, below); UniPC-p: p + 1 (Zhao et al. 2023, Thm. 3.1), but UniPC-3's
# warm-up (UniC-1, local O(h^3)) caps it at 3 on a uniform grid, with 4 approached (below).
EXPECTED_ORDER = {
    "ddim": 1,
    "dpm1": 1,
    "dpm2": 2,
    "dpm3": 3,
    "pp2m": 2,
    "pp3m": 2,
    "pp2s": 2,
    "unipc1": 2,
    "unipc2": 3,
    "unipc3": 3,
    "unipc2-bh1": 3,
}


def _order_errors(name, process, lams_of_n, ns, n_starts=64):
    t0, t1 = process.t_from_lam(_t(LAM0)), process.t_from_lam(_t(LAM1))
    x = _exact_start(process, GAUSS, n_starts, seed=1, t=float(t0))
    ref = _flow_map(process, x, t0, t1) / process.alpha(t1)
    errs = []
    for n in ns:
        ts = process.t_from_lam(lams_of_n(n))
        ts[0], ts[-1] = t0, t1
        out = _run(name, process, x, ts, gm=GAUSS, final_denoise=False)
        errs.append(float((out / process.alpha(t1) - ref).abs().max()))  # compare x / alpha
    return errs


@pytest.mark.parametrize("name", EXPECTED_ORDER)
@pytest.mark.parametrize("process", ORDER_PROCESSES.values(), ids=ORDER_PROCESSES)
def test_convergence_order_on_gaussian_data(name, process):
    """Each solver reaches its global order on the exact flow map (grid uniform in lam, n = 10 .. 80)."""
    ns = [10, 20, 40, 80]
    errs = _order_errors(name, process, lambda n: torch.linspace(LAM0, LAM1, n + 1, dtype=F64), ns)
    order = observed_order(ns, errs)
    assert order > EXPECTED_ORDER[name] - 0.25, f"{name}: slope {order:.2f}, errors {errs}"


def _resolved_start(n):
    """n steps: two of size h^2 at the start, then uniform in lam (h = 6/n)."""
    d = ((LAM1 - LAM0) / n) ** 2
    return torch.cat([LAM0 + d * torch.arange(2, dtype=F64), torch.linspace(LAM0 + 2 * d, LAM1, n - 1, dtype=F64)])


@pytest.mark.parametrize("name, order", [("pp3m", 3), ("unipc3", 4), ("unipc2", 3), ("pp2m", 2)])
def test_multistep_order_with_resolved_start(name, order):
    """With the warm-up steps made O(h^2) long, their local errors (O(h^4) and smaller) no longer limit the
    global error, and the multistep formula itself shows its order: DPM-Solver++(3M) 3 (with D2 ~ h^2 x0'',
    see ``sample_dpm_solver_pp``), UniPC-3 (UniP-3 + UniC) 4 (Zhao et al. 2023, Thm. 3.1), approached
    from below: the local slope between n = 80 and 160 is checked too."""
    ns = [20, 40, 80, 160]
    errs = _order_errors(name, VP(), _resolved_start, ns)
    assert observed_order(ns, errs) > order - 0.25 - (0.4 if order == 4 else 0), f"{name}: errors {errs}"
    assert math.log2(errs[-2] / errs[-1]) > order - 0.5, f"{name}: errors {errs}"


def _poly_denoiser(process, coeffs):
    """x0_hat(x, t) = sum_k c_k lam(t)^k, whatever x: a test function for the lam integral alone."""

    def denoise(x, t, **cond):
        lam = process.lam(t.to(F64))[:, None]
        return sum(c * lam**k for k, c in enumerate(coeffs)).to(x.dtype)

    return denoise


def _exact_poly_step(process, coeffs, x, t, s):
    """x_s = sigma_s/sigma_t x_t + sigma_s int_{lam_t}^{lam_s} e^lam x0(lam) dlam (Lu et al. 2022, Prop. 3.1),
    with int e^lam lam^k = e^lam sum_j (-1)^j k!/(k-j)! lam^(k-j), written as alpha_s e^(lam - lam_s) (...)."""
    lt, ls = float(process.lam(t)), float(process.lam(s))
    a_s, s_s, s_t = float(process.alpha(s)), float(process.sigma(s)), float(process.sigma(t))

    def G(lam, k):
        return sum((-1) ** j * math.factorial(k) / math.factorial(k - j) * lam ** (k - j) for j in range(k + 1))

    integral = sum(c * a_s * (G(ls, k) - math.exp(lt - ls) * G(lt, k)) for k, c in enumerate(coeffs))
    return s_s / s_t * x + integral


@pytest.mark.parametrize(
    "name, degree, first",
    [("pp3m", 2, 2), ("unipc2", 2, 1), ("unipc3", 3, 2), ("unipc2-bh1", 2, 1)],
)
def test_multistep_steps_are_exact_for_polynomial_x0_hat(name, degree, first):
    """The data-form multistep steps integrate x0_hat(lam) exactly when it is a polynomial of their degree:
    DPM-Solver++(3M) degree 2 (Taylor terms h phi2 x0' and h^2 phi3 x0''; the reference code's half-weight
    D2 fails this), UniC-p degree p (Zhao et al. 2023, the order conditions of Thm. 3.1; with x0_hat not
    depending on x the corrector's evaluation is exact). From step ``first`` on (after the warm-up), on
    the non-uniform Karras grid of EDM (r != 1), each step maps the callback's x_i to x_{i+1} exactly.
    (2M's "midpoint" form, Algorithm 2, weights D1 by (1 - e^{-h})/2 instead of h phi2: second order,
    but not exact for linear x0_hat; its order is checked above.)"""
    p = EDM()
    ts = grid_karras(p, 10)
    coeffs = [_t([0.3, -1.2]), _t([0.5, 0.2]), _t([-0.05, 0.08]), _t([0.01, -0.004])][: degree + 1]
    x = torch.randn(4, 2, generator=gen(30), dtype=F64) * 20
    seen = []
    d = _poly_denoiser(p, coeffs)
    _run(
        name, p, x, ts, denoiser=d, final_denoise=False, lower_order_final=False, callback=lambda c: seen.append(c["x"])
    )
    xs = [x, *seen]
    last = len(ts) - 1 if name.startswith("pp") else len(ts) - 2  # UniPC: no corrector after the last step
    for i in range(first, last):
        expected = _exact_poly_step(p, coeffs, xs[i], ts[i], ts[i + 1])
        torch.testing.assert_close(xs[i + 1], expected, rtol=1e-10, atol=1e-10, msg=f"{name}, step {i}")


# --- equivalences -----------------------------------------------------------------------------------

EQUIV = {
    "VP-t": (VP(), lambda p: grid_t(p, 25)),
    "VE-lam": (VE(), lambda p: grid_lam(p, 25)),
    "EDM-karras": (EDM(), lambda p: grid_karras(p, 25)),
    "Cosine-lam": (Cosine(), lambda p: grid_lam(p, 25)),
    "Flow-t": (Flow(), lambda p: grid_t(p, 25)),
    "Discrete50": (Discrete.from_schedule(beta_linear, 50), lambda p: grid_discrete(p, 25)),
}


@pytest.mark.parametrize("case", EQUIV)
def test_ddim_eta0_equals_dpm_solver_1(case):
    """DDIM with eta = 0 (Song et al. 2021b, Eq. 12) is DPM-Solver-1 (Lu et al. 2022, Eq. 3.7 and Sec. 4.1)
    and the first-order DPM-Solver++ step (Lu et al. 2023, Sec. 4.1)."""
    process, grid = EQUIV[case]
    ts = _noise_form_start("dpm1", process, grid(process))
    x = _exact_start(process, GM2, 32, seed=2, t=float(ts[0]))
    a = _run("ddim", process, x, ts)
    scale = float(a.abs().max())
    for other in (_run("dpm1", process, x, ts), sample_dpm_solver_pp(GM2.denoiser(process), process, x, ts, order=1)):
        torch.testing.assert_close(other, a, rtol=1e-10, atol=1e-10 * scale)


@pytest.mark.parametrize("case", EQUIV)
def test_ddim_eta1_equals_ddpm_with_the_same_noise(case):
    """DDIM with eta = 1 has sigma_t(eta)^2 = the posterior variance (Song et al. 2021b, Eq. 16), so its step
    is DDPM's (Ho et al. 2020, Eq. 7): the same samples for the same generator draws. So is the first step
    of SDE-DPM-Solver++(2M) with eta = 1 (Lu et al. 2023, App.: x_s = sigma_s/sigma_t e^{-h} x_t
    + alpha_s (1 - e^{-2h}) x0_hat + sigma_s sqrt(1 - e^{-2h}) z)."""
    process, grid = EQUIV[case]
    ts = grid(process)
    x = _exact_start(process, GM2, 32, seed=3)
    d = GM2.denoiser(process)
    a = sample_ddpm(d, process, x, ts, generator=gen(4))
    b = sample_ddim(d, process, x, ts, eta=1.0, generator=gen(4))
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9 * float(a.abs().max()))
    a1 = sample_ddpm(d, process, x, ts[:2], final_denoise=False, generator=gen(5))
    b1 = sample_dpm_solver_pp_sde(d, process, x, ts[:2], final_denoise=False, generator=gen(5))
    torch.testing.assert_close(b1, a1, rtol=1e-9, atol=1e-9 * float(a1.abs().max()))


def test_sde_variant_with_eta0_is_dpm_solver_pp_2m():
    """SDE-DPM-Solver++(2M) with eta = 0 has no noise and the 2M weights (Lu et al. 2023, Algorithm 2)."""
    p = VP()
    ts = grid_lam(p, 8)
    x = _exact_start(p, GM2, 32, seed=6)
    a = sample_dpm_solver_pp(GM2.denoiser(p), p, x, ts, order=2, lower_order_final=False)
    b = sample_dpm_solver_pp_sde(GM2.denoiser(p), p, x, ts, eta=0.0, generator=gen(0))
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ODE + ["ddim-eta1", "pp2m-sde"])
@pytest.mark.parametrize("final_denoise", [True, False])
def test_same_x_over_alpha_on_vp_and_ve_for_one_lam_grid(name, final_denoise):
    """Exponential integrators depend on the process only through lam (Lu et al. 2022, Prop. 3.1): on the
    VP grid t_i = VP.t_from_lam(lam_i) and the VE grid VE.t_from_lam(lam_i), started from x_VE = x_VP /
    alpha_VP(T) (sigma_VE = sigma_VP / alpha_VP there), x / alpha agrees at every step, and so does
    x0_hat. The exact mixture denoiser is a function of x / alpha and lam only; checked first."""
    vp, ve = VP(), VE()
    lams = torch.linspace(-3.5, 4.0, 13, dtype=F64)  # inside both processes' ranges
    t_vp, t_ve = vp.t_from_lam(lams), ve.t_from_lam(lams)
    x_vp = _exact_start(vp, GM2, 32, seed=7, t=float(t_vp[0]))
    a0 = float(vp.alpha(t_vp[0]))
    x_ve = x_vp / a0
    for i in (0, 6, 12):
        d_vp = GM2.denoiser(vp)(x_vp, t_vp[i].expand(32))
        d_ve = GM2.denoiser(ve)(x_vp / float(vp.alpha(t_vp[i])), t_ve[i].expand(32))
        torch.testing.assert_close(d_ve, d_vp, rtol=1e-10, atol=1e-10)
    out_vp = _run(name, vp, x_vp, t_vp, seed=8, final_denoise=final_denoise)
    out_ve = _run(name, ve, x_ve, t_ve, seed=8, final_denoise=final_denoise)
    if not final_denoise:
        out_vp = out_vp / vp.alpha(t_vp[-1])
    torch.testing.assert_close(out_ve, out_vp, rtol=1e-9, atol=1e-9)


# --- ground truth: a Gaussian mixture ----------------------------------------------------------------

MIXTURE_CASES = {  # sampler: (process, grid), generous step counts for each solver's order
    "ddim": (VP(), lambda p: grid_lam(p, 200)),
    "ddim-eta1": (VP(), lambda p: grid_lam(p, 400)),
    "dpm2": (EDM(), lambda p: grid_karras(p, 30)),
    "dpm3": (VP(), lambda p: grid_lam(p, 20)),
    "pp2m": (EDM(), lambda p: grid_karras(p, 60)),
    "pp3m": (VP(), lambda p: grid_lam(p, 40)),
    "pp2m-sde": (VP(), lambda p: grid_lam(p, 300)),
    "unipc2": (EDM(), lambda p: grid_karras(p, 30)),
    "unipc3": (VP(), lambda p: grid_lam(p, 30)),
}


@pytest.mark.parametrize("name", MIXTURE_CASES)
def test_reproduces_the_mixture(name):
    """From exact samples of p_T, each sampler with the exact denoiser E[x0 | x_t] reproduces the mixture's
    weights (component by argmax of the exact responsibilities), mean and covariance within Z standard
    errors. The ODE solvers transport p_T to p_0 exactly in the limit (probability flow, Song et al.
    2021, Eq. 13); the stochastic ones (DDIM eta = 1, SDE-DPM-Solver++) sample the reverse SDE."""
    process, grid = MIXTURE_CASES[name]
    n = 4000
    x = _run(name, process, _exact_start(process, GM2, n, seed=9), grid(process), seed=10)
    k = GM2.responsibilities(x).argmax(1)
    for j, w in enumerate(GM2.weights.tolist()):
        frac = float((k == j).double().mean())
        assert abs(frac - w) < Z * math.sqrt(w * (1 - w) / n), f"weight of component {j}: {frac} vs {w}"
    mu, cov = GM2.mean(), GM2.covariance()
    for d in range(2):
        assert abs(float(x[:, d].mean() - mu[d])) < Z * math.sqrt(float(cov[d, d]) / n), f"mean, coord {d}"
    xc = x - mu
    for a, b in ((0, 0), (1, 1), (0, 1)):
        prod = xc[:, a] * xc[:, b]  # E[prod] = cov[a, b]; its standard error from the sample's own spread
        assert abs(float(prod.mean()) - float(cov[a, b])) < Z * float(prod.std()) / math.sqrt(n), f"cov [{a}, {b}]"


# --- conformance: NFE, callbacks, determinism, shapes, the ends -----------------------------------------

CASES = {
    "VP-lam": (VP(), lambda p: grid_lam(p, 6)),
    "EDM-karras": (EDM(), lambda p: grid_karras(p, 12)),
    "Discrete50": (Discrete.from_schedule(beta_linear, 50), lambda p: grid_discrete(p, 8)),
}


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("final_denoise", [True, False])
def test_nfe_and_callbacks_as_documented(name, case, final_denoise):
    """NFE = (NFE per step) x steps, plus 1 for the final denoising step (samplers/_loop.py); the callback
    gets {i, t, x, x0_hat, nfe} once per step with the evaluations used so far."""
    process, grid = CASES[case]
    ts = grid(process)
    d = count_nfe(GM2.denoiser(process))
    seen = []
    x = _exact_start(process, GM2, 4, seed=11)
    _run(name, process, x, ts, denoiser=d, final_denoise=final_denoise, callback=lambda i: seen.append((i, d.nfe)))
    per_step = SAMPLERS[name][1] * (len(ts) - 1)
    assert d.nfe == per_step + (1 if final_denoise else 0)
    assert [info["i"] for info, _ in seen] == list(range(len(ts) - 1))
    for i, (info, counted) in enumerate(seen):
        assert set(info) == {"i", "t", "x", "x0_hat", "nfe"} and info["nfe"] == counted
        assert info["t"] == pytest.approx(float(ts[i])) and info["x"].shape == x.shape
    assert seen[-1][0]["nfe"] == per_step


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("case", ["EDM-karras", "Discrete50"])
def test_step_landing_on_data_returns_x0_hat(name, case):
    """A grid ending at sigma = 0 (EDM or Discrete t = 0) lands on the data: the last step returns x0_hat
    at its start (samplers/_loop.py), which is the final denoising step on the grid without the 0, with
    the same NFE (1 on that step, also for single-step solvers) and noise."""
    process, grid = CASES[case]
    ts = grid(process)
    ts0 = torch.cat([ts, torch.zeros(1, dtype=F64)])
    x = _exact_start(process, GM2, 16, seed=12)
    kw = {"lower_order_final": False} if name in MULTISTEP else {}  # else n < 10 lowers different steps
    d0, d1 = count_nfe(GM2.denoiser(process)), count_nfe(GM2.denoiser(process))
    a = _run(name, process, x, ts0, denoiser=d0, seed=13, **kw)
    b = _run(name, process, x, ts, denoiser=d1, seed=13, final_denoise=True, **kw)
    assert bool(torch.isfinite(a).all())
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert d0.nfe == d1.nfe


@pytest.mark.parametrize("name", SAMPLERS)
def test_deterministic_unmutated_4d_and_dtype(name):
    """Noise only from the generator (same seed, same samples; ODE solvers ignore it); x and ts are not
    modified; (B, C, H, W) inputs and float32 work (coefficients in float64, cast back; DESIGN.md)."""
    process, grid = CASES["VP-lam"]
    ts = grid(process)
    x = _exact_start(process, GM4, 8, seed=14)
    x_copy, ts_copy = x.clone(), ts.clone()
    a = _run(name, process, x, ts, gm=GM4, seed=15)
    b = _run(name, process, x, ts, gm=GM4, seed=15)
    c = _run(name, process, x, ts, gm=GM4, seed=16)
    assert torch.equal(x, x_copy) and torch.equal(ts, ts_copy)
    assert a.shape == x.shape and torch.equal(a, b)
    assert torch.equal(a, c) != SAMPLERS[name][2]  # stochastic samplers differ with another seed
    out32 = _run(name, process, x.float(), ts, gm=GM4, seed=15)
    assert out32.dtype == torch.float32 and bool(torch.isfinite(out32).all())
    if not SAMPLERS[name][2]:  # float32 normals differ from float64 ones
        torch.testing.assert_close(out32.double(), a, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("grid", [grid_lam, grid_karras, grid_t], ids=["lam", "karras", "t"])
def test_finite_at_both_ends_for_every_process(name, grid, continuous_process):
    """Default grids run t_max -> t_min: on Flow they start at alpha = 0 (lam = -inf), where the data forms
    stay finite (e^{-h} = 0 from the curves, no inf * 0); DPM-Solver's noise form divides by alpha and
    refuses with a clear error instead."""
    p = continuous_process
    ts = grid(p, 7)
    x = _exact_start(p, GM2, 16, seed=17)
    if name.startswith("dpm") and float(p.alpha(ts[0])) == 0.0:
        with pytest.raises(ValueError, match="sample_dpm_solver_pp"):
            _run(name, p, x, ts)
        ts = ts[1:]
    for final_denoise in (True, False):
        out = _run(name, p, x, ts, final_denoise=final_denoise)
        assert bool(torch.isfinite(out).all()), f"{name} on {p} with final_denoise={final_denoise}"


@pytest.mark.parametrize("name", SAMPLERS)
def test_finite_on_discrete_processes_and_grids_ending_at_data(name, process):
    """Every process of conftest (Discrete schedules with T = 50 and 1000 included), with a grid of
    the process's own kind, and the same grid extended to t = 0 (sigma = 0) where that is a time."""
    ts = _noise_form_start(name, process, grid_discrete(process, 10) if process.n_steps else grid_lam(process, 10))
    x = _exact_start(process, GM2, 8, seed=18)
    assert bool(torch.isfinite(_run(name, process, x, ts)).all())
    if float(process.sigma(_t(0.0))) == 0.0:
        ts0 = torch.cat([ts, torch.zeros(1, dtype=F64)])
        assert bool(torch.isfinite(_run(name, process, x, ts0)).all())


def test_rejects_bad_options():
    p = VP()
    x, ts, d = _exact_start(p, GM2, 2, seed=19), grid_lam(p, 4), GM2.denoiser(p)
    for bad in (
        lambda: sample_ddim(d, p, x, ts, eta=1.5),
        lambda: sample_dpm_solver(d, p, x, ts, order=4),
        lambda: sample_dpm_solver_pp(d, p, x, ts, order=0),
        lambda: sample_dpm_solver_pp_sde(d, p, x, ts, eta=-1.0),
        lambda: sample_unipc(d, p, x, ts, order=4),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError, match="bh1"):  # B(h) is chosen by a flag, not a name
        sample_unipc(d, p, x, ts, bh1="bh3")


# --- parity with k-diffusion --------------------------------------------------------------------------


def _k_sampling():
    """k-diffusion's sampling module without its package __init__ (torchdiffusion.interop.k_diffusion)."""
    from torchdiffusion.interop.k_diffusion import load_k_diffusion_sampling

    sampling = load_k_diffusion_sampling()
    if sampling is None:
        pytest.skip("k-diffusion (and its sampling module's dependencies) is not installed")
    return sampling


@pytest.mark.parametrize("n", [6, 12])
def test_dpm_solver_pp_2m_matches_k_diffusion(n):
    """Our DPM-Solver++(2M) (Lu et al. 2023, Algorithm 2) equals k-diffusion's ``sample_dpmpp_2m`` on EDM
    (t = sigma, model(x, sigma) = denoiser). k-diffusion appends sigma = 0, whose step returns the
    denoised value: our final denoising step. It has no lower-order final step, hence
    lower_order_final=False."""
    ks = _k_sampling()
    p = EDM()
    ts = grid_karras(p, n)
    x = _exact_start(p, GM2, 32, seed=20)
    d = GM2.denoiser(p)
    sigmas = torch.cat([ts, torch.zeros(1, dtype=F64)])
    ref = ks.sample_dpmpp_2m(d, x, sigmas, disable=True)
    out = sample_dpm_solver_pp(d, p, x, ts, order=2, lower_order_final=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def _stochastic_parity(k_sampler, ours, n_steps, seed, eta, land):
    """k-diffusion's stochastic ``k_sampler`` against ``ours`` on EDM (t = sigma) with GM2's exact denoiser, both
    drawing the same standard normals (one per step, from one generator of ``seed``). k-diffusion ends at sigma = 0:
    ours takes that time too where ``land`` (its landing step), else it ends with its final denoising step."""
    p = EDM()
    ts = grid_karras(p, n_steps)
    x = _exact_start(p, GM2, 32, seed=seed - 1)
    d = GM2.denoiser(p)
    g = gen(seed)
    noise = lambda sigma, sigma_next: torch.randn(x.shape, generator=g, dtype=F64)  # noqa: E731
    sigmas = torch.cat([ts, torch.zeros(1, dtype=F64)])
    ref = k_sampler(d, x, sigmas, eta=eta, noise_sampler=noise, disable=True)
    out = ours(d, p, x, sigmas if land else ts, eta=eta, generator=gen(seed))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_dpm_solver_pp_sde_matches_k_diffusion():
    """SDE-DPM-Solver++(2M) (Lu et al. 2023, App.; "midpoint") equals k-diffusion's ``sample_dpmpp_2m_sde``
    with eta = 1 when both draw the same standard normals."""
    _stochastic_parity(_k_sampling().sample_dpmpp_2m_sde, sample_dpm_solver_pp_sde, 15, 22, 1.0, land=False)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_dpm_solver_pp_2s_ancestral_matches_k_diffusion(eta):
    """DPM-Solver++(2S) with ancestral noise equals k-diffusion's ``sample_dpmpp_2s_ancestral`` when both draw the
    same standard normals."""
    ks = _k_sampling()
    _stochastic_parity(ks.sample_dpmpp_2s_ancestral, sample_dpm_solver_pp_2s_ancestral, 12, 32, eta, land=True)


def test_dpm_solver_pp_2s_ancestral_from_alpha_zero_is_finite_and_first_order():
    """From Flow's t = 1 (alpha = 0, lam = -inf) the first step has h' infinite: one call, the DDIM step to lam_d
    (at eta = 1 the DDPM posterior draw x_s = alpha_s x0_hat + sigma_s z), and no infinity anywhere."""
    p = Flow()
    ts = torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=F64)
    x = _exact_start(p, GM2, 16, seed=5)
    d = count_nfe(GM2.denoiser(p))
    for eta in (1.0, 0.0):
        d.nfe = 0
        out = sample_dpm_solver_pp_2s_ancestral(d, p, x, ts, eta=eta, generator=gen(6))
        assert torch.isfinite(out).all() and d.nfe == 1 + 2 + 1  # first order, 2S, landing
    s = ts[1]
    first = sample_dpm_solver_pp_2s_ancestral(GM2.denoiser(p), p, x, ts[:2], eta=1.0, generator=gen(7),
                                              final_denoise=False)  # fmt: skip
    z = torch.randn(x.shape, generator=gen(7), dtype=F64)
    x0_hat = GM2.denoiser(p)(x, torch.full((len(x),), 1.0, dtype=F64))
    torch.testing.assert_close(first, p.alpha(s) * x0_hat + p.sigma(s) * z, rtol=1e-12, atol=1e-12)
