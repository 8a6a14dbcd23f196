"""Training the latent-diffusion autoencoder, its checkpoints, and the maps between images and scaled latents
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3, Sec. 4.3.2, App. G).

``train_autoencoder(AutoencoderConfig(...), run_dir)`` fits a ``nets.autoencoder.KLAutoencoder`` to images with
``objectives.autoencoder.autoencoder_loss`` (pixel reconstruction plus kl_weight x KL(q(z | x) || N(0, I)); no
perceptual or adversarial term, so it trains on a CPU) and Adam, and writes into ``run_dir``:

* ``log.csv``: step, loss, reconstruction, kl, lr, grad_norm, steps_per_s (means over each row's window);
* ``checkpoint/``: the layout of every model of the library (``training.checkpoint.save_checkpoint``: weights as
  safetensors, config.json, state.pt with the optimizer, RNG states and data order, written atomically), whose
  config.json holds ``"kind": "autoencoder"``, the config, the autoencoder's constructor arguments, the image and
  latent shapes, the latent scale factor and the reconstruction error measured on the training images.

The scale factor is the paper's (Sec. 4.3.2, App. G): 1 / (the standard deviation of latents z ~ q(z | x) of the
training images), so that a diffusion model sees latents of unit variance; it is measured at each checkpoint with a
generator seeded from the run (``measure``), so anyone can recompute it from the checkpoint. ``encode_dataset`` and
``decode_latents`` are the two maps latent diffusion needs: images -> scale_factor z, and z -> D(z / scale_factor).

A run stopped (an exception from ``callback``, or Ctrl-C) and resumed with ``resume=True`` ends with weights equal
bit for bit to an uninterrupted run's: initialisation, batch order, flips and the encoder's noise come from their
own seeded generators, saved with the checkpoint, and the caller's global RNG is left as it was.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import IMAGE_DATASETS, is_image_spec, load_images
from ..nets.autoencoder import KLAutoencoder
from ..objectives.autoencoder import RECONSTRUCTIONS, autoencoder_loss, latent_scale_factor
from .checkpoint import (
    CONFIG,
    EMA,
    FORMAT_VERSION,
    MODEL,
    STATE,
    CheckpointError,
    _load_weights,
    _locate,
    _read_state,
    find_checkpoint,
    remove_stale_temp_dirs,
    save_checkpoint,
)
from .ema import ema_decay_at, ema_update
from .logfile import read_log
from .step import lr_at

__all__ = [
    "AutoencoderConfig",
    "AutoencoderResult",
    "train_autoencoder",
    "load_autoencoder",
    "encode_dataset",
    "decode_latents",
    "measure",
    "parse_latent",
    "latent_factor",
    "KIND",
    "LOG_COLUMNS",
    "MEASURE_EXAMPLES",
    "ENCODE_BATCH",
]

KIND = "autoencoder"  # config.json's "kind": what tells an autoencoder run from a diffusion run
LOG_COLUMNS = ("step", "loss", "reconstruction", "kl", "lr", "grad_norm", "steps_per_s")
SCHEDULES = ("cosine", "constant")
MEASURE_EXAMPLES = 4096  # the scale factor and reconstruction error use at most this many training images
ENCODE_BATCH = 256  # images per batch of encode_dataset / decode_latents (and of measure)
_MAY_CHANGE_ON_RESUME = ("steps", "device", "checkpoint_every", "log_every")
_META_KEYS = ("step", "format_version")
# What train_autoencoder adds to config.json beside the config's own fields.
_RECORDED = ("kind", "autoencoder", "image_shape", "latent_shape", "scale_factor", "scale_seed",
             "reconstruction_error", "raw_weights", "measured_on")  # fmt: skip


def parse_latent(text: str) -> tuple[int, int, int]:
    """``"4x4x4"`` -> (4, 4, 4): the latent's channels x height x width, three positive integers joined by x."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"latent must be CxHxW, the latent's channels, height and width as three positive integers joined by "
            f"'x' (e.g. 4x4x4: 4 channels of 4 x 4), got {text!r}"
        )
    return shape


