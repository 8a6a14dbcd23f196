"""Consistency distillation of Gaussian data learns the composed teacher map, and that converges to the exact
consistency function, the affine probability-flow map (issue #13, item 3; Song et al. 2023, Sec. 4 and Thm. 1).

Data x0 ~ N(m, diag(v)) and the exact teacher D(x, t) = E[x0 | x_t] (``GaussianMixture.denoiser``). In the scaled
coordinates x~ = x / alpha, s = sigma / alpha (``core.consistency``) and u = x~ - m, per coordinate,

    D = m + v u / (v + s^2),   the ODE  dx~/ds = (x~ - D) / s = k(s) u,   k(s) = s / (v + s^2),

so every teacher step from level s_t down to s_s (h = s_s - s_t < 0) multiplies u by a number (``ode_step``):

    ddim (Euler in s, Song et al. 2021 Eq. 12):  g = 1 + h k(s_t)
    heun (Karras et al. 2022, Alg. 1):           g = 1 + h / 2 (k(s_t) + k(s_s) (1 + h k(s_t)))
    exact flow:                                  g = sqrt(v + s_s^2) / sqrt(v + s_t^2).

The CD fixed point at N levels t_0 = t_min < ... < t_{N-1} (``consistency_levels``): the loss of the pair (n - 1, n)
compares f(x_n, t_n) with the target f(Phi(x_n), t_{n-1}), Phi the teacher's step, a deterministic function of
x_n. With the squared L2 distance its minimiser over functions of x_n is that target itself (the conditional mean of
a deterministic function), f_n = f_{n-1} o Phi, down to the boundary f_0(x) = x / alpha_0 (Song et al. 2023, Eq. 7).
So the minimiser is the composed teacher map

    f_n(x) = m + G_n (x / alpha_n - m),   G_n = g_1 ... g_n,

affine in x, and with exact steps G_n = sqrt(v + s_0^2) / sqrt(v + s_n^2): the exact consistency function
(``GaussianMixture.consistency_function``). The model below can represent every affine f at every level, so the
minimiser is inside the model class and distillation must find it exactly, not statistically: the target is a
deterministic function of x_n and the fit is exact for any draw of the batch.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import gen
from torchdiffusion import EDM, VP
from torchdiffusion.core.consistency import ConsistencyModel, noise_level
from torchdiffusion.core.denoiser import network_inputs
from torchdiffusion.core.mixture import GaussianMixture
from torchdiffusion.objectives.consistency import CM, consistency_levels, consistency_loss, draw_pairs
from torchdiffusion.objectives.teacher import ode_step

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
EPS = torch.finfo(F64).eps
MEAN, VAR = torch.tensor([0.7, -0.4], dtype=F64), torch.tensor([0.3, 1.2], dtype=F64)
GAUSS = GaussianMixture([1.0], [MEAN.tolist()], [VAR.tolist()])  # 2-D, diagonal: two independent 1-D problems
SIGMA_DATA = 0.5  # the parameterization's sigma_data; any positive value leaves the minimiser unchanged
PROCESSES = [EDM(), VP()]
IDS = ["EDM", "VP"]
BATCH = 16  # per level; any batch with two distinct values per coordinate determines the affine fit


class LevelAffine(nn.Module):
    """The raw network F(c_in x, c_noise) = a_n * (c_in x) + b_n, per coordinate, with (a_n, b_n) of the
    discretization level n whose c_noise (``network_inputs``) the input's equals. Wrapped in ``ConsistencyModel``,
    f(x, t_n) = (c_skip_x + c_out c_in a_n) x + c_out b_n: every affine map at every level above t_min (c_out > 0)."""

    def __init__(self, process, levels, dim: int, sigma_data: float):
        super().__init__()
        alpha, sigma = process.alpha_sigma(levels)
        self.register_buffer("c_levels", network_inputs(alpha, sigma, sigma_data)[1])
        self.a = nn.Parameter(torch.zeros(len(levels), dim, dtype=F64))
        self.b = nn.Parameter(torch.zeros(len(levels), dim, dtype=F64))

    def forward(self, u, c_noise):
        gap, n = (c_noise[:, None] - self.c_levels[None, :]).abs().min(1)
        # the same times give the same c_noise to rounding; anything else is not a level of this model
        if bool((gap > 1e-12 * (1 + c_noise.abs())).any()):
            raise ValueError(f"c_noise {c_noise[gap.argmax()]} is not one of the levels {self.c_levels.tolist()}")
        return self.a[n] * u + self.b[n]


def _step_gain(s_t, s_s, v, solver):
    """The factor g of u = x~ - m over one teacher step s_t -> s_s (the module docstring)."""
    h = s_s - s_t
    k_t, k_s = s_t / (v + s_t**2), s_s / (v + s_s**2)
    euler = 1 + h * k_t
    return euler if solver == "ddim" else 1 + h / 2 * (k_t + k_s * euler)


def _composed_gain(process, levels, solver):
    """G_n (N, D): the product of the teacher's step gains from level n down to level 0."""
    s = noise_level(process, levels)[:, None]
    gains = _step_gain(s[1:], s[:-1], VAR, solver)
    return torch.cat([torch.ones(1, len(VAR), dtype=F64), torch.cumprod(gains, 0)])


