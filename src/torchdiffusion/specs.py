"""Names to objects: the one place that maps strings to processes, networks and samplers.

The command line and checkpoints (whose JSON config must rebuild the objects) use it; the
Python API itself takes objects. A spec is a JSON-able dict ``{"name": ..., **kwargs}``.
"""

from __future__ import annotations

from typing import Any

from .nets import NETS
from .processes import EDM, VE, VP, Cosine, Discrete, Flow, SubVP
from .samplers import SAMPLERS

PROCESSES = {
    "vp": VP,
    "subvp": SubVP,
    "ve": VE,
    "cosine": Cosine,
    "edm": EDM,
    "flow": Flow,
    "ddpm": Discrete.from_schedule,  # kwargs: schedule ("linear", "cosine", "sigmoid", "quadratic"), T
}


def _pick(kind: str, table: dict, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    return table[name]


def build_process(spec: dict[str, Any] | str):
    """A NoiseProcess from ``"vp"`` or ``{"name": "ddpm", "schedule": "cosine", "T": 1000}``."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    cls = _pick("process", PROCESSES, spec.pop("name"))
    try:
        return cls(**spec)
    except TypeError as e:
        raise ValueError(f"bad options for process: {e}") from None


def build_net(spec: dict[str, Any]):
    """A network from ``{"name": "mlp", "dim": 2, "width": 256, ...}``."""
    spec = dict(spec)
    cls = _pick("network", NETS, spec.pop("name"))
    try:
        return cls(**spec)
    except TypeError as e:
        raise ValueError(f"bad options for network: {e}") from None


def get_sampler(name: str):
    """A sampler function by name (see ``torchdiffusion.samplers.SAMPLERS``)."""
    return _pick("sampler", SAMPLERS, name)