def latent_factor(image_shape, latent) -> int:
    """The downsampling factor f = H / h of square (C, H, H) images onto a (c, h, h) latent, checked: h must equal w
    and divide H with a power of 2 (the autoencoder halves the side once per level; Rombach et al. 2022, Sec. 3)."""
    C, H, W = image_shape
    c, h, w = latent
    sides = [H >> k for k in range(H.bit_length()) if H % (1 << k) == 0]  # H / 2^k, the sides that work
    hint = f"for {H} x {W} images the latent side can be {', '.join(map(str, sides))}"
    if H != W:
        raise ValueError(f"the autoencoder needs square images, got {C} x {H} x {W}")
    if h != w:
        raise ValueError(f"the latent must be square (h = w) for square images, got {c}x{h}x{w}; {hint}")
    f = H // h
    if H % h or f & (f - 1):
        raise ValueError(
            f"latent {c}x{h}x{w} does not fit the {H} x {W} images: the side {h} must be the image side divided by a "
            f"power of 2 (the downsampling factor f); {hint}"
        )
    return f


@dataclass(frozen=True)
class AutoencoderConfig:
    """Everything that determines an autoencoder run; JSON-able via ``to_dict`` / ``from_dict``.

    The defaults (16 x 16 digits -> 4 x 4 x 4 latents, f = 4, kl_weight 1e-6) follow the paper's ``kl-f4``
    configuration (Rombach et al. 2022, App. G; their configs/autoencoder) at a CPU's size. The optimizer is Adam
    with torch's default betas (0.9, 0.999): the paper's (0.5, 0.9) serve its adversarial term, absent here.
    """

    data: str = "digits16"  # images: a name of data.IMAGE_DATASETS, an image folder, .npz, IDX or CIFAR-10 folder
    data_options: dict = field(default_factory=dict)  # keywords of data.load_images, e.g. {"size": 32} (a folder)
    latent: tuple = (4, 4, 4)  # (channels, height, width) of z; "4x4x4" is accepted
    channels: int = 32  # the autoencoder's base width (KLAutoencoder's channels)
    num_res_blocks: int = 1  # ResBlocks per level of the encoder (one more in the decoder)
    attention: bool = True  # self-attention in the middle blocks
    kl_weight: float = 1e-6  # weight of KL(q(z | x) || N(0, I)) against the summed pixel error (the paper's 1e-6)
    reconstruction: str = "l1"  # pixel error: "l1" (the paper's, without LPIPS) or "l2"
    steps: int = 2000  # optimizer steps
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # peak Adam learning rate
    warmup: int = 100  # linear warm-up steps (Goyal et al. 2017)
    lr_schedule: str = "cosine"  # after warm-up: "cosine" (to 0) or "constant" (training.step.lr_at)
    ema_decay: float | None = None  # EMA of the weights (training.ema); None: no EMA, the EMA file holds the weights
    flip: bool = False  # random left-right flips of the batches
    seed: int = 0  # seeds initialisation, batch order, flips, the encoder's noise and the measurements
    checkpoint_every: int = 500  # steps between checkpoints (one more at the end)
    log_every: int = 50  # steps between rows of log.csv
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"

    def __post_init__(self):
        if isinstance(self.data, os.PathLike):
            object.__setattr__(self, "data", os.fspath(self.data))
        latent = parse_latent(self.latent) if isinstance(self.latent, str) else self.latent
        if isinstance(latent, list | tuple) and len(latent) == 3 and all(_is_int(v) and v >= 1 for v in latent):
            object.__setattr__(self, "latent", tuple(int(v) for v in latent))
        else:
            raise ValueError(
                f"invalid AutoencoderConfig value: latent={self.latent!r}; expected (channels, height, width), three "
                "positive integers, or the string CxHxW (e.g. 4x4x4)"
            )
        num = (int, float)
        checks = {
            "data": isinstance(self.data, str),
            "data_options": isinstance(self.data_options, dict),
            "channels": _is_int(self.channels) and self.channels >= 1,
            "num_res_blocks": _is_int(self.num_res_blocks) and self.num_res_blocks >= 1,
            "kl_weight": _is_num(self.kl_weight) and math.isfinite(self.kl_weight) and self.kl_weight >= 0,
            "steps": _is_int(self.steps) and self.steps >= 1,
            "batch_size": _is_int(self.batch_size) and self.batch_size >= 1,
            "lr": _is_num(self.lr) and math.isfinite(self.lr) and self.lr > 0,
            "warmup": _is_int(self.warmup) and self.warmup >= 0,
            "ema_decay": self.ema_decay is None or (isinstance(self.ema_decay, num) and 0 <= self.ema_decay <= 1),
            "seed": _is_int(self.seed),
            "checkpoint_every": _is_int(self.checkpoint_every) and self.checkpoint_every >= 1,
            "log_every": _is_int(self.log_every) and self.log_every >= 1,
            "device": isinstance(self.device, str),
            **{k: isinstance(getattr(self, k), bool) for k in ("attention", "flip")},
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if self.reconstruction not in RECONSTRUCTIONS:
            bad.append(f"reconstruction={self.reconstruction!r} (choices: {', '.join(RECONSTRUCTIONS)})")
        if self.lr_schedule not in SCHEDULES:
            bad.append(f"lr_schedule={self.lr_schedule!r} (choices: {', '.join(SCHEDULES)})")
        if bad:
            raise ValueError(f"invalid AutoencoderConfig value(s): {', '.join(bad)}")

    def to_dict(self) -> dict[str, Any]:
        d = copy.deepcopy(asdict(self))
        d["latent"] = list(self.latent)  # as JSON stores it, so a stored and a given config compare equal
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "") -> AutoencoderConfig:
        """Inverse of ``to_dict``; also accepts a checkpoint's config.json (ignoring what training recorded)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - set(_META_KEYS) - set(_RECORDED))
        if unknown:
            raise ValueError(f"{source}unknown AutoencoderConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# -- images <-> scaled latents ------------------------------------------------------------------------------------
def _first_tensor(model: nn.Module) -> Tensor | None:
    """A parameter (else a buffer) of ``model``: where and in what dtype it computes."""
    return next(itertools.chain(model.parameters(), model.buffers()), None)


def _check_scale(scale_factor) -> float:
    if not (_is_num(scale_factor) and math.isfinite(scale_factor) and scale_factor > 0):
        raise ValueError(f"scale_factor must be a finite number > 0, got {scale_factor!r}")
    return float(scale_factor)


def _check_batch(batch_size) -> int:
    if not (_is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


@torch.no_grad()
def encode_dataset(
    autoencoder: nn.Module,
    images: Tensor,
    scale_factor: float,
    *,
    batch_size: int = ENCODE_BATCH,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The scaled latents scale_factor * z of ``images`` (N, C, H, W), batch by batch, without autograd.

    z is the mean of q(z | x) (``sample=False``), or one draw z = mean + exp(logvar / 2) n with n from
    ``generator`` on the model's device (``sample=True``: what the paper's diffusion model trains on, its
    ``get_first_stage_encoding``; Rombach et al. 2022, Sec. 4.3.2). A ``LinearAutoencoder`` (z = P^T (x - mu)) has a
    point-mass q(z | x), so ``sample`` draws nothing for it. The images run in the model's dtype and device; the
    latents come back on the images' device.
    """
    scale_factor, batch_size = _check_scale(scale_factor), _check_batch(batch_size)
    out = [(scale_factor * z).to(images.device) for z, _ in _encode(autoencoder, images, batch_size, sample, generator)]
    return torch.cat(out)


