"""Consistency models (Song et al. 2023; Song & Dhariwal 2023) against closed forms.

The exact consistency function of Gaussian data is the affine probability-flow map, and in 1-D that of any mixture
is the quantile map F_{t_min}^{-1}(F_t(x)) (``GaussianMixture.flow_map``, ``consistency_function``): the tests
check that these are the flow (a solver converges to them at its order), that they are self-consistent and push
p_t onto the data, that multistep sampling with them reproduces the data, and that the parameterization, the
recipes and the losses do what the papers say.
"""

import copy
import dataclasses
import math

import pytest
import torch

from conftest import CONTINUOUS, CONTINUOUS_IDS, Z, gen
from mixture_checks import teacher_errors
from torchdiffusion import EDM, VP, Flow
from torchdiffusion.core.consistency import ConsistencyModel, consistency_scalings, noise_level
from torchdiffusion.core.mixture import GaussianMixture
from torchdiffusion.core.process import as_time
from torchdiffusion.core.timesteps import grid_karras
from torchdiffusion.nets.mlp import MLP
from torchdiffusion.objectives.consistency import (
    CM,
    ICT,
    consistency_levels,
    consistency_loss,
    draw_pairs,
    pseudo_huber,
)
from torchdiffusion.samplers.consistency import consistency_times, sample_consistency

pytestmark = pytest.mark.usefixtures("single_thread")

EPS = torch.finfo(torch.float64).eps
GAUSS = GaussianMixture([1.0], [[0.3, -0.5]], [[0.5, 1.5]])  # 2-D Gaussian: the flow map is affine
MIX = GaussianMixture([0.2, 0.5, 0.3], [[-2.0], [0.0], [3.0]], [0.1, 0.5, 0.05])  # 1-D: the quantile map
SMOOTH = GaussianMixture([0.3, 0.7], [[-1.0], [1.0]], [0.25, 0.25])  # 1-D, overlapping: solvers converge early
# Kolmogorov-Smirnov: by the DKW inequality (Massart 1990), P(sup |F_n - F| > c / sqrt(n)) <= 2 exp(-2 c^2) for
# every n; c is set so that this bound is the two-sided miss probability of conftest's Z.
KS_C = math.sqrt(-math.log(math.erfc(Z / math.sqrt(2)) / 2) / 2)


def _marginal(gm, process, t, n, seed):
    """n draws of the exact p_t (t a scalar or (n,))."""
    g = gen(seed)
    x0 = gm.sample(n, generator=g)
    return process.perturb(x0, as_time(t), torch.randn(x0.shape, generator=g, dtype=torch.float64))


def _at_boundary(gm, process, t_min):
    """The law of f's output: x_{t_min} / alpha(t_min) = x0 + s_min eps, the data with variances + s_min^2."""
    s_min = float(noise_level(process, t_min))
    return GaussianMixture(gm.weights, gm.means, gm.variances + s_min**2)


# -- float64 accuracy of the quantile map --------------------------------------------------------------------------
def _density_and_tail(gm, process, y, t):
    """p_t(y) and min(F_t(y), 1 - F_t(y)) of a 1-D mixture, by ndtr (independently of flow_map's solver)."""
    a, sg = process.at(t, y)
    sd = torch.sqrt(a**2 * gm.variances[:, 0] + sg**2)
    F = (gm.weights * torch.special.ndtr((y - a * gm.means[:, 0]) / sd)).sum(1)
    return gm.log_prob(y, process, t).exp(), torch.minimum(F, 1 - F), sd.amin(1)


