"""Progressive distillation (Salimans & Ho 2022) and its teacher steps, against closed forms on Gaussian data.

On Gaussian data N(m, diag(v)) the exact denoiser is affine in x_t, so every DDIM step, every pair of them and the
progressive-distillation target are affine maps with coefficients known in closed form; the probability-flow map
itself is ``GaussianMixture.flow_map``.
"""

import pytest
import torch

from conftest import CONTINUOUS, CONTINUOUS_IDS, gen
from mixture_checks import teacher_errors
from torchdiffusion.core.mixture import GaussianMixture
from torchdiffusion.core.process import as_time
from torchdiffusion.core.timesteps import grid_karras
from torchdiffusion.objectives.distillation import halving_grid, progressive_loss, progressive_target
from torchdiffusion.objectives.teacher import ode_step
from torchdiffusion.samplers.ddim import sample_ddim

pytestmark = pytest.mark.usefixtures("single_thread")

EPS = torch.finfo(torch.float64).eps
MEAN, VAR = [0.3, -0.5], [0.5, 1.5]
GAUSS = GaussianMixture([1.0], [MEAN], [VAR])


def _x_t(process, t, n, seed=0):
    """n draws of the exact marginal p_t of GAUSS (t a scalar or (n,))."""
    g = gen(seed)
    x0 = GAUSS.sample(n, generator=g)
    return process.perturb(x0, as_time(t), torch.randn(x0.shape, generator=g, dtype=torch.float64))


def _ddim_coeffs(process, t, u):
    """(A, B) with the teacher's DDIM step t -> u on GAUSS equal to x_u = A x_t + B (per coordinate): the step is
    x_u = r x_t + c D(x_t) with r = sigma_u / sigma_t, c = alpha_u - r alpha_t, and the exact denoiser is
    D(x) = k x + (1 - k alpha_t) m, k = v alpha_t / (alpha_t^2 v + sigma_t^2) (Gaussian posterior mean)."""
    m, v = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(VAR, dtype=torch.float64)
    a_t, s_t = (float(c) for c in process.alpha_sigma(as_time(t)))
    a_u, s_u = (float(c) for c in process.alpha_sigma(as_time(u)))
    r = s_u / s_t
    c = a_u - r * a_t
    k = v * a_t / (a_t**2 * v + s_t**2)
    return r + c * k, c * (1 - k * a_t) * m


# -- the nested grid ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", CONTINUOUS, ids=CONTINUOUS_IDS)
def test_halving_grid_nests(process):
    """grid(2N)[::2] == grid(N): each round's teacher walks the student's grid with one midpoint per step. The
    noise levels are nested exactly (uniform in s^(1/rho)); the times pass through t_from_lam, so they agree to
    its rounding, a few ulp of t."""
    ends_at_data = float(process.sigma(as_time(0.0))) == 0.0
    for k in range(7):  # N = 1 .. 64
        n = 2**k
        coarse, fine = halving_grid(process, n), halving_grid(process, 2 * n)
        assert coarse.shape == (n + 1,) and fine.shape == (2 * n + 1,)
        assert torch.allclose(fine[::2], coarse, rtol=4 * EPS, atol=0.0), (n, fine[::2] - coarse)
        for ts in (coarse, fine):
            assert float(ts[0]) == process.t_max
            assert bool((ts[1:] < ts[:-1]).all()), ts
            assert float(ts[-1]) == (0.0 if ends_at_data else process.t_min)


@pytest.mark.parametrize("steps", [0, 3, 6, 12])
def test_halving_grid_needs_a_power_of_two(continuous_process, steps):
    with pytest.raises(ValueError, match="power of 2"):
        halving_grid(continuous_process, steps)


