"""Classifier guidance (Dhariwal & Nichol 2021): steer an unconditional denoiser with a noise-conditional classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.denoiser import network_inputs
from ..core.predictions import x0_shift
from ..core.process import NoiseProcess, batch_time

__all__ = ["classifier_guidance", "NoiseConditionalClassifier"]


class NoiseConditionalClassifier(nn.Module):
    """p_t(c | x_t) from a network of (c_in x, c_noise) -> K logits, with the inputs of ``Preconditioned``:
    c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2) and c_noise = -lam(t) / 4 (Karras et al. 2022, Table 1), so
    one network reads every noise level at unit scale. Dhariwal & Nichol 2021 (Sec. 4.1) train such a classifier on
    the noised data of the diffusion model's process; ``training.classifier.train_classifier`` does.
    """

    def __init__(self, net: nn.Module, process: NoiseProcess, sigma_data: float = 1.0):
        super().__init__()
        self.net, self.process, self.sigma_data = net, process, sigma_data

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Logits (B, K)."""
        t = batch_time(t, x)
        c_in, c_noise = network_inputs(*self.process.at(t, x), self.sigma_data)
        return self.net(c_in * x, c_noise)

    def log_prob(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        """log p_t(c | x) (B,) of the labels: what ``classifier_guidance`` takes."""
        logp = torch.log_softmax(self.forward(x, t).to(torch.float64), dim=1)
        return logp.gather(1, torch.as_tensor(class_labels, device=x.device).long()[:, None])[:, 0]


def classifier_guidance(denoiser, process: NoiseProcess, log_prob_class, scale: float = 1.0):
    """The guided denoiser of Dhariwal & Nichol 2021 (Sec. 4.1, Algorithms 1-2), for any sampler.

    Bayes' rule on the noisy marginals, grad log p_t(x | c) = grad log p_t(x) + grad log p_t(c | x), scaled by s:
    score_s = score + s grad_x log p_t(c | x). Through Tweedie's formula (score = (alpha x0_hat - x) / sigma^2)
    that is a shift of x0_hat,

        D_s(x, t, c) = D(x, t) + s sigma^2 / alpha grad_x log p_t(c | x_t = x),

    exactly the conditional denoiser E[x0 | x_t, c] at s = 1 when the classifier is exact. Where alpha = 0 (Flow at
    t = 1) x_t holds no information about the class (p_t(c | x) is the prior) and D is returned unchanged.

    Args:
        denoiser: the unconditional denoiser (x, t, **cond) -> x0_hat.
        process: the noise process of both.
        log_prob_class: (x, t (B,), class_labels (B,)) -> log p_t(c | x) (B,), differentiable in x: a
            noise-conditional classifier, or ``mixture_classifier`` (the exact one).
        scale: s >= 0.
    """
    if not scale >= 0:
        raise ValueError(f"classifier guidance scale must be >= 0, got {scale}")

    def guided(x: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond) -> Tensor:
        if class_labels is None:
            raise ValueError("classifier guidance needs class_labels (the class to guide towards)")
        x0_hat = denoiser(x, t, **cond)
        tb = batch_time(t, x, t.dtype if isinstance(t, Tensor) else x.dtype)
        labels = torch.as_tensor(class_labels, device=x.device).expand(x.shape[0])
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_prob_class(xg, tb, labels).sum(), xg)
        alpha, sigma = process.at(tb, x)
        shift = x0_shift(scale * grad.to(x0_hat.dtype), alpha.clamp_min(torch.finfo(x.dtype).tiny), sigma)
        return x0_hat + torch.where(alpha > 0, shift, 0.0)

    return guided