def _quantile_tol(gm, process, x, t, y, s):
    """A bound on |y - F_s^{-1}(F_t(x))| (B,) for y computed by ``flow_map``: its Newton iteration stops at steps
    of 1e-13 (|y| + sd) (the remaining error is at most one more such step); F_t(x) is known in log space to a
    few ulp times (1 + |log F|), which moves y by that over d log F_s / dy = p_s / F_s; and the rounding of
    z = (x - alpha m) / sd, a few ulp of |x| + |alpha m|, moves y by that times dy / dx = p_t(x) / p_s(y)."""
    p_s, tail, sd = _density_and_tail(gm, process, y, s)
    p_t, _, _ = _density_and_tail(gm, process, x, t)
    a_t = process.at(t, x)[0][:, 0]
    newton = 2e-13 * (y[:, 0].abs() + sd)
    logs = 64 * EPS * (1 - torch.log(tail)) * tail / p_s
    inputs = 64 * EPS * (x[:, 0].abs() + a_t * gm.means.abs().max()) * p_t / p_s
    return newton + logs + inputs


# -- the parameterization (Song et al. 2023, Eq. 7 and Appendix C) --------------------------------------------------
def _random_net(dim, dtype, seed=0):
    torch.manual_seed(seed)
    net = MLP(dim=dim, width=16, depth=1)
    torch.nn.init.normal_(net.out[-1].weight)  # the MLP's last layer starts at 0; make F non-zero
    torch.nn.init.normal_(net.out[-1].bias)
    return net.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_boundary_condition_holds_exactly(continuous_process, dtype):
    """f(x, t_min) = x / alpha(t_min) for any network: c_skip = 1 / alpha and c_out = 0 are set exactly at t_min,
    so the output is the product x * (1 / alpha), within 1.5 ulp of x / alpha (the roundings of alpha to x's
    dtype, of 1 / alpha and of the product), for t given as a float or as a (B,) tensor."""
    p = continuous_process
    model = ConsistencyModel(_random_net(2, dtype), p, sigma_data=0.8)
    x = (3 * torch.randn(64, 2, generator=gen(1), dtype=torch.float64)).to(dtype)
    ref = x.double() / float(p.alpha(as_time(model.t_min)))
    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        for t in (model.t_min, torch.full((64,), model.t_min, dtype=dtype)):
            out = model(x, t).double()
            assert bool(((out - ref).abs() <= 1.5 * eps * ref.abs()).all()), float((out - ref).abs().max())
        # and the network does matter above t_min
        assert not torch.allclose(model(x, torch.full((64,), p.t_max * 0.5, dtype=dtype)), x)


def test_scalings_are_the_papers(continuous_process):
    """c_skip x_t = c_skip(s) x~ and c_out = c_out(s) with Song et al. 2023 (Appendix C) in noise levels
    s = sigma / alpha: c_skip(s) = sd^2 / ((s - s_min)^2 + sd^2), c_out(s) = sd (s - s_min) / sqrt(sd^2 + s^2).
    Rounding: s - s_min to a few ulp of s + s_min, and both derivatives in s are below max(1, 1 / sd). Where
    alpha = 0 (Flow at t = 1, s = inf) the limits are c_skip x_t = 0 and c_out = sd. Without the exact override,
    the formulas themselves give c_skip(s_min) = 1 and c_out(s_min) = 0 to rounding (|c_out| <= 2 eps s_min)."""
    p, sd = continuous_process, 0.7
    s_min = float(noise_level(p, p.t_min))
    t = torch.linspace(p.t_min, p.t_max, 101, dtype=torch.float64)
    alpha, sigma = p.alpha_sigma(t)
    c_skip_x, c_out = consistency_scalings(alpha, sigma, sd, s_min)
    assert bool(torch.isfinite(c_skip_x).all()) and bool(torch.isfinite(c_out).all())
    inside = alpha > 0
    s = sigma[inside] / alpha[inside]
    tol = 8 * EPS * (1 + (s + s_min) * (1 + 1 / sd))
    paper_skip = sd**2 / ((s - s_min) ** 2 + sd**2)
    paper_out = sd * (s - s_min) / torch.sqrt(sd**2 + s**2)
    assert bool(((c_skip_x[inside] * alpha[inside] - paper_skip).abs() <= tol).all())
    assert bool(((c_out[inside] - paper_out).abs() <= tol).all())
    if not bool(inside.all()):
        assert float(c_skip_x[~inside].abs().max()) == 0.0
        assert torch.allclose(c_out[~inside], torch.full_like(c_out[~inside], sd), rtol=4 * EPS, atol=0)
    a0, g0 = p.alpha_sigma(as_time(p.t_min))
    k0, o0 = consistency_scalings(a0, g0, sd, s_min)
    assert abs(float(k0 * a0) - 1) <= 4 * EPS and abs(float(o0)) <= 4 * EPS * s_min


