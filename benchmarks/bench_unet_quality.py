"""Quality per training step: our U-Net next to diffusers' UNet2DModel of the same size.

Both train on the bundled 8x8 digits (the first 1500; the other 297 are held out), or with ``--config cifar`` the
CIFAR-size nets on the built-in 32x32 RGB shapes (``shapes32``: the first 4096, 512 held out), with the same
DDPM process (linear betas, T = 1000), optimizer (AdamW, lr 1e-3), batches, times and noise, on
the eps-MSE loss of Ho et al. 2020 (Eq. 14). Each library is used as its users would: ours
through ``Preconditioned`` (unit-scale input, c_noise = -lam/4), diffusers' net called on
(x_t, timestep). Reported: the held-out eps-MSE (fixed times and noise) after each stage.

Ours is trained twice more on the same batches from the same initial weights: under bf16 autocast (as
``torchdiffusion train --precision bf16`` runs it: the library's ``Autocast``, NCHW layout) and in float32 with
other dropout masks, whose gap to the float32 run is the run-to-run noise that a bf16 gap is judged against.
Every column is evaluated in float32; "bf16 eval" is the bf16-trained net evaluated under bf16 autocast too.

Run: ``python benchmarks/bench_unet_quality.py [--config digits|cifar] [--steps 600] [--batch B] [--json out.json]``
(batch default: 128 for digits, 16 for cifar, as ``bench_unet.py``).
"""

from __future__ import annotations

import argparse
import json

import torchdiffusion  # noqa: F401 - first: the package sets its OpenMP wait policy before torch loads

# isort: split
import torch
from bench_unet import BATCH, ours, theirs

from torchdiffusion.core.processes import beta_linear


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["digits", "cifar"], default="digits")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=None, help="default: bench_unet.BATCH of the config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from torchdiffusion import Discrete, Preconditioned
    from torchdiffusion.data import load_images
    from torchdiffusion.training.step import Autocast

    name = args.config
    args.batch = args.batch or BATCH[name]
    process = Discrete.from_schedule(beta_linear, 1000)
    x, _ = load_images("digits" if name == "digits" else "shapes32")
    train, held = (x[:1500], x[1500:]) if name == "digits" else (x[:4096], x[4096 : 4096 + 512])
    g = torch.Generator().manual_seed(1)
    t_held = torch.randint(1, 1001, (len(held),), generator=g).double()
    eps_held = torch.randn(held.shape, generator=g)
    xt_held = process.perturb(held, t_held, eps_held)

    raw = {k: ours(name, layout="nchw" if k == "bf16" else None) for k in ("fp32", "bf16", "fp32 other masks")}
    nets = {
        "ours fp32": Preconditioned(raw["fp32"], process),
        "ours bf16": Preconditioned(Autocast(raw["bf16"], "cpu", torch.bfloat16), process),
        "ours fp32 other masks": Preconditioned(raw["fp32 other masks"], process),
        "diffusers fp32": theirs(name),
    }
    evals = dict(nets) | {"ours bf16, bf16 eval": nets["ours bf16"]}
    evals["ours bf16"] = Preconditioned(raw["bf16"], process)  # the bf16-trained weights, evaluated in float32

    def call(k, m, xt, t):
        if k.startswith("diffusers"):
            return m(xt, (t - 1).long()).sample  # diffusers' timestep k is our t = k + 1
        return m(xt, t)

    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in nets.items()}
    gen = torch.Generator().manual_seed(0)
    stages = sorted({args.steps // 4, args.steps // 2, args.steps})
    data = "digits" if name == "digits" else "shapes32"
    print(f"held-out eps-MSE on {data} after each stage ({name} nets, {args.threads} threads, batch {args.batch})")
    print(f"{'step':>6} " + " ".join(f"{k:>22}" for k in evals))
    out = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        t = torch.randint(1, 1001, (args.batch,), generator=gen).double()
        eps = torch.randn((args.batch, *train.shape[1:]), generator=gen)
        xt = process.perturb(train[idx], t, eps)
        for k, m in nets.items():
            torch.manual_seed(step + (10**6 if "other" in k else 0))  # the same dropout masks but in "other masks"
            m.train()
            loss = ((call(k, m, xt, t.float()) - eps) ** 2).mean()
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
        if step in stages:
            row = {"step": step}
            for k, m in evals.items():
                m.eval()
                with torch.no_grad():
                    row[k] = float(((call(k, m, xt_held, t_held.float()).float() - eps_held) ** 2).mean())
            out.append(row)
            print(f"{step:>6} " + " ".join(f"{row[k]:>22.4f}" for k in evals), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            record = {"config": name, "steps": args.steps, "batch": args.batch, "threads": args.threads, "rows": out}
            json.dump(record, fh, indent=2)


if __name__ == "__main__":
    main()