def _encode(autoencoder: nn.Module, images: Tensor, batch_size: int, sample: bool, generator):
    """Per batch of ``images``: (z, mean), z a draw of q(z | x) (``sample``, the reparameterization z = mean +
    exp(logvar / 2) n of Kingma & Welling 2014, Sec. 2.4) or its mean; the model's device and dtype."""
    if len(images) == 0:
        raise ValueError("images holds no examples (N = 0)")
    ref = _first_tensor(autoencoder)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        if ref is not None:
            x = x.to(ref.device, ref.dtype if isinstance(autoencoder, KLAutoencoder) else x.dtype)
        enc = autoencoder.encode(x)
        if not isinstance(enc, tuple):  # a deterministic encoder (LinearAutoencoder): q(z | x) is a point mass
            yield enc, enc
            continue
        mean, logvar = enc
        if sample:
            n = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            yield mean + torch.exp(0.5 * logvar) * n, mean
        else:
            yield mean, mean


@torch.no_grad()
def decode_latents(autoencoder: nn.Module, z: Tensor, scale_factor: float, *, batch_size: int = ENCODE_BATCH) -> Tensor:
    """Images D(z / scale_factor) of scaled latents ``z`` (N, c, h, w), batch by batch, without autograd: the inverse
    of ``encode_dataset``'s scaling, the last step of latent diffusion's sampling (Rombach et al. 2022, Sec. 3).
    The result is on ``z``'s device."""
    scale_factor, batch_size = _check_scale(scale_factor), _check_batch(batch_size)
    ref = _first_tensor(autoencoder)
    out = []
    for start in range(0, len(z), batch_size):
        b = z[start : start + batch_size] / scale_factor
        if ref is not None:
            b = b.to(ref.device, ref.dtype if isinstance(autoencoder, KLAutoencoder) else b.dtype)
        out.append(autoencoder.decode(b).to(z.device))
    if not out:
        raise ValueError("z holds no latents (N = 0)")
    return torch.cat(out)


