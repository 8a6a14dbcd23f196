"""Guidance proven on the exact Gaussian mixture, whose components are the classes (issue #12, item 1).

Closed forms: p_t(x | c) is component c's Gaussian marginal, p_t(c | x) the responsibilities (Bayes), so
classifier guidance at scale 1 with the exact classifier is the exact conditional denoiser (Dhariwal & Nichol 2021,
Sec. 4.1), classifier-free guidance at scale w is the score of p_t^{1-w} p_t(. | c)^w (Ho & Salimans 2022, Eq. 6),
scale 0 and 1 give the unconditional and conditional denoisers, and the limited interval (Kynkäänniemi et al. 2024)
changes nothing outside it. Float64 on the CPU.
"""

import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import VP, Flow, GaussianMixture, grid_lam, sample_dpm_solver_pp, tweedie_score
from torchdiffusion.guidance import classifier_free, classifier_guidance, mixture_class_denoiser, mixture_classifier

F64 = torch.float64
GM = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [[0.3, 0.2], [0.25, 0.4], [0.15, 0.15]])
K = 3


def _points(process, n=64, seed=0):
    """x_t of exact data at a spread of times, one time per example."""
    g = gen(seed)
    x0 = GM.sample(n, generator=g)
    t = process.t_min + (process.t_max - process.t_min) * torch.rand(n, generator=g, dtype=F64) * 0.98
    return process.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=F64)), t


def _component(c):
    return GaussianMixture([1.0], GM.means[c : c + 1], GM.variances[c : c + 1])


@pytest.mark.parametrize("c", range(K))
def test_cfg_at_scale_0_and_1_is_the_unconditional_and_the_conditional_denoiser(c):
    p = VP()
    x, t = _points(p)
    den = mixture_class_denoiser(GM, p)
    labels = torch.full((len(x),), c)
    torch.testing.assert_close(classifier_free(den, 0.0, null_label=K)(x, t, class_labels=labels), den(x, t))
    cond = _component(c).x0_mean(x, p, t)
    # w = 1: null + (cond - null) rounds at |x0_hat| eps
    torch.testing.assert_close(
        classifier_free(den, 1.0, null_label=K)(x, t, class_labels=labels), cond, rtol=0, atol=1e-13
    )
    torch.testing.assert_close(den(x, t, class_labels=labels), cond, rtol=0, atol=0)


