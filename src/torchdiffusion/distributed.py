"""Training at scale: data-parallel processes (torchrun + DDP), gradient accumulation, mixed precision.

Launch one process per GPU (or several on the CPU, with the gloo backend); ``--standalone`` is one machine::

    torchrun --standalone --nproc_per_node 2 -m torchdiffusion.distributed --config configs/digits.yaml --run-dir runs/d
    python -m torchdiffusion.distributed --config configs/moons.yaml --run-dir runs/moons     # one process
    ... -m torchdiffusion.distributed --config c.yaml --run-dir r --resume --set steps=2000 --set net.dropout=0

``train.train`` joins the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): backend nccl with one GPU per process (``cuda:LOCAL_RANK``) on CUDA,
gloo on the CPU.

How the work is split, so that N processes compute what one process would (Goyal et al. 2017, Sec. 2.1):
every rank holds the whole data set and the same seeded generators, and each step draws the *global*
batch of G = batch_size * grad_accum * world_size example indices, diffusion times, noise and flips
(``GlobalBatches.next``). Rank r takes the contiguous slice ``[r A B, (r + 1) A B)``, and micro-batch k of
it the rows ``[k B, (k + 1) B)`` (B = batch_size, A = grad_accum). Each micro-batch's loss is its mean
divided by A, and DDP averages the gradients of the ranks, so the update is that of the mean loss over
the G examples: the same examples, times and noise as a single process with batch_size * grad_accum *
world_size, up to the order of floating-point sums (``ScaledStep.backward``). Drawing all G noise tensors
on every rank costs G examples' worth of memory, small next to the activations. Only rank 0 writes files
(log, checkpoints, sample grids, TensorBoard) and shows a progress bar. Dropout masks come from each rank's
own torch RNG (seeded per rank), so with dropout > 0 a run agrees with a single process in distribution
only; checkpoints keep every rank's RNG state, so a resumed run still equals an uninterrupted one.

Mixed precision (``Autocast``): the network runs under ``torch.autocast``, its output is cast back to
float32, and the loss, weights and optimizer stay float32; fp16 adds loss scaling.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import losses
from .parameterization import Preconditioned

__all__ = ["DistInfo", "process_group", "resolve_device", "GlobalBatches", "Batch", "ScaledStep", "main"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank in 0..world_size-1, and its GPU index on the node (LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, x: Tensor) -> Tensor:
        """The mean of ``x`` over the ranks (x itself in one process)."""
        if not self.enabled:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x / self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


@contextmanager
def process_group(device: str = "cpu") -> Iterator[DistInfo]:
    """The process group of this run: joined (and left at exit) when torchrun set WORLD_SIZE > 1.

    An already initialised default group (e.g. by the caller) is used as it is and left open. Without
    either, this is a single process: ``DistInfo(0, 1, 0)``.
    """
    if dist.is_available() and dist.is_initialized():
        yield DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
        return
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield DistInfo()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    info = DistInfo(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        resolve_device(device, info)  # a clear error before NCCL fails without CUDA
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", rank=info.rank, world_size=world)
    try:
        yield info
        # Rank 0 hosts the rendezvous store: had it torn the group down while another rank was still in its
        # last collective or its own teardown, that rank would abort ("terminate called without an active
        # exception", seen once in the torchrun test). Meet first; on an exception, tear down at once.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def resolve_device(name: str, info: DistInfo = DistInfo()) -> torch.device:
    """The torch device of this process: ``name`` ("cpu", "cuda", "cuda:1"), with ``cuda:LOCAL_RANK`` under torchrun.

    Raises ValueError, saying what to change, when CUDA is requested but not available or the index
    does not exist.
    """
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"invalid device {name!r} ({e}); valid examples: 'cpu', 'cuda', 'cuda:1'") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); use device: cpu, or install a CUDA build of torch"
        )
    if info.enabled:
        if device.index is not None:
            raise ValueError(f"device {name!r}: under torchrun each process uses cuda:LOCAL_RANK; set device: cuda")
        device = torch.device("cuda", info.local_rank)
    index, count = device.index or 0, torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {name!r} requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


class Batch(NamedTuple):
    """This rank's share of one step, as ``grad_accum`` micro-batches (lists of equal length)."""

    idx: list[Tensor]  # (B,) example indices on the data's device
    t: list[Tensor]  # (B,) float64 diffusion times
    noise: list[Tensor]  # (B, ...) standard normal noise
    flip: list[Tensor | None]  # (B,) bool: mirror left-right, or None without flips