@torch.no_grad()
def measure(autoencoder: KLAutoencoder, images: Tensor, seed: int) -> dict[str, Any]:
    """The latent scale factor and the reconstruction error of ``autoencoder`` on ``images``, as recorded in a
    checkpoint.

    * ``scale_factor``: ``latent_scale_factor`` of draws z ~ q(z | x), n from ``torch.Generator(device)
      .manual_seed(seed)``, ``ENCODE_BATCH`` images at a time (Rombach et al. 2022, Sec. 4.3.2: 1 / std of the
      first stage's encodings). Recompute it as ``latent_scale_factor(encode_dataset(ae, images, 1.0,
      sample=True, generator=...))``.
    * ``reconstruction_error``: per pixel, in the images' units, of D(mean of q(z | x)) against x: "mae" (mean
      |error|), "mse" (mean error^2) and "psnr" in dB for a peak-to-peak range of 2 (images in [-1, 1]):
      10 log10(2^2 / mse).
    """
    gen = torch.Generator(_first_tensor(autoencoder).device).manual_seed(seed)
    draws, abs_err, sq_err, start = [], 0.0, 0.0, 0
    for z, mean in _encode(autoencoder, images, ENCODE_BATCH, True, gen):  # one encoder pass for both
        draws.append(z)
        x = images[start : start + len(z)]
        err = autoencoder.decode(mean).to(x.device).double() - x.double()
        abs_err, sq_err, start = abs_err + float(err.abs().sum()), sq_err + float((err**2).sum()), start + len(z)
    mse = sq_err / images.numel()
    psnr = 10 * math.log10(4.0 / mse) if mse > 0 else None  # None: a perfect reconstruction (JSON has no inf)
    return {
        "scale_factor": latent_scale_factor(torch.cat(draws)),
        "reconstruction_error": {"mae": abs_err / images.numel(), "mse": mse, "psnr": psnr},
    }


