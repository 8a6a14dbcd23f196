"""Classifier-free guidance (Ho & Salimans 2022), its guidance interval (Kynkäänniemi et al. 2024) and rescale
(Lin et al. 2024), as a map from a class-conditional denoiser to a guided one."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.process import batch_time

__all__ = ["classifier_free"]


def classifier_free(denoiser, scale: float, *, null_label: int, interval: tuple[float, float] | None = None,
                    rescale: float = 0.0):  # fmt: skip
    """The classifier-free guided denoiser D_w(x, t, class_labels=c) of a class-conditional ``denoiser``.

    Ho & Salimans 2022, Eq. 6, eps_w = (1 + w') eps(x, c) - w' eps(x), written with the scale w = 1 + w' (w = 1:
    the conditional model, w = 0: the unconditional one) and on x0_hat:

        D_w(x, t, c) = D(x, t, null) + w (D(x, t, c) - D(x, t, null)).

    At fixed (x, t) every prediction target is affine in x0_hat with the same coefficients, so this is the same
    combination on eps, v or the score; on the score it is the score of p_t(x)^{1-w} p_t(x | c)^w.

    Args:
        denoiser: (x, t, class_labels=(B,) long, **cond) -> x0_hat, trained with label dropout so that
            ``null_label`` means "no class" (our MLP and U-Net: label ``num_classes``).
        scale: w >= 0.
        null_label: the label of the unconditional model.
        interval: (t_lo, t_hi): guide only where t_lo <= t <= t_hi and use the conditional denoiser (w = 1)
            elsewhere (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"; they guide the middle
            noise levels only). None: everywhere.
        rescale: phi in [0, 1] (Lin et al. 2024, Sec. 3.4, Eqs. 15-16): the guided x0_hat is rescaled per example
            to the standard deviation (over its non-batch dims) of the conditional one, and mixed with the plain
            guided one as phi x_rescaled + (1 - phi) x_guided. It counters the over-saturation of large w.
    The two network evaluations run as one batch of 2B (conditional and null labels side by side).
    """
    if not scale >= 0:
        raise ValueError(f"guidance scale must be >= 0 (1: the conditional model), got {scale}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must be in [0, 1], got {rescale}")
    if interval is not None and not (len(interval) == 2 and interval[0] <= interval[1]):
        raise ValueError(f"interval must be (t_lo, t_hi) with t_lo <= t_hi, got {interval}")

    def guided(x: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond) -> Tensor:
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class_labels (the class to guide towards)")
        B = x.shape[0]
        t = batch_time(t, x, t.dtype if isinstance(t, Tensor) else x.dtype)
        labels = torch.as_tensor(class_labels, device=x.device).expand(B)
        both_labels = torch.cat([labels, torch.full_like(labels, null_label)])
        both = denoiser(torch.cat([x, x]), torch.cat([t, t]), class_labels=both_labels, **_twice(cond, B))
        cond_x0, null_x0 = both[:B], both[B:]
        out = null_x0 + scale * (cond_x0 - null_x0)
        if rescale > 0:
            dims = tuple(range(1, x.ndim))
            ratio = cond_x0.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True).clamp_min(1e-12)
            out = rescale * (out * ratio) + (1 - rescale) * out
        if interval is not None:
            inside = ((t >= interval[0]) & (t <= interval[1])).reshape(B, *([1] * (x.ndim - 1)))
            out = torch.where(inside, out, cond_x0)
        return out

    return guided


def _twice(cond: dict, B: int) -> dict:
    """Per-example conditioning tensors (leading dim B) repeated for the doubled batch; the rest as is."""
    return {
        k: torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim and v.shape[0] == B else v for k, v in cond.items()
    }
