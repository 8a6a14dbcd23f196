"""Reference libraries for parity tests and benchmarks (optional; never a runtime dependency).

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

__all__ = ["load_k_diffusion_sampling"]


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