def test_model_is_finite_over_the_whole_interval(continuous_process):
    p = continuous_process
    model = ConsistencyModel(_random_net(2, torch.float64), p)
    x = torch.randn(101, 2, generator=gen(2), dtype=torch.float64) * p.prior_std
    with torch.no_grad():
        out = model(x, torch.linspace(p.t_min, p.t_max, 101, dtype=torch.float64))
    assert bool(torch.isfinite(out).all())


def test_boundary_needs_alpha_positive():
    with pytest.raises(ValueError, match="alpha"):
        ConsistencyModel(_random_net(2, torch.float64), Flow(), t_min=1.0)
    with pytest.raises(ValueError, match="alpha"):
        MIX.consistency_function(Flow(), t_min=1.0)


# -- the exact consistency function ----------------------------------------------------------------------------------
def test_gaussian_flow_map_solves_the_ode(continuous_process):
    """The affine map x_t -> x_s of Gaussian data solves the probability-flow ODE in s: its derivative (autograd in
    s) equals the velocity c_x(s) x_s + c_0(s) D(x_s, s) with the exact denoiser (Song et al. 2021, Eq. 13;
    ``ode_velocity_coeffs``), and it is the identity at s = t. Rounding: a few ulp of each term of the velocity."""
    p = continuous_process
    n = 64
    t = 0.5 * p.t_max
    x = _marginal(GAUSS, p, t, n, seed=3)
    levels = grid_karras(p, 8)[1:-1]
    s = levels[torch.randint(0, len(levels), (n,), generator=gen(4))].requires_grad_(True)
    y = GAUSS.flow_map(x, p, t, s)
    dy = torch.stack([torch.autograd.grad(y[:, d].sum(), s, retain_graph=True)[0] for d in range(2)], 1)
    y, s = y.detach(), s.detach()
    c_x, c_0 = (c[:, None] for c in p.ode_velocity_coeffs(s))
    D = GAUSS.x0_mean(y, p, s)
    vel = c_x * y + c_0 * D
    tol = 64 * EPS * ((c_x * y).abs() + (c_0 * D).abs())
    assert bool(((dy - vel).abs() <= tol).all()), float(((dy - vel).abs() / tol).max())
    same = GAUSS.flow_map(x, p, t, t)
    assert bool(((same - x).abs() <= 8 * EPS * (x.abs() + float(GAUSS.means.abs().max()))).all())


def test_gaussian_consistency_function_is_the_affine_map(continuous_process):
    """f(x, t) = (alpha_min m + sqrt(alpha_min^2 v + sigma_min^2) / sqrt(alpha_t^2 v + sigma_t^2) (x - alpha_t m))
    / alpha_min per coordinate (written out here), for a time per example."""
    p = continuous_process
    f = GAUSS.consistency_function(p)
    n = 64
    t = grid_karras(p, 8)[torch.randint(0, 8, (n,), generator=gen(5))]
    x = _marginal(GAUSS, p, t, n, seed=6)
    m, v = GAUSS.means[0], GAUSS.variances[0]
    a_t, g_t = (c[:, None] for c in p.alpha_sigma(t))
    a_0, g_0 = (float(c) for c in p.alpha_sigma(as_time(p.t_min)))
    ref = (a_0 * m + torch.sqrt(a_0**2 * v + g_0**2) / torch.sqrt(a_t**2 * v + g_t**2) * (x - a_t * m)) / a_0
    assert f.t_min == p.t_min
    assert torch.allclose(f(x, t), ref, rtol=16 * EPS, atol=16 * EPS * float(m.abs().max() + 1))


