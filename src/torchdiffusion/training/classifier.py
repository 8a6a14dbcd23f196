"""Training a noise-conditional classifier for classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1), and its files.

The classifier learns p_t(c | x_t) on the same noised data as the diffusion model: x_t = alpha x0 + sigma eps at
training times t of the process, cross-entropy against the label of x0. ``guidance.classifier_guidance`` then adds
s grad log p_t(c | x_t) to the score of an unconditional model. A run folder holds ``classifier.safetensors``
(weights) and ``classifier.json`` (process and net specs, sigma_data, num_classes, steps), each written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save_file as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm

from ..core.process import NoiseProcess
from ..guidance.classifier import NoiseConditionalClassifier
from ..names import build_net, build_process
from ..objectives import denoising
from ..utils.io import atomic_write

__all__ = ["train_classifier", "save_classifier", "load_classifier", "image_classifier_spec", "WEIGHTS", "CONFIG"]

WEIGHTS, CONFIG = "classifier.safetensors", "classifier.json"


def image_classifier_spec(
    in_channels: int, image_size: int, num_classes: int, *, channels: int = 32, num_res_blocks: int = 1
) -> dict[str, Any]:
    """A ``unet_classifier`` net spec (``nets.UNetClassifier``) for (C, H, H) images and K classes.

    Levels halve the image down to about 4 pixels (16 -> 16, 8, 4; 32 -> 32, 16, 8, 4; at most four levels, each
    size a whole number of pixels), with widths channels * (1, 2, 2, 2) as the U-Net's; attention only at the
    middle block (the coarsest level), where it is cheap.
    """
    levels, side = 1, image_size
    while levels < 4 and side % 2 == 0 and side // 2 >= 4:
        side, levels = side // 2, levels + 1
    return {"name": "unet_classifier", "in_channels": in_channels, "image_size": image_size, "out_dim": num_classes,
            "channels": channels, "channel_mult": [1, 2, 2, 2][:levels], "num_res_blocks": num_res_blocks}  # fmt: skip


def train_classifier(
    net,
    process: NoiseProcess,
    data: Tensor,
    labels: Tensor,
    *,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 2e-3,
    sigma_data: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> NoiseConditionalClassifier:
    """Fit ``net`` ((c_in x, c_noise) -> K logits) to p_t(c | x_t) by minimising E_t E_{x0, c, eps}[-log p(c | x_t)].

    ``data`` are points (N, D) for an MLP or images (N, C, H, W) for a ``UNetClassifier``; ``labels`` (N,) in 0..K-1.

    Times come from ``process.train_t`` (``objectives.sample_t``), as the diffusion model's do; AdamW with a cosine
    decay of the rate; examples, times and noise only from ``generator``. Returns the classifier in eval mode with
    frozen weights (it is for guidance, which differentiates it in x only).
    """
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"{data.shape[0]} examples but {labels.shape[0]} labels")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    sd = float(data.double().std()) if sigma_data is None else float(sigma_data)
    clf = NoiseConditionalClassifier(net, process, sd).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    labels = labels.long()
    bar = tqdm(range(steps), desc="classifier", disable=not progress, dynamic_ncols=True, leave=False)
    for _ in bar:
        idx = torch.randint(0, len(data), (batch_size,), generator=generator, device=data.device)
        x0, c = data[idx], labels[idx]
        t = denoising.sample_t(process, batch_size, generator=generator, device=data.device)
        xt = process.perturb(x0, t, torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype))
        loss = F.cross_entropy(clf(xt, t.to(x0.dtype)), c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return clf.eval().requires_grad_(False)


def save_classifier(run_dir: str | os.PathLike, clf: NoiseConditionalClassifier, config: dict[str, Any]) -> Path:
    """Write the weights and ``config`` (JSON-able: "process" and "net" specs, "num_classes", ...) into ``run_dir``."""
    run_dir = Path(run_dir)
    weights = {k: v.detach().contiguous().cpu() for k, v in clf.net.state_dict().items()}
    atomic_write(run_dir / WEIGHTS, lambda p: save_safetensors(weights, str(p)))
    text = json.dumps({**config, "sigma_data": clf.sigma_data}, indent=2)
    atomic_write(run_dir / CONFIG, lambda p: p.write_text(text, encoding="utf-8"))
    return run_dir


def load_classifier(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> NoiseConditionalClassifier:
    """The classifier of a ``train-classifier`` run, in eval mode with frozen weights."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file() or not (run_dir / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no classifier ({CONFIG} and {WEIGHTS}); train one with train-classifier"
        )
    try:
        config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
        net, process = build_net(config["net"]), build_process(config["process"])
        net.load_state_dict(load_file(str(run_dir / WEIGHTS)))
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"{run_dir}: not a readable classifier run ({e})") from None
    clf = NoiseConditionalClassifier(net.to(device), process, float(config["sigma_data"]))
    clf.config = config
    return clf.eval().requires_grad_(False)
