"""One optimizer step: the global batch every rank draws alike, the scaled (accumulated, mixed-precision)
backward pass, and the learning rate of the step (see ``distributed`` for how the work is split)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..objectives import denoising  # looked up at call time, so a test can stand in for the loss
from .distributed import DistInfo

if TYPE_CHECKING:
    from .config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based: the update that completes step + 1).

    Warm-up: lr (step + 1) / warmup for step < warmup, so the first update already moves.
    Then "constant": lr; "cosine": lr (1 + cos(pi p)) / 2 with p = (step - warmup) / (steps - warmup).
    """
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "constant":
        return config.lr
    p = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


class Batch(NamedTuple):
    """This rank's share of one step, as ``grad_accum`` micro-batches (lists of equal length)."""

    idx: list[Tensor]  # (B,) example indices on the data's device
    t: list[Tensor]  # (B,) float64 diffusion times
    noise: list[Tensor]  # (B, ...) standard normal noise
    flip: list[Tensor | None]  # (B,) bool: mirror left-right, or None without flips
    drop: list[Tensor | None]  # (B,) bool: replace the class label by the null class, or None without label dropout
    u: list[Tensor | None]  # (B,) float64 uniforms that pick a distillation's pair of times, or None
    low_res: list[tuple[Tensor, Tensor] | None] | None = None  # (B,) uniforms, (B, C, h, w) noise: SR augmentation


