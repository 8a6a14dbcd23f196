"""The currency between models and samplers: the denoiser ``D(x, t, **cond) -> x0_hat``.

``as_denoiser`` turns a network predicting any target of ``predictions`` into one, once;
``Preconditioned`` feeds a raw network unit-scale inputs (and, for a target, gives a unit-scale output:
Karras et al. 2022, Sec. 5 and Table 1); ``count_nfe`` counts a denoiser's evaluations.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from .predictions import EPS, X0, Prediction
from .process import NoiseProcess, batch_time

__all__ = [
    "Denoiser",
    "Preconditioned",
    "as_denoiser",
    "count_nfe",
    "CountingDenoiser",
    "AutocastDenoiser",
    "network_inputs",
]


def _check(predicts) -> None:
    if not isinstance(predicts, Prediction):
        raise TypeError(
            f"predicts must be a Prediction (torchdiffusion.EPS, X0, V, SCORE or FLOW), got {predicts!r}; "
            "names become objects through torchdiffusion.names.PREDICTIONS"
        )


class Denoiser(Protocol):
    """Anything callable as ``denoiser(x, t, **cond) -> x0_hat`` with x (B, ...) and t (B,)."""

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor: ...


# The network sees c_noise = -lam / 4; where alpha = 0 (Flow at t = 1) lam is -inf. Capped here, far below
# any lam training draws (t < 1 in float64 gives lam > -37), so that x0 (with its skip), v and flow
# networks give a finite x0_hat there, as samplers that start at t = 1 need.
_LAM_FLOOR = -40.0


def network_inputs(alpha: Tensor, sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """(c_in, c_noise) of a network reading x_t at unit scale: c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2)
    (Karras et al. 2022, Table 1), c_noise = -lam / 4 per example, capped where lam = -inf (see ``_LAM_FLOOR``).
    alpha, sigma: broadcast against x (``process.at``)."""
    c_in = torch.rsqrt(alpha**2 * sigma_data**2 + sigma**2)
    c_noise = (torch.log(sigma) - torch.log(alpha)).clamp(max=-_LAM_FLOOR).flatten() / 4  # -lam / 4
    return c_in, c_noise


class Preconditioned(nn.Module):
    """Wrap a raw network so its inputs, and with ``predicts`` its output, have unit scale whatever the process.

    The network sees ``c_in x`` with c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2), which has
    unit variance when the data do (Karras et al. 2022, Eq. 7 / Table 1, c_in), and the time as
    ``c_noise = -lam(t) / 4`` (a bounded, process-independent noise level; EDM uses log(sigma)/4,
    which is the same for alpha = 1). With ``predicts`` (a ``Prediction``) it returns c_skip x + c_out F
    (``Prediction.output_scalings``), in the units of ``predicts``; train it with ``denoising_loss(...,
    target=predicts, sigma_data=sigma_data)``, whose "simple" weighting is then unit weight on F (EDM's
    Eq. 8). With ``predicts=None`` it returns F itself: the wrapping of checkpoints written before output
    preconditioning existed (their config lacks ``precondition_output``). For eps the two are the same.
    """

    def __init__(
        self, net: nn.Module, process: NoiseProcess, sigma_data: float = 1.0, predicts: Prediction | None = None
    ):
        super().__init__()
        if predicts is not None:
            _check(predicts)
        self.net, self.process, self.sigma_data, self.predicts = net, process, sigma_data, predicts

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        key = _one_time(t, x)
        t = batch_time(t, x)
        return self._forward(x, t, *self.coefficients(t, x, key), cond)

    def forward_with(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor, **cond) -> Tensor:
        """The same, given (B,) times and alpha(t), sigma(t) broadcast against x (saves recomputing them)."""
        return self._forward(x, t, alpha, sigma, *network_inputs(alpha, sigma, self.sigma_data), cond)

    def coefficients(self, t: Tensor, x: Tensor, key=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha, sigma, c_in, c_noise) at the (B,) times t for x. With ``key`` (``_one_time``: one time for the
        whole batch, as a sampler's step has) they are computed once per time and remembered: on image tensors
        the ~30 small float64 operations that give them cost more than the sampler's own update (DDIM: 78 of
        97 us per step at batch 128 of 8x8 with a zero network), and their values depend on the time alone."""
        if key is None:
            alpha, sigma = self.process.at(t, x)
            return alpha, sigma, *network_inputs(alpha, sigma, self.sigma_data)
        key = (*key, self.sigma_data)
        memo = self.__dict__.setdefault("_memo", {})  # not a buffer: no state_dict entry; rebuilt after a copy
        if self.__dict__.get("_memo_process") is not self.process:  # held, not its id(): an id can be reused
            memo.clear()
            self.__dict__["_memo_process"] = self.process
        hit = memo.get(key)
        if hit is None:
            if len(memo) >= 4096:  # bounded: a long run over many grids starts afresh
                memo.clear()
            alpha, sigma = self.process.at(t, x)
            hit = memo[key] = (alpha, sigma, *network_inputs(alpha, sigma, self.sigma_data))
        return hit

    def _forward(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor, c_in, c_noise, cond) -> Tensor:
        out = self.net(c_in * x, c_noise, **cond)
        if self.predicts is None or self.predicts is EPS:  # eps: c_skip = 0, c_out = 1
            return out
        c_skip, c_out = self.predicts.output_scalings(self.process, t, x, self.sigma_data, (alpha, sigma))
        return c_out * out if self.predicts is not X0 else c_skip * x + c_out * out