@pytest.mark.parametrize("w", [0.5, 2.0, 4.0])
def test_cfg_field_is_the_score_of_the_tilted_density(w):
    """Tweedie's score of the guided x0_hat equals grad_x [(1 - w) log p_t(x) + w log p_t(x | c)] (autograd of
    the exact log-densities). Tolerance: float64 rounding of scores of size |x| / sigma^2, relative 1e-9."""
    p, c = VP(), 1
    x, t = _points(p, seed=1)
    guided = classifier_free(mixture_class_denoiser(GM, p), w, null_label=K)(
        x, t, class_labels=torch.full((len(x),), c)
    )
    a, s = (v[:, None] for v in p.alpha_sigma(t))
    score = tweedie_score(x, guided, a, s)
    xg = x.clone().requires_grad_(True)
    tilted = (1 - w) * GM.log_prob(xg, p, t) + w * _component(c).log_prob(xg, p, t)
    (expected,) = torch.autograd.grad(tilted.sum(), xg)
    torch.testing.assert_close(score, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("process", [VP(), Flow()], ids=["VP", "Flow"])
def test_classifier_guidance_at_scale_1_with_the_exact_classifier_is_the_conditional_denoiser(process):
    """grad log p_t(x | c) = grad log p_t(x) + grad log p_t(c | x): D + sigma^2/alpha grad log p_t(c | x) is
    E[x0 | x_t, c] exactly (to rounding, amplified by sigma^2 / alpha)."""
    x, t = _points(process, seed=2)
    den = classifier_guidance(GM.denoiser(process), process, mixture_classifier(GM, process), scale=1.0)
    for c in range(K):
        got = den(x, t, class_labels=torch.full((len(x),), c))
        amp = float((process.sigma(t) ** 2 / process.alpha(t)).max())
        torch.testing.assert_close(got, _component(c).x0_mean(x, process, t), rtol=1e-9, atol=1e-12 * (1 + amp))


def test_classifier_guided_samples_reproduce_the_chosen_component():
    """Sampling with the exactly guided denoiser at scale 1 draws from component c: mean and variance per
    dimension within Z standard errors (n = 4000; DPM-Solver++(2M) on 60 lam steps, whose discretization bias on
    a Gaussian is far below the standard errors)."""
    p, c, n = VP(), 2, 4000
    den = classifier_guidance(GM.denoiser(p), p, mixture_classifier(GM, p), scale=1.0)
    x = p.prior_sample((n, 2), generator=gen(3), dtype=F64)
    out = sample_dpm_solver_pp(den, p, x, grid_lam(p, 60), class_labels=torch.full((n,), c))
    m, v = GM.means[c], GM.variances[c]
    se_mean, se_var = (v / n).sqrt(), v * math.sqrt(2 / (n - 1))
    assert ((out.mean(0) - m).abs() < Z * se_mean).all(), (out.mean(0), m)
    assert ((out.var(0) - v).abs() < Z * se_var).all(), (out.var(0), v)


def test_interval_guidance_is_the_conditional_denoiser_outside_the_interval():
    p, c = VP(), 0
    x, t = _points(p, n=200, seed=4)
    den = mixture_class_denoiser(GM, p)
    labels = torch.full((len(x),), c)
    lo, hi = 0.3, 0.6
    limited = classifier_free(den, 3.0, null_label=K, interval=(lo, hi))(x, t, class_labels=labels)
    full = classifier_free(den, 3.0, null_label=K)(x, t, class_labels=labels)
    inside = (t >= lo) & (t <= hi)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(limited[inside], full[inside], rtol=0, atol=0)
    torch.testing.assert_close(limited[~inside], den(x, t, class_labels=labels)[~inside], rtol=0, atol=0)


def test_rescale_matches_the_conditional_spread():
    """Lin et al. 2024, Eqs. 15-16: phi = 0 is plain CFG; phi = 1 gives each example the standard deviation of the
    conditional x0_hat."""
    p, c = VP(), 1
    x, t = _points(p, seed=5)
    den = mixture_class_denoiser(GM, p)
    labels = torch.full((len(x),), c)
    plain = classifier_free(den, 5.0, null_label=K)(x, t, class_labels=labels)
    torch.testing.assert_close(classifier_free(den, 5.0, null_label=K, rescale=0.0)(x, t, class_labels=labels), plain)
    full = classifier_free(den, 5.0, null_label=K, rescale=1.0)(x, t, class_labels=labels)
    torch.testing.assert_close(full.std(1), den(x, t, class_labels=labels).std(1), rtol=1e-12, atol=1e-14)


def test_cfg_passes_per_example_conditioning_to_both_halves():
    seen = {}

    def den(x, t, class_labels=None, mask=None):
        seen["labels"], seen["mask"] = class_labels, mask
        return x * 0 + class_labels[:, None].to(x.dtype)

    x, mask = torch.zeros(3, 2, dtype=F64), torch.arange(3)
    out = classifier_free(den, 2.0, null_label=9)(
        x, torch.full((3,), 0.5, dtype=F64), class_labels=torch.tensor([1, 2, 3]), mask=mask
    )
    assert seen["labels"].tolist() == [1, 2, 3, 9, 9, 9] and seen["mask"].tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(out[:, 0], 9 + 2.0 * (torch.tensor([1.0, 2, 3], dtype=F64) - 9))


def test_bad_options_are_refused():
    p = VP()
    den = mixture_class_denoiser(GM, p)
    x, t = _points(p, n=4)
    for kw in ({"scale": -1.0}, {"scale": 1.0, "rescale": 1.5}, {"scale": 1.0, "interval": (0.6, 0.3)}):
        with pytest.raises(ValueError):
            classifier_free(den, null_label=K, **kw)
    with pytest.raises(ValueError, match="class_labels"):
        classifier_free(den, 2.0, null_label=K)(x, t)
    with pytest.raises(ValueError, match="scale"):
        classifier_guidance(GM.denoiser(p), p, mixture_classifier(GM, p), scale=-0.5)
    with pytest.raises(ValueError, match="class labels must be in"):
        den(x, t, class_labels=torch.full((4,), K + 1))
