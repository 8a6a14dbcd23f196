"""k-diffusion's model convention (interop/k_diffusion.py): D(x, sigma) <-> (denoiser, process), checked on the
exact mixture denoiser, whose value at a given log-SNR is known in closed form for every process.

E[x0 | x_t] depends on x_t only through x_t / alpha and on t only through lam (Kingma et al. 2021, Sec. 4), so the
VP mixture denoiser at x_t = alpha x, lam = -log sigma equals the EDM mixture denoiser at (x, sigma): exact up to
float64 rounding of t_from_lam's inversion.
"""

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.interop.k_diffusion import from_k_diffusion, to_k_diffusion

MIX = td.GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [2.0, -1.0]], [[0.2, 0.1], [0.05, 0.3]])
EPS = torch.finfo(torch.float64).eps


def tolerance(x, sigma):
    """The wrapper's one error is the round trip lam -> t -> (alpha, sigma): a few dozen float64 operations, so lam
    is off by at most delta = 64 eps (1 + |lam|). Its effect is the exact denoiser's change over delta, plus the
    rounding of x0_hat itself."""
    lam = -torch.log(sigma)
    exact = MIX.denoiser(td.EDM())(x, sigma)
    moved = MIX.denoiser(td.EDM())(x, sigma * torch.exp(64 * EPS * (1 + lam.abs())))
    return float((moved - exact).abs().max()) + 64 * EPS * (1 + float(exact.abs().max()))


@pytest.mark.parametrize("process", [td.VP(), td.Cosine(), td.Flow(), td.EDM(), td.VE()], ids=repr)
def test_to_k_diffusion_is_the_same_denoiser_at_the_same_log_snr(process):
    model = to_k_diffusion(MIX.denoiser(process), process)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    lo = max(float(process.lam(torch.tensor(process.t_max, dtype=torch.float64))), -10.0)  # Flow: -inf at t = 1
    lam = torch.linspace(lo + 0.5, 4.0, 64, dtype=torch.float64)
    sigma = torch.exp(-lam)  # inside the process's range of log-SNR
    exact = MIX.denoiser(td.EDM())(x, sigma)
    assert torch.allclose(model(x, sigma), exact, rtol=0, atol=tolerance(x, sigma))


def test_from_k_diffusion_round_trip_and_sampling():
    k_model = to_k_diffusion(MIX.denoiser(td.VP()), td.VP())
    denoiser, process = from_k_diffusion(k_model, sigma_min=0.01, sigma_max=50.0)
    assert isinstance(process, td.EDM) and (process.t_min, process.t_max) == (0.01, 50.0)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    t = torch.full((8,), 3.0, dtype=torch.float64)
    exact = MIX.denoiser(td.EDM())(x, t)
    assert torch.allclose(denoiser(x, t), exact, rtol=0, atol=tolerance(x, t))
    x_T = process.prior_sample((4000, 2), generator=torch.Generator().manual_seed(2)).double()
    samples = td.sample_heun(denoiser, process, x_T, td.grid_karras(process, 30))
    # the samples are the mixture's: their mean within 5 standard errors of the mixture mean
    se = (MIX.covariance().diagonal() / len(samples)).sqrt()
    assert ((samples.mean(0) - MIX.mean()).abs() <= 5 * se).all()


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="callable"):
        from_k_diffusion(3)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        from_k_diffusion(lambda x, s: x, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(TypeError, match="NoiseProcess"):
        to_k_diffusion(lambda x, t: x, "vp")