def _probe(process, levels):
    """Per level, the two points x = mu_n +- sd_n of p_{t_n} = N(alpha_n m, alpha_n^2 v + sigma_n^2) (2N, D) and
    their times. For an affine error e(x) per coordinate, (e(x+)^2 + e(x-)^2) / 2 = e(mu)^2 + (e' sd)^2 is exactly
    its mean square over p_t: two evaluations give the RMS error over the whole marginal."""
    alpha, sigma = (c[:, None] for c in process.alpha_sigma(levels))
    mu, sd = alpha * MEAN, torch.sqrt(alpha**2 * VAR + sigma**2)
    return torch.cat([mu + sd, mu - sd]), levels.repeat(2)


def _rms_over_marginals(f, g, process, levels):
    """(N, D): the RMS over x ~ p_{t_n} of f(x, t_n) - g(x, t_n), two affine maps of x, by ``_probe``."""
    x, t = _probe(process, levels)
    with torch.no_grad():
        e = (f(x, t) - g(x, t)).reshape(2, len(levels), -1)
    return torch.sqrt((e**2).mean(0))


def _composed_map(process, levels, solver):
    """The CD fixed point f_n(x) = m + G_n (x / alpha_n - m) as a function (x, t) with t one of ``levels``."""
    G = _composed_gain(process, levels, solver)

    def f(x, t):
        n = torch.searchsorted(levels, t)
        return MEAN + G[n] * (x / process.alpha(t)[:, None] - MEAN)

    return f


def _newton_fit_level(model, process, levels, n, solver, teacher, generator):
    """Set level n's (a_n, b_n) to the minimiser of the mean CD loss (``consistency_loss``, CM recipe: squared L2)
    of the pair (n - 1, n) on a fresh batch, the target being the model itself at level n - 1, already fitted.
    f is affine in (a_n, b_n), so the loss is quadratic in them and one Newton step from anywhere is its minimiser.
    Returns the condition number of the Hessian."""
    net, dim = model.net, len(MEAN)
    x0 = GAUSS.sample(BATCH, generator=generator)
    z = torch.randn(x0.shape, generator=generator, dtype=F64)
    t, s = levels[n].expand(BATCH), levels[n - 1].expand(BATCH)
    a0, b0 = net.a.detach().clone(), net.b.detach().clone()

    def loss(theta):
        a = torch.cat([a0[:n], theta[None, :dim], a0[n + 1 :]])
        b = torch.cat([b0[:n], theta[None, dim:], b0[n + 1 :]])

        def student(x, tt, **cond):
            return functional_call(model, {"net.a": a, "net.b": b}, (x, tt), cond)

        per = consistency_loss(
            student, model, process, x0, t=t, s=s, noise=z, recipe=CM, teacher=teacher, solver=solver
        )
        return per.mean()

    theta = torch.cat([a0[n], b0[n]])
    grad = torch.autograd.functional.jacobian(loss, theta)
    hess = torch.autograd.functional.hessian(loss, theta)
    theta = theta - torch.linalg.solve(hess, grad)
    with torch.no_grad():
        net.a[n], net.b[n] = theta[:dim], theta[dim:]
    return float(torch.linalg.cond(hess))


