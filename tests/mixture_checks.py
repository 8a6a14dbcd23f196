"""What the sampler tests share: samples against an exact Gaussian mixture, the exact flow map of Gaussian
data, and the observed order of convergence."""

import math

import torch

from conftest import Z


def check_mixture(x, gm, var_law=lambda v: v, z=Z):
    """Weights (argmax of the exact responsibilities at the data level), per-component means and
    variances (against var_law(v), the sampler's exact variance on an isolated component of variance
    v; by default v itself), the overall mean and covariance, each within z standard errors."""
    n, D = x.shape
    k = gm.responsibilities(x).argmax(1)
    for j, w in enumerate(gm.weights.tolist()):
        frac = float((k == j).double().mean())
        assert abs(frac - w) < z * math.sqrt(w * (1 - w) / n), f"weight of component {j}: {frac} vs {w}"
        xj = x[k == j]
        nj = xj.shape[0]
        for d in range(D):
            m, v = float(gm.means[j, d]), float(gm.variances[j, d])
            assert abs(float(xj[:, d].mean()) - m) < z * math.sqrt(v / nj), f"mean of component {j}, coord {d}"
            vv = var_law(v)
            assert abs(float(xj[:, d].var()) - vv) < z * vv * math.sqrt(2 / (nj - 1)), f"var of component {j}, {d}"
    mu, cov = gm.mean(), gm.covariance()
    xc = x - mu
    for d in range(D):
        assert abs(float(xc[:, d].mean())) < z * math.sqrt(float(cov[d, d]) / n), f"mean, coord {d}"
    for a, b in ((0, 0), (1, 1), (0, 1)):
        prod = xc[:, a] * xc[:, b]  # E[prod] = cov[a, b]; its standard error from the sample's own spread
        assert abs(float(prod.mean()) - float(cov[a, b])) < z * float(prod.std()) / math.sqrt(n), f"cov [{a}, {b}]"


def gaussian_flow_map(process, x, t, s, mean, var):
    """The exact probability-flow ODE map x_t -> x_s on Gaussian data N(mean, diag(var)):
    x_s = alpha_s m + sqrt(alpha_s^2 v + sigma_s^2) / sqrt(alpha_t^2 v + sigma_t^2) (x_t - alpha_t m)."""
    m, v = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(var, dtype=torch.float64)
    t, s = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
    a_t, s_t, a_s, s_s = process.alpha(t), process.sigma(t), process.alpha(s), process.sigma(s)
    return a_s * m + torch.sqrt(a_s**2 * v + s_s**2) / torch.sqrt(a_t**2 * v + s_t**2) * (x - a_t * m)


def observed_order(ns, errs) -> float:
    """Least-squares slope of -log(err) against log(n): the observed order of convergence (err ~ n^-order)."""
    logn = torch.log(torch.tensor(ns, dtype=torch.float64))
    loge = torch.log(torch.tensor(errs, dtype=torch.float64))
    return float(-((logn - logn.mean()) * (loge - loge.mean())).sum() / ((logn - logn.mean()) ** 2).sum())


def teacher_errors(denoiser, process, x, t0, t1, exact, solver, step_counts):
    """Max |error| against ``exact`` after walking x from t0 to t1 with ``objectives.teacher.ode_step`` on
    ``grid_karras`` of each of ``step_counts``: the errors whose ratios give a teacher solver's observed order."""
    from torchdiffusion.core.timesteps import grid_karras
    from torchdiffusion.objectives.teacher import ode_step

    n, errs = x.shape[0], []
    for steps in step_counts:
        ts = grid_karras(process, steps, t_start=t0, t_end=t1)
        y = x
        for k in range(steps):
            y = ode_step(denoiser, process, y, ts[k].expand(n), ts[k + 1].expand(n), solver)
        errs.append(float((y - exact).abs().max()))
    return errs