def test_identical_components_give_the_gaussian_map(continuous_process):
    """Two identical components are one Gaussian: the quantile map (K = 2) agrees with the affine map (K = 1) to
    the quantile map's accuracy (``_quantile_tol``)."""
    p = continuous_process
    twin = GaussianMixture([0.4, 0.6], [[0.5], [0.5]], [0.2, 0.2])
    one = GaussianMixture([1.0], [[0.5]], [0.2])
    t = 0.7 * p.t_max
    x = _marginal(one, p, t, 256, seed=7)
    y = twin.flow_map(x, p, t, p.t_min)
    ref = one.flow_map(x, p, t, p.t_min)
    assert bool(((y - ref)[:, 0].abs() <= _quantile_tol(twin, p, x, t, y, p.t_min)).all())


@pytest.mark.parametrize("solver, band", [("ddim", (1.6, 2.5)), ("heun", (3.0, 5.5))])
def test_quantile_map_is_the_flow(continuous_process, solver, band):
    """The 1-D quantile map is the probability-flow map of the mixture: N steps of a solver driven by the exact
    denoiser converge to it at the solver's order (the error ratio on halving the step is ~2^order). If the
    quantile map were not the flow, the error would stall at their difference (ratio -> 1)."""
    p = continuous_process
    D = SMOOTH.denoiser(p)
    t0 = 0.8 * p.t_max
    t1 = max(p.t_min, 1e-3)  # VE's t_min = 0 is a valid end too (sigma = 0.01); 1e-3 keeps the grids alike
    n = 64
    x = _marginal(SMOOTH, p, t0, n, seed=8)
    exact = SMOOTH.flow_map(x, p, t0, t1)
    errs = teacher_errors(D, p, x, t0, t1, exact, solver, (32, 64, 128))
    ratios = [errs[k] / errs[k + 1] for k in range(2)]
    assert all(band[0] <= r <= band[1] for r in ratios), (errs, ratios)


def test_self_consistency(continuous_process):
    """f(flow_map(x, t -> u), u) = f(x, t) (Song et al. 2023, Sec. 3: f is constant on each trajectory), for a
    time per example, within the propagated accuracy of the three quantile maps; and f(x, t_min) = x / alpha."""
    p = continuous_process
    f = MIX.consistency_function(p)
    n = 256
    levels = grid_karras(p, 12)
    g = gen(9)
    i = torch.randint(0, 11, (n,), generator=g)
    j = torch.minimum(i + 1 + torch.randint(0, 6, (n,), generator=g), torch.tensor(11))
    t, u = levels[i], levels[j]
    x = _marginal(MIX, p, t, n, seed=10)
    x_u = MIX.flow_map(x, p, t, u)
    a_min = float(p.alpha(as_time(p.t_min)))
    y1, y2 = f(x_u, u) * a_min, f(x, t) * a_min  # x_{t_min} both ways
    gain = _density_and_tail(MIX, p, x_u, u)[0] / _density_and_tail(MIX, p, y1, p.t_min)[0]  # d y1 / d x_u
    tol = (
        _quantile_tol(MIX, p, x, t, x_u, u) * gain
        + _quantile_tol(MIX, p, x_u, u, y1, p.t_min)
        + _quantile_tol(MIX, p, x, t, y2, p.t_min)
    )
    assert bool(((y1 - y2)[:, 0].abs() <= tol).all()), float(((y1 - y2)[:, 0].abs() / tol).max())
    x_min = _marginal(MIX, p, p.t_min, n, seed=11)
    at_min = f(x_min, p.t_min) * a_min
    assert bool(((at_min - x_min)[:, 0].abs() <= _quantile_tol(MIX, p, x_min, p.t_min, at_min, p.t_min)).all())