def _measure_subset(n: int, seed: int) -> Tensor | None:
    """Which training images ``measure`` uses: all (None) when n <= MEASURE_EXAMPLES, else a fixed random subset."""
    if n <= MEASURE_EXAMPLES:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:MEASURE_EXAMPLES].sort().values


# -- training ---------------------------------------------------------------------------------------------------
@dataclass
class AutoencoderResult:
    autoencoder: KLAutoencoder  # the raw weights (eval mode)
    ema: KLAutoencoder  # the weights to use (the EMA; equal to the raw ones without ema_decay)
    config: dict[str, Any]  # what config.json holds: the config, shapes, scale_factor, reconstruction_error
    history: list[dict[str, float]]  # the rows of log.csv
    run_dir: Path

    @property
    def scale_factor(self) -> float:
        return float(self.config["scale_factor"])


def load_training_images(config: AutoencoderConfig) -> Tensor:
    """The run's images (N, C, H, H) as ``data.load_images`` gives them (labels dropped), with clear errors."""
    if not is_image_spec(config.data):
        raise ValueError(
            f"an autoencoder trains on images; {config.data!r} is not one: give a built-in image set "
            f"({', '.join(IMAGE_DATASETS)}), an image folder (with data_options size), .npz, IDX file or CIFAR-10 "
            "folder"
        )
    images, _ = load_images(config.data, **config.data_options)
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"data {config.data!r}: expected square images (N, C, H, H), got {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError(f"data {config.data!r} holds {len(images)} image(s); need at least 2")
    return images


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available; use device='cpu'")
    return device


