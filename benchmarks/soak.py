"""Soak: many sampling calls in one process must not grow its memory (issue #15, item 3).

A service that loads a model once and samples from it for days must stay at a constant resident set size: a
cache keyed by something that changes per call, an autograd graph kept alive, tensors appended to a list, would
each add a little per call. This trains a tiny 2-D run (an MLP on moons; its size does not matter here) unless
``--run`` names one, loads it with ``td.load`` and calls ``Pipeline.sample`` ``--calls`` times, cycling over
deterministic and stochastic samplers and grids, with a fresh generator per call. The resident set size
(``psutil`` if installed, else ``/proc/self/statm``) is recorded every ``--every`` calls.

Growth is measured after a warm-up (the first ``--warmup`` calls: allocator pools, lazily built kernels, the
first use of each sampler), as the least-squares slope of RSS over calls and the change from the end of the warm-up to
the last record. Linux (``/proc``) or psutil; 1 thread.

Run: ``python benchmarks/soak.py [--calls 10000] [--every 500] [--out docs/bench/soak.md]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# A mix of families: an ODE solver with a final denoise, DDIM, a multistep solver, an SDE solver, DDPM.
SAMPLERS = ("unipc_3", "ddim", "dpmpp_2m", "heun", "dpmpp_2m_sde", "ddpm", "euler")


def rss_mib() -> float:
    """This process's resident set size now, in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def train_tiny(out: Path) -> None:
    from torchdiffusion.training.config import TrainConfig
    from torchdiffusion.training.loop import train

    net = {"name": "mlp", "width": 64, "depth": 2, "emb_dim": 16}
    train(TrainConfig(data="moons", n_data=512, net=net, steps=100, checkpoint_every=100), out, progress=False)


def soak(run: str | os.PathLike, calls: int, every: int, n: int = 64, steps: int = 10) -> list[tuple[int, float]]:
    """``calls`` calls of ``td.load(run).sample(n, ...)``; returns [(calls done, RSS MiB)] every ``every`` calls."""
    import torch

    import torchdiffusion as td

    pipe = td.load(run)
    curve = [(0, rss_mib())]
    for i in range(calls):
        gen = torch.Generator().manual_seed(i)  # a new generator per call, as a service would make per request
        x = pipe.sample(n, sampler=SAMPLERS[i % len(SAMPLERS)], steps=steps, generator=gen)
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"call {i}: non-finite samples")
        if (i + 1) % every == 0:
            curve.append((i + 1, rss_mib()))
    return curve


def growth(curve: list[tuple[int, float]], warmup: int) -> tuple[float, float]:
    """(RSS change from the first record at or after ``warmup`` calls to the last, least-squares slope in MiB per
    1000 calls over those records)."""
    tail = [(c, r) for c, r in curve if c >= warmup]
    if len(tail) < 2:
        raise ValueError(f"need at least 2 records after the warm-up of {warmup} calls, got {len(tail)}")
    mc = sum(c for c, _ in tail) / len(tail)
    mr = sum(r for _, r in tail) / len(tail)
    slope = sum((c - mc) * (r - mr) for c, r in tail) / sum((c - mc) ** 2 for c, _ in tail)
    return tail[-1][1] - tail[0][1], 1000 * slope


def report(curve, warmup: int, seconds: float, args, n: int, steps: int) -> str:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import cpu_name

    change, slope = growth(curve, warmup)
    lines = [
        "# Soak: sampling calls in one process",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/soak.py --calls {args.calls} --every {args.every} "
        f"--warmup {args.warmup}`",
        "",
        f"{args.calls:,} calls of `td.load(run).sample({n}, sampler=..., steps={steps}, generator=...)` in one "
        f"process, cycling over {', '.join(SAMPLERS)}; a fresh `torch.Generator` per call. The model: an MLP "
        "(width 64, depth 2) trained 100 steps on moons (its weights do not matter here). Resident set size "
        f"every {args.every} calls ({'psutil' if _has_psutil() else '/proc/self/statm'}). {cpu_name()}, "
        f"1 thread, torch {torch.__version__}, Python {platform.python_version()}; {seconds:.0f} s.",
        "",
        f"After the warm-up ({warmup:,} calls): RSS change {change:+.2f} MiB over {curve[-1][0] - warmup:,} calls, "
        f"least-squares slope {slope:+.3f} MiB per 1,000 calls.",
        "",
        "| calls | RSS (MiB) |",
        "|---:|---:|",
        *(f"| {c:,} | {r:.1f} |" for c, r in curve),
        "",
    ]
    return "\n".join(lines)


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500, help="record RSS every this many calls")
    parser.add_argument("--warmup", type=int, default=1000, help="calls before growth is measured")
    parser.add_argument("--run", default=None, help="a 2-D run directory (default: train a tiny one)")
    parser.add_argument("--out", default="docs/bench/soak.md", help="the report ('-': print only)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "run"
            train_tiny(run)
        curve = soak(run, args.calls, args.every)
    text = report(curve, args.warmup, time.perf_counter() - started, args, n=64, steps=10)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