class GlobalBatches:
    """The global batch of every step, drawn identically on all ranks and sliced for this one.

    Indices: a fresh random permutation per epoch (``order`` generator, on the CPU); times, noise and
    flips: from ``gen`` (the training generator, on the data's device), in that order, for all G examples.
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

    def next(self, process, shape: tuple[int, ...], device, flip: bool) -> Batch:
        G, B, A = self.global_size, self.batch_size, self.grad_accum
        idx = self.indices().to(device)
        t = losses.sample_t(process, G, generator=self.gen, device=device)  # (G,)
        noise = torch.randn((G, *shape), generator=self.gen, device=device)  # (G, ...)
        flips = torch.rand(G, generator=self.gen, device=device) < 0.5 if flip else None  # data.random_flip's rule
        start = self.info.rank * A * B
        rows = [slice(start + k * B, start + (k + 1) * B) for k in range(A)]
        flip_rows = [None if flips is None else flips[r] for r in rows]
        return Batch([idx[r] for r in rows], [t[r] for r in rows], [noise[r] for r in rows], flip_rows)

    def state_dict(self) -> dict[str, Any]:
        # perm is replaced, never modified in place, so a reference is a valid snapshot.
        return {"perm": self.perm, "pos": self.pos, "generator": self.order.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])
        self.order.set_state(state["generator"])


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

    ``model`` is what the loss calls: ``Preconditioned`` around the raw net (its output preconditioned for
    target ``predicts``, see TrainConfig.precondition_output), wrapped (inside out) in DistributedDataParallel
    when there are several ranks and in ``Autocast`` for bf16 / fp16. fp16 adds a ``GradScaler`` (loss scaling,
    Micikevicius et al. 2018): an inf gradient then skips the step and lowers the scale instead of stopping the run.
    """

    def __init__(
        self,
        net: nn.Module,
        opt,
        process,
        sigma_data: float,
        *,
        dtype,
        info: DistInfo,
        device: torch.device,
        predicts: str | None = None,
    ):
        self.opt, self.info, self.process = opt, info, process
        self.ddp = None
        if info.enabled:  # averages the gradients of the ranks during backward
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        inner = self.ddp or net
        inner = inner if dtype is None else Autocast(inner, device.type, dtype)
        self.model = Preconditioned(inner, process, sigma_data, predicts)
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def backward(self, data: Tensor, labels: Tensor | None, batch: Batch, *, target: str, weighting: str) -> float:
        """Accumulate this rank's gradients (unscaled, averaged over ranks); return the global batch's mean loss."""
        accum, total = len(batch.idx), torch.zeros((), device=data.device)
        for k in range(accum):
            x0 = data[batch.idx[k]]
            if batch.flip[k] is not None:
                x0 = torch.where(batch.flip[k].view(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
            cond = {"class_labels": labels[batch.idx[k]]} if labels is not None else {}
            last = k == accum - 1  # DDP averages the gradients once, in the last micro-batch's backward
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                loss = losses.denoising_loss(
                    self.model,
                    self.process,
                    x0,
                    target=target,
                    weighting=weighting,
                    t=batch.t[k],
                    noise=batch.noise[k],
                    sigma_data=self.model.sigma_data if self.model.predicts is not None else None,
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


def _override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value parsed as YAML: numbers, true/false, null, [lists], {dicts})."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. steps=2000 or net.channels=64), got {text!r}")
    return key.strip(), yaml.safe_load(value)


def main(argv: list[str] | None = None) -> None:
    """Command line: train from a YAML config, in one process or under torchrun (see the module docstring)."""
    from .train import TrainConfig, train

    parser = argparse.ArgumentParser(prog="python -m torchdiffusion.distributed", description=main.__doc__)
    parser.add_argument("--config", required=True, help="YAML file of TrainConfig fields (see configs/)")
    parser.add_argument("--run-dir", required=True, help="output folder: log.csv, checkpoint/, samples/")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE",
        help="override a config field; repeatable; dotted keys reach into net / process (net.channels=64)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        config = TrainConfig.from_yaml(args.config, **dict(args.overrides))
        result = train(config, args.run_dir, resume=args.resume, progress=not args.no_progress)
    except (
        ValueError,
        OSError,
        ImportError,
        FloatingPointError,
    ) as e:  # a bad config, path or run: say so, no traceback
        parser.exit(1, f"error: {e}\n")
    if int(os.environ.get("RANK", "0")) == 0 and result.history:
        last = result.history[-1]
        print(f"trained {last['step']} steps; final loss {last['loss']:.4g}; checkpoint in {result.run_dir}/checkpoint")


if __name__ == "__main__":
    from torchdiffusion.distributed import main as _main  # the package's copy of this module, not __main__'s

    _main()