class _NetDenoiser(nn.Module):
    """A network predicting ``predicts``, seen as a denoiser (x, t, **cond) -> x0_hat."""

    def __init__(self, model: nn.Module, process: NoiseProcess, predicts: Prediction):
        super().__init__()
        self.model, self.process, self.predicts = model, process, predicts

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        key = _one_time(t, x)
        t = batch_time(t, x)
        if isinstance(self.model, Preconditioned) and self.model.process is self.process:  # share alpha, sigma
            coef = self.model.coefficients(t, x, key)
            return self.predicts.to_x0(self.process, x, t, self.model._forward(x, t, *coef, cond), coef[:2])
        if isinstance(self.model, Preconditioned):
            ab = self.process.at(t, x)
            return self.predicts.to_x0(self.process, x, t, self.model.forward_with(x, t, *ab, **cond), ab)
        return self.predicts.to_x0(self.process, x, t, self.model(x, t, **cond))


def _one_time(t, x: Tensor) -> tuple | None:
    """A memo key when t is one time for the whole batch on the CPU, as samplers call a denoiser (a float, a 0-d
    tensor, or a 0-d one expanded to (B,) by ``batch_time``): (t, B, x's ndim, dtype). None otherwise (per-example
    times, CUDA, where reading t back would wait for the device and small operations overlap anyway, or t under
    autograd)."""
    if x.device.type != "cpu":
        return None
    if not isinstance(t, Tensor):
        return (float(t), x.shape[0], x.ndim, x.dtype, torch.is_inference_mode_enabled())
    if t.device.type != "cpu" or t.requires_grad or t.ndim > 1 or (t.ndim == 1 and t.stride(0) != 0 and len(t) > 1):
        return None
    if type(t) is not Tensor:  # a subclass (functorch's wrappers) may not read back
        return None
    # inference mode in the key: its tensors cannot be saved for a later backward (guidance's gradient in x)
    return (float(t.reshape(-1)[0]), x.shape[0], x.ndim, x.dtype, torch.is_inference_mode_enabled())


def as_denoiser(net, process: NoiseProcess, predicts: Prediction = EPS) -> _NetDenoiser:
    """Turn a network ``net(x, t, **cond)`` predicting eps, x0, v, score or flow into a denoiser.

    Args:
        net: callable (x (B, ...), t (B,), **cond) -> prediction shaped like x. Wrap a raw
            network in ``Preconditioned`` first if it expects unit-scale inputs (and, with
            ``Preconditioned(..., predicts=predicts)``, gives a unit-scale output).
        process: the ``NoiseProcess`` the network was trained with.
        predicts: what the network outputs: ``EPS``, ``X0``, ``V``, ``SCORE`` or ``FLOW``.
    """
    _check(predicts)
    scaled_for = getattr(net, "predicts", None) if isinstance(net, Preconditioned) else None
    if scaled_for is not None and scaled_for != predicts:
        raise ValueError(f"the network's output is preconditioned for {scaled_for.name!r}, not {predicts.name!r}")
    return _NetDenoiser(net, process, predicts)


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (the NFE); ``nfe`` is the count so far."""

    def __init__(self, denoiser):
        self.denoiser, self.nfe = denoiser, 0

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, t, **cond)


def count_nfe(denoiser) -> CountingDenoiser:
    """``d = count_nfe(denoiser); sample_xxx(d, ...); d.nfe`` is the number of evaluations used."""
    return CountingDenoiser(denoiser)


class AutocastDenoiser:
    """A denoiser evaluated under ``torch.autocast(device_type, dtype)`` (mixed precision, e.g. bfloat16).

    Autocast lowers only the network's matrix products and convolutions; its output comes back in x's dtype,
    so the sampler's own arithmetic (the steps, the multistep coefficients) stays in x's precision, which is
    why the whole sampling call is not simply run under autocast (a sampler's small ``matmul`` would drop too).
    """

    def __init__(self, denoiser, device_type: str, dtype: torch.dtype):
        self.denoiser, self.device_type, self.dtype = denoiser, device_type, dtype

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.denoiser(x, t, **cond).to(x.dtype)
