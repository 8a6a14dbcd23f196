"""What a latent-diffusion autoencoder is trained to minimise, and how its latents are scaled for diffusion
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3, Sec. 4.3.2, App. G).

The paper's objective (App. G, Eq. 25) is a reconstruction term (L1 plus the LPIPS perceptual distance), a
patch-based adversarial term, and a KL penalty L_reg = KL(q(z | x) || N(0, I)) with a small weight (1e-6 in
their ``kl-f*`` configurations) that keeps the latent space from growing arbitrarily large without forcing it to
be Gaussian. ``autoencoder_loss`` is the perceptual- and adversary-free part, which trains on a CPU: the
reconstruction error summed over pixels (so ``kl_weight`` weighs it against the KL summed over latent entries,
as in their code) plus ``kl_weight`` times the KL, both averaged over the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["kl_divergence", "autoencoder_loss", "latent_scale_factor", "RECONSTRUCTIONS"]

RECONSTRUCTIONS = ("l1", "l2")
"""The reconstruction errors ``autoencoder_loss`` accepts: |x_hat - x| (the paper's, without LPIPS) or (x_hat - x)^2
(a Gaussian decoder's negative log-likelihood up to its constant)."""


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag exp(logvar)) || N(0, I)) per example, (B,):

        KL = 1/2 sum_i (mean_i^2 + exp(logvar_i) - 1 - logvar_i)

    summed over every entry of an example (Kingma & Welling 2014, App. B; the regulariser L_reg of Rombach et
    al. 2022, Sec. 3). exp(l) - 1 - l is computed as expm1(l) - l: near l = 0, where the term is about l^2 / 2,
    its absolute rounding error is then about eps |l| instead of the eps of forming exp(l) - 1.
    """
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must have the same shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}")
    if mean.ndim < 1:
        raise ValueError("mean and logvar need a batch dimension (B, ...)")
    terms = mean**2 + (torch.expm1(logvar) - logvar)
    return 0.5 * terms.reshape(mean.shape[0], -1).sum(1)


def autoencoder_loss(
    recon: Tensor,
    x: Tensor,
    mean: Tensor,
    logvar: Tensor,
    kl_weight: float = 1e-6,
    reconstruction: str = "l1",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The KL-regularized autoencoder loss without perceptual or adversarial terms (Rombach et al. 2022, App. G,
    Eq. 25 with L_adv = 0 and L_rec the plain pixel error):

        loss = E_batch[ sum_pixels err(recon, x) ] + kl_weight E_batch[ KL(q(z | x) || N(0, I)) ]

    with err = |recon - x| ("l1", the paper's pixel term) or (recon - x)^2 ("l2"). ``recon`` is the decoding
    of a draw z ~ q(z | x) (``KLAutoencoder.forward``), so the first term is a one-sample estimate of the
    expected reconstruction error. kl_weight = 1e-6 is the paper's (configs ``kl-f4``, ``kl-f8``).

    Returns:
        (loss, parts): the scalar to minimise, and its detached parts {"reconstruction", "kl"}, each a batch mean.
    """
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
    if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    if recon.shape != x.shape:
        raise ValueError(f"recon and x must have the same shape, got {tuple(recon.shape)} and {tuple(x.shape)}")
    if mean.shape[0] != x.shape[0]:
        raise ValueError(f"the latents hold {mean.shape[0]} examples, x holds {x.shape[0]}")
    diff = recon - x
    err = diff.abs() if reconstruction == "l1" else diff**2
    rec = err.reshape(x.shape[0], -1).sum(1).mean()
    kl = kl_divergence(mean, logvar).mean()
    return rec + kl_weight * kl, {"reconstruction": rec.detach(), "kl": kl.detach()}


def latent_scale_factor(latents: Tensor) -> float:
    """1 / sigma_hat, the factor that gives the latents unit variance before diffusion (Rombach et al. 2022,
    Sec. 4.3.2 and App. G):

        sigma_hat^2 = 1 / (b c h w) sum_{b,c,h,w} (z^{b,c,h,w} - mu_hat)^2,  mu_hat = 1 / (b c h w) sum z^{b,c,h,w}

    One scalar for the whole latent, pooled over examples, channels and positions, as the paper does (its code:
    ``1. / z.flatten().std()``, which divides by bchw - 1 instead of bchw, a relative difference of 1 / (2 bchw)).
    One scalar, not one per channel, keeps the latent's geometry: the noise process then adds isotropic noise to
    a uniformly rescaled z, and ``decode(z_scaled / factor)`` inverts it. The paper computes it on the first
    training batch; this function takes whatever latents it is given, and more of them give a better estimate (its
    relative standard error is about 1 / sqrt(2 n) for n independent entries), so pass the encodings of the whole
    training set when affordable. ``latents`` should be draws z ~ q(z | x), what the diffusion model trains on
    (the paper's ``get_first_stage_encoding`` samples the posterior), not only its means.

    Returns:
        a Python float (JSON-able, for a checkpoint's config).
    """
    z = latents.detach().reshape(-1).to(torch.float64)
    if z.numel() < 2:
        raise ValueError(f"need at least 2 latent entries to estimate a standard deviation, got {z.numel()}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("latents contain NaN or inf")
    sigma = float(torch.sqrt(((z - z.mean()) ** 2).mean()))
    if not sigma > 0:
        raise ValueError("the latents are all equal (standard deviation 0): there is no scale to normalise")
    return 1.0 / sigma
