"""The exact class-conditional denoiser and classifier of a Gaussian mixture whose components are the classes."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.mixture import GaussianMixture
from ..core.process import NoiseProcess

__all__ = ["mixture_class_denoiser", "mixture_classifier"]


def mixture_class_denoiser(gm: GaussianMixture, process: NoiseProcess):
    """D(x, t, class_labels=c) = E[x0 | x_t, c], the posterior mean under component c alone; the label K (= the
    number of components, the null class of our networks) or no label gives the unconditional E[x0 | x_t]."""
    K = len(gm.weights)
    parts = [GaussianMixture([1.0], gm.means[k : k + 1], gm.variances[k : k + 1], gm.shape) for k in range(K)]

    def denoise(x: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond) -> Tensor:
        full = gm.x0_mean(x, process, t)
        if class_labels is None:
            return full.to(x.dtype)
        labels = torch.as_tensor(class_labels, device=x.device).expand(x.shape[0])
        if bool(((labels < 0) | (labels > K)).any()):
            raise ValueError(f"class labels must be in 0..{K} ({K}: unconditional), got {labels.unique().tolist()}")
        out = full.clone()
        for k in labels.unique().tolist():
            if k < K:
                rows = labels == k
                tk = t[rows] if isinstance(t, Tensor) and t.ndim else t
                out[rows] = parts[k].x0_mean(x[rows], process, tk)
        return out.to(x.dtype)

    return denoise


def mixture_classifier(gm: GaussianMixture, process: NoiseProcess):
    """log p_t(c | x_t) (B,) of the mixture's components (Bayes: the responsibilities of p_t), differentiable in x:
    the oracle classifier for ``classifier_guidance``."""

    def log_prob(x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        log_r = torch.log(gm.responsibilities(x, process, t).clamp_min(torch.finfo(torch.float64).tiny))
        return log_r.gather(1, torch.as_tensor(class_labels, device=x.device).long()[:, None])[:, 0]

    return log_prob