_FITS = {}


def _distill(process, solver, N):
    """A ``ConsistencyModel`` of ``LevelAffine`` fitted by consistency distillation with the exact teacher, level
    by level from the boundary up; (model, levels, the largest Hessian condition number). Cached per case."""
    key = (repr(process), solver, N)
    if key not in _FITS:
        levels = consistency_levels(process, N)
        model = ConsistencyModel(LevelAffine(process, levels, len(MEAN), SIGMA_DATA), process, SIGMA_DATA)
        teacher, g = GAUSS.denoiser(process), gen(100 + N)
        conds = [_newton_fit_level(model, process, levels, n, solver, teacher, g) for n in range(1, N)]
        _FITS[key] = model, levels, max(conds)
    return _FITS[key]


# -- the teacher's steps are the affine maps of the docstring ------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_teacher_steps_compose_to_the_closed_form(process, solver):
    """Composing ``ode_step`` with the exact denoiser over the levels, from each level n down to t_min, gives
    x~ = m + G_n (x / alpha_n - m) with G_n the product of the docstring's gains: checked on the two probe points
    of each level (an affine map is fixed by two points). Rounding: each of the <= N - 1 steps adds a few ulp
    (16 covers the ~10 roundings of a Heun step) of |x~| <= |m| + sqrt(v + s^2) and the gains are below 1, so the
    errors add up to at most 16 N eps (|m| + sqrt(v + s_n^2))."""
    N = 16
    levels = consistency_levels(process, N)
    x, t = _probe(process, levels)
    D = GAUSS.denoiser(process)
    n_of = torch.searchsorted(levels, t)
    y = x.clone()
    for k in range(N - 1, 0, -1):  # walk every example still above level k - 1 down one level
        live = n_of >= k
        y[live] = ode_step(
            D, process, y[live], levels[k].expand(int(live.sum())), levels[k - 1].expand(int(live.sum())), solver
        )
    a0 = float(process.alpha(levels[0]))
    ref = _composed_map(process, levels, solver)(x, t)
    s = noise_level(process, t)[:, None]
    tol = 16 * N * EPS * (MEAN.abs() + torch.sqrt(VAR + s**2))
    assert bool(((y / a0 - ref).abs() <= tol).all()), float(((y / a0 - ref).abs() / tol).max())