# -- the teacher's steps -----------------------------------------------------------------------------------------
def test_ode_step_ddim_is_the_ddim_sampler(continuous_process):
    """ode_step "ddim" with scalar times is one step of ``sample_ddim`` (eta = 0, no final denoising): the same
    update x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) x0_hat, gathered differently. Both round their
    coefficients to a few ulp, and alpha_s - alpha_t r cancels to alpha_s (1 - e^{-h}), so the two agree within
    a few eps of (r |x_t| + alpha_s |x0_hat|) / (1 - e^{-h})."""
    p, D = continuous_process, GAUSS.denoiser(continuous_process)
    ts = grid_karras(p, 8).tolist()
    pairs = list(zip(ts[:-1], ts[1:]))
    if float(p.sigma(as_time(0.0))) == 0.0:
        pairs.append((ts[-2], 0.0))  # a step onto the data, where sample_ddim returns x0_hat
    for i, (t, s) in enumerate(pairs):
        x = _x_t(p, t, 64, seed=i)
        ours = ode_step(D, p, x, torch.full((64,), t, dtype=torch.float64), torch.full((64,), s, dtype=torch.float64))
        ref = sample_ddim(D, p, x, torch.tensor([t, s], dtype=torch.float64), final_denoise=False)
        a_t, s_t = (float(c) for c in p.alpha_sigma(as_time(t)))
        a_s, s_s = (float(c) for c in p.alpha_sigma(as_time(s)))
        r = s_s / s_t
        one_m_em = 1.0 - r * a_t / a_s  # 1 - e^{-h}
        tol = 16 * EPS * (r * x.abs() + a_s * D(x, t).abs()) / one_m_em
        assert bool(((ours - ref).abs() <= tol).all()), (i, float((ours - ref).abs().max()))


def _heun_by_hand(D, process, x, t, s):
    """Karras et al. 2022, Algorithm 1 (one step, deterministic) in x~ = x / alpha, noise level s = sigma / alpha,
    where the ODE is dx~/ds = (x~ - D) / s; per example, Euler alone where the step lands on s = 0."""
    a_t, g_t = (v[:, None] for v in process.alpha_sigma(t))
    a_s, g_s = (v[:, None] for v in process.alpha_sigma(s))
    st, ss = g_t / a_t, g_s / a_s
    xt = x / a_t
    d1 = (xt - D(x, t)) / st
    xe = xt + (ss - st) * d1
    lands = ss == 0
    d2 = (xe - D(a_s * xe, torch.where(lands[:, 0], t, s))) / torch.where(lands, 1.0, ss)
    heun = xt + (ss - st) / 2 * (d1 + d2)
    return a_s * torch.where(lands, xe, heun), (a_s, st, ss, xt, xe, d1, d2)


def test_ode_step_heun_by_hand(continuous_process):
    """ode_step "heun" with a time per example is Heun's step in (x / alpha, sigma / alpha) (Karras et al. 2022,
    Algorithm 1), Euler where it lands on sigma = 0. Rounding: a few eps of each term, the second slope's
    multiplied by (s_t - s_s) / s_s."""
    p, D = continuous_process, GAUSS.denoiser(continuous_process)
    n = 256
    g = gen(3)
    hi = p.t_max if float(p.alpha(as_time(p.t_max))) > 0 else 0.99 * p.t_max  # Heun needs alpha_t > 0
    ts = grid_karras(p, 16, t_start=hi)
    if float(p.sigma(as_time(0.0))) == 0.0:
        ts = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])  # steps onto the data: Euler alone
    i = torch.randint(0, len(ts) - 1, (n,), generator=g)
    j = torch.minimum(i + 1 + torch.randint(0, 3, (n,), generator=g), torch.tensor(len(ts) - 1))
    t, s = ts[i], ts[j]
    x = _x_t(p, t, n, seed=4)
    ours = ode_step(D, p, x, t, s, "heun")
    ref, (a_s, st, ss, xt, xe, d1, d2) = _heun_by_hand(D, p, x, t, s)
    ratio = torch.where(ss > 0, st / ss.clamp(min=1e-300), 0.0)
    d2_in = (xe - ss * d2).abs()  # |D(x_e, s)|
    tol = 64 * EPS * a_s * (xt.abs() + st * d1.abs() + xe.abs() + ratio * (xe.abs() + d2_in))
    assert bool(((ours - ref).abs() <= tol).all()), float(((ours - ref).abs() / tol).max())


@pytest.mark.parametrize("solver, order, band", [("ddim", 1, (1.6, 2.5)), ("heun", 2, (3.0, 5.5))])
def test_teacher_converges_to_the_flow(continuous_process, solver, order, band):
    """N teacher steps from t0 to t1 on Gaussian data converge to the exact probability-flow map
    (``GaussianMixture.flow_map``) with global error ~ N^-order: halving the step divides the error by
    ~2^order (DDIM is first order, Heun second). The bands allow the next term of the error expansion."""
    p, D = continuous_process, GAUSS.denoiser(continuous_process)
    t0, t1 = 0.8 * p.t_max, 0.05 * p.t_max
    n = 64
    x = _x_t(p, t0, n, seed=5)
    exact = GAUSS.flow_map(x, p, t0, t1)
    errs = teacher_errors(D, p, x, t0, t1, exact, solver, (16, 32, 64))
    ratios = [errs[k] / errs[k + 1] for k in range(len(errs) - 1)]
    assert all(band[0] <= r <= band[1] for r in ratios), (solver, errs, ratios, 2**order)


