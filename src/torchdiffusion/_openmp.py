"""How idle OpenMP worker threads wait: the library's default, applied before torch is first imported.

libgomp (the OpenMP of PyTorch's Linux wheels) reads its wait policy once, when ``import torch`` loads it, so
``torchdiffusion/__init__.py`` calls ``openmp_defaults`` before its first torch import (the command line always
imports the package first), and the benchmarks call it for the processes they spawn. Measured on a 2-core
Intel Xeon VM, torch 2.13 (README, "Command line", the table on threads):

- OpenMP's default, 300,000 spins before a thread sleeps, made training ~5-10x slower when another job used a
  core (issue #10, item 6): a thread that spins takes the CPU from the one that has work.
- OMP_WAIT_POLICY=PASSIVE (sleep at once; the policy until issue #15) must wake the threads at every parallel
  operation: 1.3-1.6x slower at two threads on an idle CPU (the U-Nets, and the 2-D MLP's training).
- GOMP_SPINCOUNT=3000, a short spin, keeps nearly all of the idle speed and stays within 1.1-1.4x of PASSIVE
  when another job uses a core.

KMP_BLOCKTIME=0 keeps LLVM's and Intel's OpenMP (macOS wheels, conda) sleeping at once, as before.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPINCOUNT = "3000"


def openmp_defaults(env: MutableMapping[str, str] = os.environ) -> None:
    """Set GOMP_SPINCOUNT (and KMP_BLOCKTIME) in ``env`` unless the user chose a wait policy or a spin count."""
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(env):
        env["GOMP_SPINCOUNT"] = SPINCOUNT
        env.setdefault("KMP_BLOCKTIME", "0")