class GlobalBatches:
    """The global batch of every step, drawn identically on all ranks and sliced for this one.

    Indices: a fresh random permutation per epoch (``order`` generator, on the CPU); times, noise, flips and
    label drops: from ``gen`` (the training generator, on the data's device), in that order, for all G examples.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, info: DistInfo, order: torch.Generator, gen):
        self.n, self.batch_size, self.grad_accum, self.info = n, batch_size, grad_accum, info
        self.global_size = batch_size * grad_accum * info.world_size
        self.order, self.gen = order, gen
        self.perm, self.pos = torch.empty(0, dtype=torch.long), 0

    def indices(self) -> Tensor:
        """The next G indices, epoch by epoch: (G,) int64 on the CPU."""
        parts, need = [], self.global_size
        while need:
            if self.pos == len(self.perm):
                self.perm, self.pos = torch.randperm(self.n, generator=self.order), 0
            part = self.perm[self.pos : self.pos + need]
            parts.append(part)
            self.pos, need = self.pos + len(part), need - len(part)
        return torch.cat(parts)

    def next(
        self,
        process,
        shape: tuple[int, ...],
        device,
        flip: bool,
        label_dropout: float = 0.0,
        uniforms: bool = False,
        low_res: tuple[int, ...] | None = None,
    ) -> Batch:
        G, B, A = self.global_size, self.batch_size, self.grad_accum
        idx = self.indices().to(device)
        t = denoising.sample_t(process, G, generator=self.gen, device=device)  # (G,)
        noise = torch.randn((G, *shape), generator=self.gen, device=device)  # (G, ...)
        flips = torch.rand(G, generator=self.gen, device=device) < 0.5 if flip else None  # data.random_flip's rule
        # Drawn last, and only when asked for, so that runs without label dropout keep their random stream.
        drops = torch.rand(G, generator=self.gen, device=device) < label_dropout if label_dropout > 0 else None
        u = torch.rand(G, generator=self.gen, device=device, dtype=torch.float64) if uniforms else None
        aug = None  # a super-resolution model's augmentation of its low-resolution input: level, then noise
        if low_res is not None:
            aug = (
                torch.rand(G, generator=self.gen, device=device),
                torch.randn((G, *low_res), generator=self.gen, device=device),
            )
        start = self.info.rank * A * B
        rows = [slice(start + k * B, start + (k + 1) * B) for k in range(A)]
        flip_rows = [None if flips is None else flips[r] for r in rows]
        drop_rows = [None if drops is None else drops[r] for r in rows]
        u_rows = [None if u is None else u[r] for r in rows]
        low_rows = None if aug is None else [(aug[0][r], aug[1][r]) for r in rows]
        return Batch(
            [idx[r] for r in rows], [t[r] for r in rows], [noise[r] for r in rows], flip_rows, drop_rows, u_rows,
            low_rows,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        # perm is replaced, never modified in place, so a reference is a valid snapshot.
        return {"perm": self.perm, "pos": self.pos, "generator": self.order.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])
        self.order.set_state(state["generator"])


def low_res_condition(x0: Tensor, factor: int, max_noise: float, u: Tensor, noise: Tensor) -> dict[str, Tensor]:
    """A super-resolution model's conditioning: ``low_res`` = avgpool_f(x0) + s n with the augmentation level s = u
    max_noise, and ``aug_level`` = s (Ho et al. 2022, "Cascaded Diffusion Models", Sec. 4.2: Gaussian conditioning
    augmentation of the low-resolution input, its level given to the model, so that at sampling it can be told how
    far the base model's images are from the data)."""
    s = u.to(x0.dtype) * max_noise
    low = F.avg_pool2d(x0, factor) + s.view(-1, 1, 1, 1) * noise.to(x0.dtype)
    return {"low_res": low, "aug_level": s}


class Autocast(nn.Module):
    """Run ``net`` under torch.autocast(dtype); its output comes back as float32, for a float32 loss."""

    def __init__(self, net: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.net, self.device_type, self.dtype = net, device_type, dtype

    def forward(self, *args, **kwargs) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.net(*args, **kwargs).float()


class ScaledStep:
    """The gradient of one optimizer step at scale: micro-batches, data-parallel ranks, mixed precision.

    ``model`` is what the loss calls: ``objective.wrap`` around the raw net (``Preconditioned``, its output
    preconditioned as TrainConfig.precondition_output says, or ``ConsistencyModel``), wrapped (inside out) in
    DistributedDataParallel
    when there are several ranks and in ``Autocast`` for bf16 / fp16. fp16 adds a ``GradScaler`` (loss scaling,
    Micikevicius et al. 2018): an inf gradient then skips the step and lowers the scale instead of stopping the run.
    """

    def __init__(
        self,
        net: nn.Module,
        opt,
        objective,
        *,
        dtype,
        info: DistInfo,
        device: torch.device,
        super_resolution: tuple[int, float] | None = None,
    ):
        self.opt, self.info, self.objective = opt, info, objective
        self.super_resolution = super_resolution  # (pooling factor, largest augmentation std)
        self.ddp = None
        if info.enabled:  # averages the gradients of the ranks during backward
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        inner = self.ddp or net
        inner = inner if dtype is None else Autocast(inner, device.type, dtype)
        self.model = objective.wrap(inner)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def backward(
        self, data: Tensor, labels: Tensor | None, batch: Batch, *, step: int = 0, null_label: int | None = None
    ) -> float:
        """Accumulate this rank's gradients (unscaled, averaged over ranks); return the global batch's mean loss.

        ``batch.drop``: examples whose class label is replaced by ``null_label`` (label dropout, Ho & Salimans 2022,
        Algorithm 1: one network learns the conditional and the unconditional model, for classifier-free guidance).
        """
        accum, total = len(batch.idx), torch.zeros((), device=data.device)
        for k in range(accum):
            x0 = data[batch.idx[k]]
            if batch.flip[k] is not None:
                x0 = torch.where(batch.flip[k].view(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
            cond = {}
            if labels is not None:
                lab = labels[batch.idx[k]]
                if batch.drop[k] is not None:
                    lab = torch.where(batch.drop[k], torch.full_like(lab, null_label), lab)
                cond = {"class_labels": lab}
            if self.super_resolution is not None:
                cond.update(low_res_condition(x0, *self.super_resolution, *batch.low_res[k]))
            last = k == accum - 1  # DDP averages the gradients once, in the last micro-batch's backward
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                loss = self.objective.loss(
                    self.model,
                    x0,
                    t=batch.t[k],
                    noise=batch.noise[k],
                    u=batch.u[k],
                    idx=batch.idx[k],
                    step=step,
                    **cond,
                )
                loss = loss.mean() / accum
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            total += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        return self.info.mean(total).item()

    def step(self) -> None:
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)  # skipped if a gradient is inf / nan
            self.scaler.update()
