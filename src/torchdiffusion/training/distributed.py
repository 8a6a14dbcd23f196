"""Training at scale: data-parallel processes (torchrun + DDP), gradient accumulation, mixed precision.

Launch one process per GPU (or several on the CPU, with the gloo backend) with the ``train`` command;
``--standalone`` is one machine::

    torchrun --standalone --nproc_per_node 2 -m torchdiffusion train --config configs/digits.yaml --out runs/d
    ... -m torchdiffusion train --config c.yaml --out r --resume --set steps=2000 --set net.dropout=0

``training.loop.train`` joins the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
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

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..names import PRECISIONS

__all__ = ["DistInfo", "process_group", "resolve_device", "native_bf16", "resolve_precision", "unet_layout"]


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


if __name__ == "__main__":
    from torchdiffusion.training.distributed import main as _main

    _main()


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as fh:
            return set(next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), []))
    except OSError:
        return set()


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast can outrun float32 on ``device``: CUDA with bf16 support (compute capability 8.0+),
    or a CPU with AMX-BF16 (Intel Sapphire Rapids and later), whose tile units oneDNN's bf16 convolutions use. With
    AVX512_BF16 alone (no AMX) bf16 was slower than float32 here: the digits U-Net trained at 737 against 936
    images/s (oneDNN limited to AVX512_CORE_BF16, 1 thread)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and "amx_bf16" in _cpu_flags()


def resolve_precision(precision: str, device: torch.device, net: str) -> str:
    """The precision a run (training or sampling) uses: ``precision`` itself, or for "auto" bf16 autocast where it
    was measured to win at no loss of quality, and fp32 otherwise (``benchmarks/bench_unet.py --levers``,
    ``bench_unet_quality.py``; README, "U-Net speed"). bf16 where: the U-Net (``net`` "unet"; the MLPs of 2-D data
    are dominated by per-operation overhead that bf16 does not reduce) on CUDA with bf16, or on a CPU with AMX. On
    the 2-core AMX Xeon, against diffusers' float32: training 1.3-1.7x (digits, CIFAR-size) at two threads and
    1.4-2.0x at one; sampling 1.25-2.2x and 1.4-2.25x, with the digits model's FID within seed noise. On a CPU that
    other jobs keep busy, bf16 training at two threads ran 1.3-2.2x slower than float32 (threads preempted inside
    the AMX convolutions); one thread (``--threads 1``) was fastest there, in bf16."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose auto or one of {', '.join(PRECISIONS)}")
        return precision
    return "bf16" if net == "unet" and native_bf16(device) else "fp32"


def unet_layout(precision: str, device: torch.device) -> torch.memory_format | None:
    """The activation layout for the U-Net: None (the net's own choice, channels-last with >= 2 channels per
    GroupNorm group) except under bf16 autocast on the CPU, where it is NCHW: PyTorch's channels-last GroupNorm
    backward in bfloat16 is 5-10x slower than in NCHW (torch 2.13), more than oneDNN's channels-last
    convolutions gain."""
    return torch.contiguous_format if precision == "bf16" and device.type == "cpu" else None