# -- the law of f's output -----------------------------------------------------------------------------------------
def _check_1d(y, law):
    """y (n, 1) against a 1-D mixture ``law``: the Kolmogorov-Smirnov distance (DKW bound KS_C / sqrt(n)), the mean
    and variance within Z standard errors (the variance's from the sample's own (y - mu)^2), and the mass of each
    component's interval (split at the midpoints of the means) within Z binomial standard errors."""
    n = y.shape[0]
    v = y[:, 0].sort().values
    a = law.means[:, 0]
    sd = law.variances[:, 0].sqrt()
    F = (law.weights * torch.special.ndtr((v[:, None] - a) / sd)).sum(1)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    ks = float(torch.maximum(k / n - F, F - (k - 1) / n).max())
    assert ks < KS_C / math.sqrt(n), f"KS distance {ks} vs {KS_C / math.sqrt(n)}"
    mu, var = float(law.mean()[0]), float(law.covariance()[0, 0])
    assert abs(float(v.mean()) - mu) < Z * math.sqrt(var / n), "mean"
    sq = (v - mu) ** 2
    assert abs(float(sq.mean()) - var) < Z * float(sq.std()) / math.sqrt(n), "variance"
    order = a.argsort()
    cuts = [-math.inf] + ((a[order][1:] + a[order][:-1]) / 2).tolist() + [math.inf]
    cdf = lambda c: float((law.weights * torch.special.ndtr((c - a) / sd)).sum()) if math.isfinite(c) else float(c > 0)  # noqa: E731
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        prob = cdf(hi) - cdf(lo)
        frac = float(((v > lo) & (v <= hi)).double().mean())
        assert abs(frac - prob) < Z * math.sqrt(prob * (1 - prob) / n), f"mass of ({lo}, {hi}]: {frac} vs {prob}"


def _check_gaussian_2d(y, law):
    """y (n, 2) against the one-component 2-D ``law``: per-coordinate means, variances and the covariance (0)
    within Z standard errors, each from the sample's own spread."""
    n = y.shape[0]
    mu, var = law.means[0], law.variances[0]
    yc = y - mu
    for d in range(2):
        assert abs(float(yc[:, d].mean())) < Z * math.sqrt(float(var[d]) / n), f"mean {d}"
        sq = yc[:, d] ** 2
        assert abs(float(sq.mean()) - float(var[d])) < Z * float(sq.std()) / math.sqrt(n), f"variance {d}"
    prod = yc[:, 0] * yc[:, 1]
    assert abs(float(prod.mean())) < Z * float(prod.std()) / math.sqrt(n), "covariance"