def test_ode_step_errors(continuous_process):
    p, D = continuous_process, GAUSS.denoiser(continuous_process)
    t, s = (torch.full((4,), u * p.t_max, dtype=torch.float64) for u in (0.5, 0.25))
    x = _x_t(p, t, 4)
    with pytest.raises(ValueError, match=r"choose one of \['ddim', 'heun'\]"):
        ode_step(D, p, x, t, s, "rk4")
    if float(p.alpha(as_time(p.t_max))) == 0.0:  # Flow at t = 1: Heun's step in s is infinite; DDIM's is not
        t = torch.full((4,), p.t_max, dtype=torch.float64)
        x = _x_t(p, t, 4)
        assert torch.equal(ode_step(D, p, x, t, s, "heun"), ode_step(D, p, x, t, s, "ddim"))


# -- the progressive-distillation target ---------------------------------------------------------------------------
def _triples(process, n, seed):
    """Per-example student steps (t, t_mid, s) of halving_grid(process, 2): either the first (from t_max) or the
    last (onto t = 0 where sigma(0) = 0, else t_min)."""
    ts = halving_grid(process, 4)
    first = torch.rand(n, generator=gen(seed)) < 0.5
    pick = lambda a, b: torch.where(first, ts[a], ts[b])  # noqa: E731
    return pick(0, 2), pick(1, 3), pick(2, 4), ts


def test_progressive_target_is_the_teachers_two_steps(continuous_process):
    """One DDIM step t -> s from x_t with x0_hat := progressive_target lands on the teacher's two DDIM steps
    t -> t_mid -> s (Salimans & Ho 2022, Algorithm 2), for every example's own triple, including the last step
    onto the data. The reference is ``sample_ddim`` over [t, t_mid, s] per triple. Rounding: a few eps of the
    largest term on either path (see below)."""
    p, D = continuous_process, GAUSS.denoiser(continuous_process)
    n = 128
    t, t_mid, s, _ = _triples(p, n, seed=6)
    x = _x_t(p, t, n, seed=7)
    goal = progressive_target(D, p, x, t, t_mid, s)
    one = ode_step(lambda y, tt: goal, p, x, t, s)
    for tt in torch.unique(t):
        k = t == tt
        grid = torch.stack([tt, t_mid[k][0], s[k][0]])
        two = sample_ddim(D, p, x[k], grid, final_denoise=False)
        r = float(p.sigma(grid[2]) / p.sigma(grid[0]))
        # Both sides pass through x_mid and x0_hat by different sums (ode_step vs ddim_step's gathered form), so a
        # coordinate's rounding is a few eps of the largest term that enters, not of its own end values (which can
        # sit near 0): the batch's largest r |x_t| and |x_s|, and the data's O(1) scale (baseline kernels: 8.9e-16).
        tol = 64 * EPS * (r * float(x[k].abs().max()) + float(two.abs().max()) + 1.0)
        assert bool(((one[k] - two).abs() <= tol).all()), (float(tt), float((one[k] - two).abs().max()))


def _affine_student(theta):
    """x0_hat(x_t) = a x_t + b per coordinate, theta = (a, b) flattened (2 D,): the student at one time."""
    a, b = theta[:2], theta[2:]
    return lambda x, t: a * x + b


