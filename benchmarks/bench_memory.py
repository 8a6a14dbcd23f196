"""Benchmark: memory of sampling a loaded checkpoint without ``torch.no_grad`` (issue #10, item 2).

The README's Python example loads ``runs/moons`` with ``load_denoiser`` and calls ``td.sample_ddpm``
with no ``torch.no_grad()``. While the loaded weights required gradients, every step's output hung
on an autograd graph over all earlier steps, so memory grew with samples x steps. ``load_denoiser``
now freezes the weights (``requires_grad_(False)``), so nothing is recorded however it is called.

Each case runs in a fresh Python process (peak memory only ever rises) and reports, from
``/proc/self/status``, the peak resident set size VmHWM before and after sampling n points with
``steps`` DDPM steps (``grid_t``):
- "before": the weights made to require gradients again, as ``load_denoiser`` returned them before
  the fix; sampled without ``torch.no_grad``;
- "after": as ``load_denoiser`` returns them now; sampled without ``torch.no_grad``;
- "no_grad": as returned now, under ``torch.no_grad`` (the floor).
The moons checkpoint is trained here (the README's MLP, width 256, depth 4; 100 steps: memory does not
depend on how long it trained) unless ``--checkpoint`` names one. Linux only (``/proc``), 1 thread.

Run: ``python benchmarks/bench_memory.py [--n 2000] [--steps 50] [--checkpoint runs/moons]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = ("before", "after", "no_grad")


def vm_hwm_mib() -> float:
    """Peak resident set size of this process so far (VmHWM), in MiB."""
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return kib / 1024


def child(case: str, checkpoint: str, n: int, steps: int) -> dict:
    """One case, in this (fresh) process: load, sample, report the peak memory before and after."""
    import torch

    import torchdiffusion as td
    from torchdiffusion.training.checkpoint import load_denoiser

    torch.set_num_threads(1)
    denoiser, process, _ = load_denoiser(checkpoint)
    if case == "before":
        denoiser.requires_grad_(True)  # the weights as loaded before the fix
    gen = torch.Generator().manual_seed(0)
    x_T = process.prior_sample((n, 2), generator=gen)
    ts = td.grid_t(process, steps)
    before = vm_hwm_mib()
    if case == "no_grad":
        with torch.no_grad():
            x0 = td.sample_ddpm(denoiser, process, x_T, ts, generator=gen)
    else:
        x0 = td.sample_ddpm(denoiser, process, x_T, ts, generator=gen)
    after = vm_hwm_mib()
    return {"case": case, "hwm_before_mib": before, "hwm_after_mib": after, "graph": x0.grad_fn is not None}


def train_moons(out: Path) -> None:
    from torchdiffusion.training.config import TrainConfig
    from torchdiffusion.training.loop import train

    cfg = TrainConfig(data="moons", process={"name": "vp"}, target="eps", steps=100, checkpoint_every=100)
    train(cfg, out, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="samples")
    parser.add_argument("--steps", type=int, default=50, help="DDPM steps")
    parser.add_argument("--checkpoint", default=None, help="a 2-D run directory (default: train one)")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.checkpoint, args.n, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(Path(tmp) / "moons")
            train_moons(Path(checkpoint))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        print(f"sampling {args.n} points x {args.steps} DDPM steps from {checkpoint}, without torch.no_grad")
        print(f"{'case':<9} {'peak RSS before':>16} {'peak RSS after':>15} {'added':>10}  graph")
        for case in CASES:
            cmd = [sys.executable, __file__, "--child", case, "--checkpoint", checkpoint]
            cmd += ["--n", str(args.n), "--steps", str(args.steps)]
            r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            added = r["hwm_after_mib"] - r["hwm_before_mib"]
            print(
                f"{case:<9} {r['hwm_before_mib']:>12.0f} MiB {r['hwm_after_mib']:>11.0f} MiB "
                f"{added:>6.0f} MiB  {'yes' if r['graph'] else 'no'}"
            )


if __name__ == "__main__":
    main()