def test_consistency_function_pushes_p_t_onto_the_data(continuous_process):
    """The quantile map carries p_t to p_{t_min}: samples of p_t through f are samples of the data at t_min
    (x0 + s_min eps), at the time of noise level 1 and at t_max."""
    p = continuous_process
    f = MIX.consistency_function(p)
    law = _at_boundary(MIX, p, p.t_min)
    for k, t in enumerate((float(p.t_from_lam(as_time(0.0))), p.t_max)):
        x = _marginal(MIX, p, t, 4000, seed=12 + k)
        _check_1d(f(x, t), law)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_sampling_reproduces_the_data(continuous_process, steps):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) with the exact consistency function, started
    from the exact p_{ts[0]}, returns exact samples of the data at t_min for any number of steps: each re-noising
    alpha_t (x0 + sqrt(s_t^2 - s_min^2) z) of a draw of x0 + s_min eps is a draw of p_t. 1-D mixture and a 2-D
    Gaussian, n = 4000."""
    p = continuous_process
    ts = consistency_times(p, steps)
    assert len(ts) == steps and float(ts[0]) == p.t_max and float(ts[-1]) > p.t_min
    for gm, check, seed in ((MIX, _check_1d, 20), (GAUSS, _check_gaussian_2d, 30)):
        f = gm.consistency_function(p)
        x = _marginal(gm, p, float(ts[0]), 4000, seed=seed + steps)
        y = sample_consistency(f, p, x, ts, generator=gen(seed + 10 + steps))
        check(y, _at_boundary(gm, p, p.t_min))


def test_sampler_refuses_times_at_the_boundary():
    p = EDM()
    f = MIX.consistency_function(p)
    with pytest.raises(ValueError, match="t_min"):
        sample_consistency(
            f, p, torch.zeros(4, 1, dtype=torch.float64), torch.tensor([1.0, p.t_min], dtype=torch.float64)
        )


# -- the recipes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [1000, 4096, 400000])
def test_levels_curricula(total):
    """N(k) at the ends and in between. CM (Song et al. 2023, Appendix C): N(k) = ceil(sqrt(k / K ((s1 + 1)^2 -
    s0^2) + s0^2) - 1) + 1, so N(0) = s0 and N(K) = s1 + 1. iCT (Song & Dhariwal 2023, Eq. 8): N(k) = min(s0
    2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)), so N(0) = s0 + 1, N(K) = s1 + 1 and
    every N - 1 is s0 times a power of 2 or s1. Both non-decreasing."""
    assert CM.levels_at(0, total) == CM.s0
    assert CM.levels_at(total, total) == CM.s1 + 1
    assert ICT.levels_at(0, total) == ICT.s0 + 1
    assert ICT.levels_at(total, total) == ICT.s1 + 1
    ks = range(0, total + 1, max(1, total // 2000))
    for r in (CM, ICT):
        ns = [r.levels_at(k, total) for k in ks]
        assert all(b >= a for a, b in zip(ns, ns[1:])), r.name
    allowed = {ICT.s0 * 2**j + 1 for j in range(12) if ICT.s0 * 2**j < ICT.s1} | {ICT.s1 + 1}
    assert {ICT.levels_at(k, total) for k in ks} <= allowed


def test_consistency_levels_are_karras_spaced(continuous_process):
    """n increasing times from t_min to t_max whose noise levels s have s^(1/7) equally spaced (Karras et al.
    2022, Eq. 5; Song et al. 2023, Appendix C)."""
    p = continuous_process
    ts = consistency_levels(p, 19)
    assert ts.shape == (19,) and float(ts[0]) == p.t_min and float(ts[-1]) == p.t_max
    assert bool((ts[1:] > ts[:-1]).all())
    inside = ts[p.alpha(ts) > 0]
    r = noise_level(p, inside) ** (1 / 7)
    gaps = r[1:] - r[:-1]
    # a few ulp of the round trip noise level -> t -> noise level, against gaps of order 0.1
    assert torch.allclose(gaps, gaps.mean().expand_as(gaps), rtol=1e-12, atol=0), gaps
    with pytest.raises(ValueError, match="at least 2"):
        consistency_levels(p, 1)


def test_pair_probabilities():
    """Uniform pairs sum to 1; iCT's (Song & Dhariwal 2023, Sec. 3.5) are the lognormal N(P_mean, P_std^2) mass
    of each interval [ln s_n, ln s_{n+1}], normalised over the levels: their density per unit of ln s peaks at the
    interval holding P_mean (or a neighbour, for a density averaged over intervals)."""
    p = EDM()
    levels = consistency_levels(p, 1281)
    for r in (CM, ICT):
        probs = r.pair_probs(p, levels)
        assert probs.shape == (1280,) and abs(float(probs.sum()) - 1) <= 1280 * EPS
        assert bool((probs >= 0).all())
    assert torch.equal(CM.pair_probs(p, levels), torch.full((1280,), 1 / 1280, dtype=torch.float64))
    ln_s = torch.log(noise_level(p, levels))
    probs = ICT.pair_probs(p, levels)
    phi = torch.tensor(
        [0.5 * math.erfc(-(v - (-1.1)) / (2.0 * math.sqrt(2))) for v in ln_s.tolist()], dtype=torch.float64
    )
    ref = (phi[1:] - phi[:-1]) / (phi[-1] - phi[0])
    # erf differences: each value to a few ulp of 1, over a normaliser near 1
    assert torch.allclose(probs, ref, rtol=0, atol=8 * EPS)
    per_ln_s = probs / (ln_s[1:] - ln_s[:-1])
    peak = int(per_ln_s.argmax())
    home = int(torch.searchsorted(ln_s, torch.tensor(-1.1, dtype=torch.float64))) - 1  # ln s_home <= P_mean
    assert abs(peak - home) <= 1, (peak, home)


@pytest.mark.parametrize("process", CONTINUOUS, ids=CONTINUOUS_IDS)
def test_every_pair_is_trained(process):
    """iCT's lambda(s_n) = 1 / (s_{n+1} - s_n) (Song & Dhariwal 2023, Sec. 3.1) is positive and finite for every
    pair of the discretization, and so is each pair's probability: each level, t_max included, is trained."""
    levels = consistency_levels(process, 11)
    w = ICT.weight(process, levels[1:], levels[:-1])
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all()), w
    assert bool((ICT.pair_probs(process, levels) > 0).all())