@pytest.mark.parametrize("form", ["x", "v"])
@pytest.mark.parametrize("which", ["first", "last"])
def test_linear_student_recovers_the_two_step_map(continuous_process, form, which):
    """An affine student x0_hat = a x_t + b at one student step (t, t_mid, s), trained with progressive_loss on
    Gaussian data with the exact teacher, recovers the closed form: the teacher's two DDIM steps are the affine
    map x_s = A x_t + B (``_ddim_coeffs`` composed), and the target x~ = (x_s - r x_t) / c is then
    P x_t + Q with P = (A - r) / c, Q = B / c (r = sigma_s / sigma_t, c = alpha_s - r alpha_t).

    The loss is quadratic in theta = (a, b) in both forms (v is affine in x0_hat), so one Newton step from 0 is
    its exact minimizer: training to convergence without an optimizer's tolerance. The target is a deterministic
    function of x_t, so the minimizer is P, Q exactly whatever the samples: the check is at float64 rounding,
    eps times the Hessian's condition number times the number of summed terms."""
    p, D = continuous_process, GAUSS.denoiser(continuous_process)
    ts = halving_grid(p, 4)
    i = 0 if which == "first" else 2
    t, t_mid, s = (float(ts[i + k]) for k in range(3))
    n = 256
    g = gen(8)
    x0 = GAUSS.sample(n, generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    times = [torch.full((n,), u, dtype=torch.float64) for u in (t, t_mid, s)]

    def mean_loss(theta):
        student = _affine_student(theta)
        return progressive_loss(
            student, D, p, x0, t=times[0], t_mid=times[1], s=times[2], noise=noise, form=form
        ).mean()

    theta0 = torch.zeros(4, dtype=torch.float64)
    grad = torch.autograd.functional.jacobian(mean_loss, theta0)
    hess = torch.autograd.functional.hessian(mean_loss, theta0)
    theta = theta0 - torch.linalg.solve(hess, grad)

    A1, B1 = _ddim_coeffs(p, t, t_mid)
    A2, B2 = _ddim_coeffs(p, t_mid, s)
    A, B = A2 * A1, A2 * B1 + B2
    a_t, s_t = (float(v) for v in p.alpha_sigma(as_time(t)))
    a_s, s_s = (float(v) for v in p.alpha_sigma(as_time(s)))
    r = s_s / s_t
    c = a_s - r * a_t
    exact = torch.cat([(A - r) / c, B / c])
    tol = 8 * n * EPS * float(torch.linalg.cond(hess)) * float(exact.abs().max().clamp(min=1.0))
    assert float((theta - exact).abs().max()) <= tol, (theta, exact, tol)


def test_loss_is_zero_exactly_at_the_target_and_weights(continuous_process):
    """Both forms vanish iff x0_hat equals the target: a student returning the target gives 0 exactly, and one
    off by delta gives the closed forms max(SNR(t), 1) delta^2 ("x", Salimans & Ho 2022's truncated SNR weight)
    and ((alpha^2 + sigma^2) / sigma)^2 delta^2 ("v": v = alpha eps - sigma x0 and eps = (x_t - alpha x0) / sigma,
    so dv / dx0 = -(alpha^2 + sigma^2) / sigma)."""
    p, D = continuous_process, GAUSS.denoiser(continuous_process)
    n = 64
    t, t_mid, s, _ = _triples(p, n, seed=9)
    g = gen(10)
    x0 = GAUSS.sample(n, generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = p.perturb(x0, t, noise)
    goal = progressive_target(D, p, x_t, t, t_mid, s)
    delta = 0.25
    a, sg = p.alpha_sigma(t)
    closed = {"x": p.snr(t).clamp(min=1.0) * delta**2, "v": ((a**2 + sg**2) / sg) ** 2 * delta**2}
    for form in ("x", "v"):
        exact = lambda x, tt: progressive_target(D, p, x, t, t_mid, s)  # noqa: E731
        zero = progressive_loss(exact, D, p, x0, t=t, t_mid=t_mid, s=s, noise=noise, form=form)
        assert torch.equal(zero, torch.zeros_like(zero)), (form, zero.abs().max())
        off = lambda x, tt: goal + delta  # noqa: E731
        loss = progressive_loss(off, D, p, x0, t=t, t_mid=t_mid, s=s, noise=noise, form=form)
        # rounding: the error goal + delta - goal is delta to eps |goal|, and v's coefficients to a few eps
        rel = 16 * EPS * (1 + float(goal.abs().max()) / delta) * (1 + float((a / sg).abs().max()))
        assert torch.allclose(loss, closed[form], rtol=rel, atol=0.0), (form, (loss / closed[form] - 1).abs().max())


def test_progressive_loss_rejects_an_unknown_form(continuous_process):
    p, D = continuous_process, GAUSS.denoiser(continuous_process)
    t, t_mid, s, _ = _triples(p, 4, seed=11)
    x0 = GAUSS.sample(4, generator=gen(12))
    with pytest.raises(ValueError, match=r"choose one of \['x', 'v'\]"):
        progressive_loss(D, D, p, x0, t=t, t_mid=t_mid, s=s, noise=torch.zeros_like(x0), form="eps")