def train_autoencoder(
    config: AutoencoderConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> AutoencoderResult:
    """Train a ``KLAutoencoder`` as ``config`` says (Rombach et al. 2022, Sec. 3, App. G: the pixel reconstruction
    error plus ``kl_weight`` x KL(q(z | x) || N(0, I)), no perceptual or adversarial term), with Adam, writing
    log.csv and checkpoints into ``run_dir``.

    Each checkpoint's config.json records, beside the config: "kind": "autoencoder", "autoencoder" (the
    constructor arguments: ``KLAutoencoder(**c)`` rebuilds it), "image_shape", "latent_shape", "scale_factor" and
    "reconstruction_error" of the weights ``load_autoencoder`` returns by default (the EMA; ``measure`` on the
    training images, at most ``MEASURE_EXAMPLES`` of them, with the seed "scale_seed"), and with an EMA the same
    two for the raw weights ("raw_weights").

    Args:
        config: the run's ``AutoencoderConfig``.
        run_dir: output folder; without ``resume`` it must not hold a run.
        resume: continue from ``run_dir``'s checkpoint up to ``config.steps``; the config must equal the stored one
            except for steps, device, checkpoint_every and log_every.
        progress: show a tqdm bar.
        callback: ``callback(step, {"loss", "reconstruction", "kl", "lr", "grad_norm"})`` after each step and its
            log row / checkpoint; it may raise to stop. Ctrl-C saves a checkpoint of the last completed step.
    Raises:
        FileExistsError: ``run_dir`` holds a run and ``resume`` is False.
        ValueError: data that are not square images, a latent that does not fit them, a different config on resume;
            ``CheckpointError`` for a bad checkpoint.
        FloatingPointError: a non-finite loss or gradient at a named step (the weights are not updated with it).
    """
    run_dir, device = Path(run_dir), _device(config.device)
    log_path, existing = run_dir / "log.csv", find_checkpoint(run_dir)
    if not resume and (existing is not None or log_path.exists()):
        raise FileExistsError(
            f"{run_dir} already holds a training run ({existing or log_path}); pass resume=True (--resume on the "
            "command line) to continue it, or choose another directory"
        )
    images = load_training_images(config)
    image_shape = tuple(images.shape[1:])
    factor = latent_factor(image_shape, config.latent)
    seeds = torch.randint(0, 2**62, (4,), generator=torch.Generator().manual_seed(config.seed)).tolist()
    ae_config = dict(in_channels=image_shape[0], image_size=image_shape[1], latent_channels=config.latent[0],
                     factor=factor, channels=config.channels, num_res_blocks=config.num_res_blocks,
                     attention=config.attention)  # fmt: skip
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        stored = _read_run(existing) if existing is not None and resume else None
        torch.manual_seed(seeds[1])
        net = KLAutoencoder(**ae_config)
        ema = copy.deepcopy(net)
        if stored is not None:
            _check_resume(run_dir, stored, config, net.config)
            _load_weights(net, stored[1] / MODEL)
            _load_weights(ema, stored[1] / EMA)
        run = _Run(config, run_dir, net.to(device), ema.to(device), images.to(device), seeds, stored)
        run.measure_on = _measure_subset(len(images), seeds[0])
        run.recorded = {"kind": KIND, "autoencoder": net.config, "image_shape": list(image_shape),
                        "latent_shape": list(net.latent_shape), "scale_seed": seeds[0]}  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(run_dir)
        if progress:
            tqdm.write(
                f"KLAutoencoder: {net.num_parameters():,} parameters; {len(images):,} images {image_shape} -> "
                f"latents {tuple(net.latent_shape)} (f = {factor})"
            )
        return run.loop(progress, callback)


def _check_resume(run_dir: Path, stored, config: AutoencoderConfig, ae_config: dict) -> None:
    meta, given = stored[0], config.to_dict()
    diff = sorted(k for k in set(given) - set(_MAY_CHANGE_ON_RESUME) if meta.get(k) != given[k])
    if diff:
        detail = "; ".join(f"{k}: {meta.get(k)!r} -> {given.get(k)!r}" for k in diff)
        raise ValueError(
            f"cannot resume {run_dir}: the config differs from the checkpoint's in {diff} ({detail}); only "
            f"{', '.join(_MAY_CHANGE_ON_RESUME)} may change when resuming"
        )
    if meta.get("autoencoder") != ae_config:
        raise ValueError(
            f"cannot resume {run_dir}: its autoencoder {meta.get('autoencoder')} differs from this config's "
            f"{ae_config} (the data changed shape?)"
        )
    if int(meta["step"]) > config.steps:
        raise ValueError(f"cannot resume {run_dir}: the checkpoint is at step {meta['step']} > steps={config.steps}")


class _Run:
    """The state of a run between steps, and the steps themselves."""

    def __init__(self, cfg: AutoencoderConfig, run_dir: Path, net, ema, images, seeds, stored):
        self.cfg, self.run_dir, self.net, self.ema, self.images = cfg, run_dir, net, ema, images
        self.device = images.device
        self.ema.requires_grad_(False)
        self.opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        self.gen = torch.Generator(self.device).manual_seed(seeds[3])  # flips and the encoder's noise
        self.order = torch.Generator().manual_seed(seeds[2])  # the batch order
        self.perm, self.pos = torch.empty(0, dtype=torch.long), 0
        self.step = self.saved = 0
        self.window: list[dict[str, float]] = []
        if stored is not None:
            meta, path = stored
            state = _read_state(path / STATE)
            try:
                self.step = self.saved = int(meta["step"])
                self.opt.load_state_dict(state["optimizer"])
                self.perm, self.pos = state["data_order"]["perm"], int(state["data_order"]["pos"])
                self.order.set_state(state["data_order"]["generator"])
                self._set_rng(state["rng"])
                self.window = list(state["log_window"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{path / STATE}: not an autoencoder run's training state ({e})") from None
        self.history = read_log(run_dir / "log.csv", self.step, LOG_COLUMNS)

    def _rng(self) -> dict[str, Any]:
        rng = {"noise": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_rng(self, rng: dict[str, Any]) -> None:
        self.gen.set_state(rng["noise"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _indices(self) -> Tensor:
        """The next batch's indices: a fresh random permutation per epoch, from the ``order`` generator."""
        parts, need = [], self.cfg.batch_size
        while need:
            if self.pos == len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.images), generator=self.order), 0
            part = self.perm[self.pos : self.pos + need]
            parts.append(part)
            self.pos, need = self.pos + len(part), need - len(part)
        return torch.cat(parts).to(self.device)

    def update(self) -> dict[str, float]:
        """One Adam step. Raises before touching the weights if the loss or the gradient is not finite."""
        cfg = self.cfg
        self.net.train()
        lr, rng, order = lr_at(self.step, cfg), self._rng(), (self.perm, self.pos, self.order.get_state())
        try:
            x = self.images[self._indices()]
            if cfg.flip:  # data.random_flip's rule, drawn before the encoder's noise
                flip = torch.rand(len(x), generator=self.gen, device=self.device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            recon, mean, logvar = self.net(x, generator=self.gen)
            loss, parts = autoencoder_loss(recon, x, mean, logvar, cfg.kl_weight, cfg.reconstruction)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), math.inf).item()  # measures only
        except KeyboardInterrupt:  # the step was not taken: undo its draws so that a resume redoes them
            self._set_rng(rng)
            self.perm, self.pos = order[0], order[1]
            self.order.set_state(order[2])
            raise
        info = {"loss": loss.item(), "reconstruction": parts["reconstruction"].item(), "kl": parts["kl"].item(),
                "lr": lr, "grad_norm": grad_norm}  # fmt: skip
        if not (math.isfinite(info["loss"]) and math.isfinite(grad_norm)):
            raise FloatingPointError(
                f"non-finite loss {info['loss']} / grad norm {grad_norm} at step {self.step + 1}; the weights were "
                "not updated and no checkpoint is written of them. Try a lower lr, or check the data"
            )
        self.updating = True  # from here to the end the weights, EMA and step change together
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        if cfg.ema_decay is not None:
            ema_update(self.ema, self.net, ema_decay_at(self.step, cfg.ema_decay))
        self.step += 1
        self.updating = False
        return info

    def measurements(self) -> dict[str, Any]:
        """What config.json records of the current weights: ``measure`` of the EMA (and of the raw weights)."""
        if self.cfg.ema_decay is None:
            self.ema.load_state_dict(self.net.state_dict())  # the EMA file holds the weights themselves
        images = self.images if self.measure_on is None else self.images[self.measure_on.to(self.device)]
        seed = self.recorded["scale_seed"]
        self.ema.eval()
        out = {**measure(self.ema, images, seed), "measured_on": len(images)}
        if self.cfg.ema_decay is not None:
            was = self.net.training
            out["raw_weights"] = measure(self.net.eval(), images, seed)
            self.net.train(was)
        return out

    def save(self) -> None:
        self.last = {**self.recorded, **self.measurements()}
        state = {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "rng": self._rng(),
            "data_order": {"perm": self.perm, "pos": self.pos, "generator": self.order.get_state()},
            "log_window": self.window,
        }
        config = {**self.cfg.to_dict(), **self.last}
        save_checkpoint(self.run_dir, net=self.net, ema_net=self.ema, config=config, state=state)
        self.saved = self.step

    def _log_row(self, seconds: float) -> dict[str, float]:
        n = len(self.window)
        mean = {k: sum(w[k] for w in self.window) / n for k in ("loss", "reconstruction", "kl", "grad_norm")}
        return {"step": self.step, **mean, "lr": self.window[-1]["lr"], "steps_per_s": n / max(seconds, 1e-9)}

    def loop(self, progress: bool, callback) -> AutoencoderResult:
        cfg, log_path = self.cfg, self.run_dir / "log.csv"
        t0, smooth, self.updating = time.perf_counter(), None, False
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        try:
            with open(log_path, "a", newline="") as fh:
                writer = csv.DictWriter(fh, LOG_COLUMNS)
                while self.step < cfg.steps:
                    info = self.update()
                    self.window.append(info)
                    smooth = info["loss"] if smooth is None else 0.98 * smooth + 0.02 * info["loss"]
                    bar.update()
                    bar.set_postfix(loss=f"{smooth:.4g}", refresh=False)
                    end = self.step == cfg.steps
                    if self.step % cfg.log_every == 0 or end:
                        row = self._log_row(time.perf_counter() - t0)
                        writer.writerow(row)
                        fh.flush()
                        self.history.append(row)
                        self.window, t0 = [], time.perf_counter()
                    if self.step % cfg.checkpoint_every == 0 or end:
                        started = time.perf_counter()
                        self.save()
                        t0 += time.perf_counter() - started  # measuring and saving do not count against steps/s
                    if callback is not None:
                        callback(self.step, info)
        except KeyboardInterrupt:
            if not self.updating and self.step != self.saved:  # not if the weights were half updated
                self.save()
            raise
        finally:
            bar.close()
        if not hasattr(self, "last"):  # resumed at the last step: nothing was saved, the checkpoint stands
            self.last = {**self.recorded, **self.measurements()}
        self.net.eval()
        self.ema.eval()
        config = {**self.cfg.to_dict(), **self.last, "step": self.step}
        return AutoencoderResult(self.net, self.ema, config, self.history, self.run_dir)


# -- loading ----------------------------------------------------------------------------------------------------
def _read_run(path: Path) -> tuple[dict[str, Any], Path]:
    """(config.json of an autoencoder checkpoint, its folder), or CheckpointError naming the file and the problem."""
    ckpt = _locate(Path(path))
    file = ckpt / CONFIG
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable JSON, the file may be truncated or corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format_version {meta.get('format_version')!r} is not supported (this torchdiffusion "
            f"reads version {FORMAT_VERSION})"
        )
    if meta.get("kind") != KIND:
        if "process" in meta and "net" in meta:
            net = meta["net"].get("name") if isinstance(meta["net"], dict) else meta["net"]
            raise CheckpointError(
                f"{file}: this is a diffusion run (objective {meta.get('objective', 'denoising')!r}, net {net!r}), "
                f"not an autoencoder; give the folder of a train-autoencoder run"
            )
        raise CheckpointError(f"{file}: not an autoencoder checkpoint (its kind is {meta.get('kind')!r}, not {KIND!r})")
    missing = [k for k in ("autoencoder", "scale_factor", "step", "latent_shape", "image_shape") if k not in meta]
    if missing:
        raise CheckpointError(f"{file}: the autoencoder checkpoint's config lacks {missing}")
    return meta, ckpt


def load_autoencoder(
    run_dir: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[KLAutoencoder, dict[str, Any]]:
    """``(autoencoder, config)`` of a ``train_autoencoder`` run (its folder or its checkpoint folder): the
    ``KLAutoencoder`` rebuilt from config.json with the EMA (``ema=True``) or raw weights, frozen and in eval mode;
    ``config`` is config.json, whose "scale_factor" and "reconstruction_error" are those of the weights returned.

    Use with ``encode_dataset(ae, images, config["scale_factor"])`` and ``decode_latents``. Raises
    ``CheckpointError`` naming the file and the problem when the checkpoint is missing, incomplete or corrupt, or
    is not an autoencoder's (a diffusion run, say).
    """
    meta, ckpt = _read_run(Path(run_dir))
    try:
        with torch.random.fork_rng(devices=[]):  # the random initialisation, overwritten, leaves the caller's RNG
            ae = KLAutoencoder(**meta["autoencoder"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt / CONFIG}: cannot rebuild the autoencoder from {meta['autoencoder']}: {e}"
        ) from None
    _load_weights(ae, ckpt / (EMA if ema else MODEL))
    config = dict(meta)
    if not ema and "raw_weights" in meta:
        config.update(meta["raw_weights"])
    return ae.to(device).eval().requires_grad_(False), config
