"""Inverse problems and editing on a trained model: the Python side of ``torchdiffusion inpaint | outpaint |
colorize | upscale | edit | interpolate``.

    pipe = td.load("runs/digits")
    m = inpainting(image, hole)                 # a Measurement: y = the kept pixels, sigma_y = 0
    x0 = solve(pipe, m, 8, nfe=100)             # 8 posterior samples, the task's default method
    x0 = solve(pipe, m, 8, method="dps", nfe=250, generator=torch.Generator().manual_seed(0))

The measurement builders take one image (C, H, W) in [-1, 1] (as ``data`` loads them) and return a ``Measurement``
for ``core.measurements``' operators; ``solve`` draws posterior samples with any sampler of ``names.INVERSE``
within a budget of denoiser calls per sample (``InverseInfo.knobs``: RePaint's jumps and SMC's particles included).

Default method per task (``DEFAULT_METHODS``): DDRM. On the exact denoiser of ``make bench-inverse``'s image-like
mixture MMPS is our best single-trajectory method (SW2 0.012-0.022 at 100 calls against DDRM's 0.014-0.034), but it
reads the covariance of p(x0 | x_t) off the denoiser's Jacobian, which a trained network does not make symmetric
positive definite: on the digits model, 3 conjugate-gradient steps left observed pixels up to 2.0 off. DDRM keeps
noiseless observations exactly, handles noisy ones, and is among the fastest. SMC (the twisted diffusion sampler) is
exact as its particles grow, but every particle is one more image per step: a choice for a user who pays for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.measurements import Colorize, Downsample, Mask, Measurement, Outpaint
from ..names import GRID_FUNCTIONS, INVERSE, get_inverse
from ..samplers import progress_callback

__all__ = [
    "TASKS", "DEFAULT_METHODS", "DEFAULT_NFE", "inpainting", "outpainting", "colorization", "super_resolution",
    "solve", "condition_labels",
]  # fmt: skip

TASKS = ("inpaint", "outpaint", "colorize", "upscale")
DEFAULT_NFE = 100
# task -> default method (see the module docstring: the benchmark's best, MMPS, is unstable on trained networks)
DEFAULT_METHODS = {"inpaint": "ddrm", "outpaint": "ddrm", "colorize": "ddrm", "upscale": "ddrm"}


def _image(image: Tensor, what: str = "image") -> Tensor:
    if not isinstance(image, Tensor) or image.ndim != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{what} must be one image (C, H, W) in [-1, 1], got {shape}")
    return image


def inpainting(image: Tensor, hole: Tensor) -> Measurement:
    """Fill ``hole`` ((H, W) or (C, H, W) booleans, True = generate) from the rest of ``image``: y = the kept pixels,
    sigma_y = 0 (``Mask``; the pixels under the hole are ignored)."""
    image = _image(image)
    hole = torch.as_tensor(hole).bool()
    if hole.shape not in (image.shape[-2:], image.shape):
        raise ValueError(f"the hole mask has shape {tuple(hole.shape)}; the image is {tuple(image.shape)}")
    if bool(hole.all()) or not bool(hole.any()):
        raise ValueError("the hole mask must mark some pixels to generate (True / white) and keep some others")
    op = Mask((~hole).to(torch.float64), shape=tuple(image.shape))
    return Measurement(op, op(image[None].to(torch.float64)), 0.0)


def outpainting(image: Tensor, shape: tuple[int, int, int]) -> Measurement:
    """Extend ``image`` (C, h, w) to ``shape`` (C, H, W): it is kept in the centre and the border is generated
    (``Outpaint``, sigma_y = 0)."""
    image = _image(image)
    C, h, w = image.shape
    if shape[0] != C or not (h <= shape[1] and w <= shape[2]) or (h, w) == tuple(shape[1:]):
        raise ValueError(f"outpainting extends a smaller image: got {tuple(image.shape)} for a model of {shape}")
    op = Outpaint(shape, (h, w))
    top, left = (shape[1] - h) // 2, (shape[2] - w) // 2
    full = torch.zeros(shape, dtype=torch.float64)
    full[:, top : top + h, left : left + w] = image.to(torch.float64)
    return Measurement(op, op(full[None]), 0.0)


def colorization(gray: Tensor, shape: tuple[int, int, int], sigma_y: float = 0.0) -> Measurement:
    """Colour a gray image (1, H, W), or the gray of an RGB one, for an RGB model of ``shape`` (3, H, W): y = the
    channel mean (``Colorize``)."""
    gray = _image(gray, "the gray image")
    if shape[0] != 3:
        raise ValueError(f"colorization needs an RGB model (3 channels); this one has {shape[0]}")
    op = Colorize(shape=shape)
    if gray.shape[0] == 3:
        gray = op(gray[None].to(torch.float64))[0]
    if tuple(gray.shape) != (1, *shape[1:]):
        raise ValueError(f"the gray image has shape {tuple(gray.shape)}; the model needs (1, {shape[1]}, {shape[2]})")
    return Measurement(op, gray[None].to(torch.float64), sigma_y)


def super_resolution(low: Tensor, shape: tuple[int, int, int], sigma_y: float = 0.0) -> Measurement:
    """Upscale ``low`` (C, H / f, W / f) to ``shape`` (C, H, W): y = the f x f average pooling of the answer
    (``Downsample``), f = H / h."""
    low = _image(low, "the low-resolution image")
    C, h, w = low.shape
    f = shape[1] // h if h else 0
    if C != shape[0] or f < 2 or (h * f, w * f) != tuple(shape[1:]):
        raise ValueError(
            f"the low-resolution image {tuple(low.shape)} must be the model's {shape} shrunk by an integer factor >= 2"
        )
    return Measurement(Downsample(f, shape=shape), low[None].to(torch.float64), sigma_y)


def condition_labels(pipe, n: int, labels=None) -> Tensor | None:
    """The class labels (n,) for conditioning on a picture: the given class, or for a class-conditional model without
    one its null class (the unconditional model that label dropout trains), so the answer depends on the picture
    alone; None for an unconditional model."""
    if labels is not None or not pipe.num_classes:
        return pipe._labels(n, labels)
    if not pipe.config.get("label_dropout", 0.0) > 0:
        raise ValueError(
            "this class-conditional model was trained without label dropout, so it has no unconditional part: "
            f"give a class (labels=K / --class K, 0..{pipe.num_classes - 1})"
        )
    return torch.full((n,), pipe.num_classes)


def solve(
    pipe,
    measurement: Measurement,
    n: int,
    *,
    method: str | None = None,
    task: str | None = None,
    nfe: int = DEFAULT_NFE,
    generator: torch.Generator | None = None,
    labels=None,
    progress: bool = False,
    precision: str = "auto",
    **knobs,
) -> Tensor:
    """n posterior samples (n, *pipe.shape) on the CPU, for one observation, from a ``Pipeline`` (``td.load``).

    Args:
        method: a name of ``names.INVERSE`` (default: ``DEFAULT_METHODS[task]``, or "ddrm" without a task).
        nfe: denoiser calls per sample (final step included; RePaint's re-done steps and SMC's particles count).
        generator: every random number (prior noise, the sampler's noise).
        labels: a class-conditional model's class (one int) for every sample; default: its null class (the
            unconditional model that label dropout trains), so the posterior is given y alone.
        precision: the network's arithmetic ("auto", "fp32", "bf16", "fp16"; ``Pipeline.sampling_denoiser``): auto
            is bf16 for a U-Net where bf16 is native. On the digits model (``benchmarks/trained_inverse.py
            --precision``) every method ran 1.6-1.8x faster in bf16 at one thread, with the observed and hole
            errors within the spread between two fp32 noise seeds; "fp32" reproduces float32 samples.
        **knobs: the method's own options (``zeta`` for DPS, ``eta``, ...).
    """
    if task is not None and task not in DEFAULT_METHODS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(DEFAULT_METHODS)}")
    name = method or (DEFAULT_METHODS[task] if task else "ddrm")
    info = get_inverse(name)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (the samples), got {n!r}")
    pipe.require_denoiser("posterior sampling")
    if tuple(measurement.operator.in_shape) != tuple(pipe.shape):
        raise ValueError(f"the measurement is of {measurement.operator.in_shape} images; the model makes {pipe.shape}")
    if info.noiseless and float(measurement.sigma_y) > 0:
        ok = sorted(k for k, v in INVERSE.items() if not v.noiseless)
        raise ValueError(f"{name} assumes a noiseless measurement (sigma_y = 0); for sigma_y > 0 use one of {ok}")
    if name == "smc":  # the twist's and last step's width: the model's own data scale
        knobs.setdefault("sigma_data", pipe.sigma_data)
    plan = info.knobs(nfe)
    steps = plan.pop("steps")
    particles = plan.get("particles", 1)
    ts = GRID_FUNCTIONS["lam"](pipe.process, steps)
    device = pipe.device
    meas = Measurement(measurement.operator, measurement.y.to(device), measurement.sigma_y)
    x = pipe.process.prior_sample((n * particles, *pipe.shape), generator=generator, device=device)
    cond = {}
    lab = condition_labels(pipe, n, labels)
    if lab is not None:
        cond["class_labels"] = lab.repeat_interleave(particles).to(device)
    denoiser, _ = pipe.sampling_denoiser(precision)
    tick, bar = progress_callback(steps, f"{name} ({n} samples, {nfe} calls each)", disable=not progress)
    try:
        with torch.no_grad():
            out = info.fn(denoiser, pipe.process, x, ts, meas, generator=generator, callback=tick,
                          **plan, **knobs, **cond)  # fmt: skip
    finally:
        bar.close()
    return out.detach().cpu()