def test_draw_pairs_frequencies():
    """Inverse-CDF draws have the asked frequencies, each within Z binomial standard errors."""
    p = VP()
    levels = consistency_levels(p, 11)
    probs = ICT.pair_probs(p, levels)
    n = 20000
    idx = draw_pairs(probs, torch.rand(n, generator=gen(40), dtype=torch.float64))
    assert int(idx.min()) >= 0 and int(idx.max()) < len(probs)
    freq = torch.bincount(idx, minlength=len(probs)).double() / n
    se = torch.sqrt(probs * (1 - probs) / n)
    assert bool(((freq - probs).abs() < Z * se).all()), (freq, probs)


def test_pseudo_huber_limits():
    """sqrt(|d|^2 + c^2) - c = |d|^2 / (2c) (1 - |d|^2 / (4 c^2) + ...) for |d| << c and |d| - c + c^2 / (2|d|) - ...
    for |d| >> c: the relative error of the quadratic limit is below |d|^2 / (4 c^2), the absolute error of the
    linear one below c^2 / (2 |d|) (alternating series); plus rounding (the small-|d| form cancels to eps c).
    The default c is 0.00054 sqrt(dim) (Song & Dhariwal 2023, Sec. 3.3)."""
    c = 0.1
    zero = torch.zeros(5, 3, dtype=torch.float64)
    for scale in (1e-6, 1e-4, 1e-3):
        d = scale * torch.randn(5, 3, generator=gen(41), dtype=torch.float64)
        n2 = (d**2).sum(1)
        quad = n2 / (2 * c)
        got = pseudo_huber(d, zero, c)
        assert bool(((got - quad).abs() <= quad * n2 / (4 * c**2) + 4 * EPS * c).all())
    for scale in (1e2, 1e4):
        d = scale * torch.randn(5, 3, generator=gen(42), dtype=torch.float64)
        norm = (d**2).sum(1).sqrt()
        got = pseudo_huber(d, zero, c)
        assert bool(((got - (norm - c)).abs() <= c**2 / (2 * norm) + 4 * EPS * norm).all())
    a = torch.randn(4, 3, 4, 4, generator=gen(43), dtype=torch.float64)
    b = torch.randn(4, 3, 4, 4, generator=gen(44), dtype=torch.float64)
    c48 = 0.00054 * math.sqrt(48)
    assert torch.equal(pseudo_huber(a, b), pseudo_huber(a, b, c48))


# -- the losses ----------------------------------------------------------------------------------------------------
def test_training_loss_vanishes_at_equal_times(continuous_process):
    """Consistency training (no teacher) compares f at (alpha_t x0 + sigma_t z, t) and (alpha_s x0 + sigma_s z, s)
    with the same z: at s = t the two are one evaluation, and the loss is exactly 0 for both distances."""
    p = continuous_process
    f = MIX.consistency_function(p)
    n = 64
    x0 = MIX.sample(n, generator=gen(45))
    z = torch.randn(x0.shape, generator=gen(46), dtype=torch.float64)
    t = grid_karras(p, 8)[torch.randint(0, 8, (n,), generator=gen(47))]
    for recipe in (CM, dataclasses.replace(ICT, weighting="uniform")):
        loss = consistency_loss(f, f, p, x0, t=t, s=t, noise=z, recipe=recipe)
        assert torch.equal(loss, torch.zeros_like(loss)), recipe.name