# -- the CD fixed point is learned exactly -------------------------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_distillation_learns_the_composed_teacher_map(process, solver):
    """The model fitted by minimising ``consistency_loss`` (exact teacher, N = 16 levels) equals the CD fixed point
    f_n = m + G_n (x / alpha_n - m) at every level, to rounding: the RMS difference over each p_{t_n} (``_probe``)
    is below 64 N cond eps (|m| + sqrt(v + s_0^2)). Why: at each level the target (a teacher step and a model
    evaluation, some 30 roundings: 64) is exact to a few ulp of the output's size |m| + sqrt(v + s_0^2), the
    Newton solve of the 2D x 2D normal equations adds its condition number cond (``_newton_fit_level``, measured),
    and the next level inherits the error through a teacher step of gain <= 1: N levels add up. At t_min the model
    is x / alpha exactly (the boundary condition), so the difference there is rounding of one product."""
    N = 16
    model, levels, cond = _distill(process, solver, N)
    err = _rms_over_marginals(model, _composed_map(process, levels, solver), process, levels)
    s0 = noise_level(process, levels[0])
    scale = MEAN.abs() + torch.sqrt(VAR + s0**2)
    tol = 64 * N * cond * EPS * scale
    assert bool((err <= tol).all()), (err / tol).max()
    # and the fixed point at finite N is the teacher's, not the exact flow: it differs at the order of the solver
    exact = GAUSS.consistency_function(process, t_min=model.t_min)
    assert float(_rms_over_marginals(model, exact, process, levels).max()) > 1e3 * float(tol.max())


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("solver, order", [("ddim", 1), ("heun", 2)])
def test_learned_map_converges_to_the_flow_map_at_the_solvers_order(process, solver, order):
    """As the levels double (N = 8, 16, 32, 64), the distilled model's largest RMS error over the levels' marginals
    against the exact consistency function (``consistency_function``, the affine flow map) falls by ~2^order per
    doubling: the CD fixed point is the teacher's N - 1 steps composed, whose global error is C / N^order (1 +
    O(1 / N)) for Karras' rho-spacing (every gap in s^(1/rho) halves). The band [2/3, 3/2] x 2^order allows the
    O(1 / N) term at N = 8. A minimiser stuck away from the flow (ratio -> 1) or a solver of the wrong order fails."""
    errs = []
    for N in (8, 16, 32, 64):
        model, levels, _ = _distill(process, solver, N)
        exact = GAUSS.consistency_function(process, t_min=model.t_min)
        errs.append(float(_rms_over_marginals(model, exact, process, levels).max()))
    ratios = [errs[k] / errs[k + 1] for k in range(len(errs) - 1)]
    lo, hi = 2**order * 2 / 3, 2**order * 3 / 2
    assert all(lo <= r <= hi for r in ratios), (errs, ratios)


# -- and stochastic training finds the same point ------------------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_adam_on_random_pairs_reaches_the_cd_fixed_point(process, solver):
    """Consistency distillation as Song et al. 2023 run it (Algorithm 2: every level at once, pairs drawn uniformly
    (``CM.pair_probs``, ``draw_pairs``), an EMA target network with mu = 0.9, Adam; its learning rate decays linearly
    to 0 over 600 steps), N = 8 levels, from a zero-initialised ``LevelAffine``. At the fixed point the loss is 0 for
    every example (the target is a deterministic function of x_n and the model fits it exactly), so the stochastic
    gradient vanishes there and training converges to it, with no noise floor: the model ends within 1e-3 of the
    distance between the CD fixed point and the exact flow map from the former, and hence about that distance from
    the latter. A loss whose minimiser were anything else (a wrong teacher step, target time or level) would not."""
    N, B, steps = 8, 64, 600
    levels = consistency_levels(process, N)
    model = ConsistencyModel(LevelAffine(process, levels, len(MEAN), SIGMA_DATA), process, SIGMA_DATA)
    target = ConsistencyModel(LevelAffine(process, levels, len(MEAN), SIGMA_DATA), process, SIGMA_DATA)
    target.load_state_dict(model.state_dict())
    target.requires_grad_(False)
    teacher, probs, g = GAUSS.denoiser(process), CM.pair_probs(process, levels), gen(7)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    for _ in range(steps):
        x0 = GAUSS.sample(B, generator=g)
        z = torch.randn(x0.shape, generator=g, dtype=F64)
        i = draw_pairs(probs, torch.rand(B, generator=g, dtype=F64))
        loss = consistency_loss(
            model, target, process, x0, t=levels[i + 1], s=levels[i], noise=z, recipe=CM, teacher=teacher, solver=solver
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            for e, p in zip(target.parameters(), model.parameters()):
                e.lerp_(p, 1 - 0.9)
    fixed = _composed_map(process, levels, solver)
    exact = GAUSS.consistency_function(process, t_min=model.t_min)
    gap = float(_rms_over_marginals(fixed, exact, process, levels).max())
    to_fixed = float(_rms_over_marginals(model, fixed, process, levels).max())
    to_exact = float(_rms_over_marginals(model, exact, process, levels).max())  # for the message
    assert to_fixed <= 1e-3 * gap, (to_fixed, to_exact, gap)
