"""k-diffusion's conventions: its models ``D(x, sigma)`` as our denoisers and back, and its sampling module.

k-diffusion (Karras et al. 2022) writes every model as a denoiser of x = x0 + sigma n, i.e. our ``EDM`` process
(alpha = 1, sigma = t): ``from_k_diffusion(model)`` is that model as ``(denoiser, process)``, and
``to_k_diffusion(denoiser, process)`` is any of our denoisers as k-diffusion's ``model(x, sigma)``, at the same
log-SNR: x_t = alpha(t) x with lam(t) = -log sigma (Kingma et al. 2021: processes with equal log-SNR are one
process rescaled). Neither needs k-diffusion installed.

k-diffusion's package ``__init__`` (and its ``utils``) import torchvision, clip and clean-fid,
which cannot be installed everywhere; its ``sampling`` module needs only torch, scipy,
torchsde, torchdiffeq and tqdm, plus ``utils.append_dims``. ``load_k_diffusion_sampling``
imports that module alone, under a bare package object with a one-function ``utils`` stub.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch

from ..core.process import NoiseProcess, batch_time
from ..core.processes import EDM

__all__ = ["load_k_diffusion_sampling", "from_k_diffusion", "to_k_diffusion"]


def _append_dims(x, target_dims: int):
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def load_k_diffusion_sampling():
    """``k_diffusion.sampling`` without the package's ``__init__``, or None if it cannot be loaded.

    Idempotent: a second call returns the module already loaded, and the package object carries
    its ``__spec__`` so ``importlib.util.find_spec("k_diffusion")`` keeps working afterwards.
    """
    loaded = sys.modules.get("k_diffusion.sampling")
    if loaded is not None:
        return loaded
    try:
        spec = importlib.util.find_spec("k_diffusion")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.submodule_search_locations is None:
        return None
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        for k, v in saved.items():  # leave sys.modules as it was
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        return None


def from_k_diffusion(model, sigma_min: float = 0.002, sigma_max: float = 80.0):
    """``(denoiser, process)`` of a k-diffusion-style model ``model(x, sigma, **cond) -> x0_hat``: the denoiser is the
    model itself, on ``EDM(t_min=sigma_min, t_max=sigma_max)`` (alpha = 1, sigma = t; Karras et al. 2022, Table 1),
    so every sampler, likelihood and guidance method runs on it:
    ``denoiser, process = from_k_diffusion(model_wrap)``.

    ``sigma_min`` / ``sigma_max``: the noise levels it was trained on (k-diffusion's ``model.sigma_min`` /
    ``sigma_max`` where it has them), the ends of the samplers' grids.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable model(x, sigma) -> x0_hat, got {type(model).__name__}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    process = EDM(t_min=float(sigma_min), t_max=float(sigma_max))

    def denoiser(x, t, **cond):
        return model(x, batch_time(t, x).to(x.dtype), **cond)

    return denoiser, process


def to_k_diffusion(denoiser, process: NoiseProcess):
    """Our ``denoiser`` on ``process`` as k-diffusion's ``model(x, sigma, **cond)``, for its samplers.

    x is in alpha = 1 units; the denoiser is called at the time of the same log-SNR, t = t_from_lam(-log sigma),
    on x_t = alpha(t) x (for EDM and VE, alpha = 1 and t = sigma). The mixture's exact denoiser passes through
    exactly (tests/test_k_diffusion_wrap.py).
    """
    if not isinstance(process, NoiseProcess):
        raise TypeError(f"process must be a NoiseProcess, got {type(process).__name__}")

    def model(x, sigma, **cond):
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(len(x))
        t = process.t_from_lam(-torch.log(s))
        alpha = process.alpha(t).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return denoiser(alpha * x, t.to(x.dtype), **cond)

    return model