@pytest.mark.parametrize("solver, order", [("ddim", 1), ("heun", 2)])
def test_distillation_loss_of_the_exact_function(continuous_process, solver, order):
    """Consistency distillation with the exact teacher and the exact f: f(x_t, t) = f(x_s, s) on the true
    trajectory, so the loss is |f'(x_s) (x^_s - x_s)|^2, the square of the teacher's local error, ~ h^(2 (order +
    1)) in the gap h of noise levels: halving h divides the loss by ~2^(2 (order + 1)) (16 for DDIM, 64 for Heun).
    The band [3/4, 4/3] of that ratio allows the next term of the expansion."""
    p = continuous_process
    f, D = SMOOTH.consistency_function(p), SMOOTH.denoiser(p)
    n = 256
    x0 = SMOOTH.sample(n, generator=gen(48))
    z = torch.randn(x0.shape, generator=gen(49), dtype=torch.float64)
    t = p.t_from_lam(as_time(0.0)).expand(n)  # noise level 1
    losses = []
    for h in (0.1, 0.05, 0.025):
        s = p.t_from_lam(-torch.log(as_time(1.0 - h))).expand(n)
        losses.append(float(consistency_loss(f, f, p, x0, t=t, s=s, noise=z, teacher=D, solver=solver).mean()))
    ratios = [losses[k] / losses[k + 1] for k in range(2)]
    expect = 2 ** (2 * (order + 1))
    assert all(0.75 * expect <= r <= expect / 0.75 for r in ratios), (losses, ratios, expect)


# -- learning it ---------------------------------------------------------------------------------------------------
def _rms_error(model, f_exact, x, t):
    with torch.no_grad():
        return float(((model(x, t) - f_exact(x, t)) ** 2).mean().sqrt())


@pytest.mark.slow
@pytest.mark.parametrize("process", [EDM(), VP()], ids=["EDM", "VP"])
def test_consistency_distillation_learns_the_quantile_map(process):
    """A small MLP, wrapped in ConsistencyModel and trained by consistency distillation (Song et al. 2023,
    Algorithm 2: the CM recipe's squared L2, uniform pairs of N = 18 levels, an EMA target with mu = 0.95, Heun
    teacher steps of the exact denoiser) approaches the exact consistency function, the quantile map: its RMS
    error over draws of p_t at four levels falls below a quarter of that of the constant map to the data mean, and
    keeps falling (lower after 2000 steps than after 500)."""
    p, mix = process, SMOOTH
    torch.manual_seed(0)
    sd = float(mix.covariance()[0, 0].sqrt())
    model = ConsistencyModel(MLP(dim=1, width=64, depth=3), p, sigma_data=sd).double()
    target = copy.deepcopy(model).requires_grad_(False)
    f_exact, D = mix.consistency_function(p, t_min=model.t_min), mix.denoiser(p)
    N = 18
    levels = consistency_levels(p, N)
    probs = CM.pair_probs(p, levels)
    g = gen(50)
    t_eval = levels[[N // 4, N // 2, 3 * N // 4, N - 1]].repeat_interleave(500)
    x_eval = _marginal(mix, p, t_eval, len(t_eval), seed=51)
    baseline = float(((f_exact(x_eval, t_eval) - mix.mean()) ** 2).mean().sqrt())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps, errs = 2000, {}
    for k in range(1, steps + 1):
        x0 = mix.sample(256, generator=g)
        z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        i = draw_pairs(probs, torch.rand(256, generator=g, dtype=torch.float64))
        loss = consistency_loss(
            model, target, p, x0, t=levels[i + 1], s=levels[i], noise=z, recipe=CM, teacher=D, solver="heun"
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for a, b in zip(target.parameters(), model.parameters()):
                a.lerp_(b, 1 - 0.95)
        if k in (steps // 4, steps):
            errs[k] = _rms_error(model, f_exact, x_eval, t_eval)
    print(f"{p!r}: RMS error vs the quantile map {errs}, constant map {baseline:.3f}")
    assert errs[steps] < 0.25 * baseline, (errs, baseline)
    assert errs[steps] < errs[steps // 4], errs
