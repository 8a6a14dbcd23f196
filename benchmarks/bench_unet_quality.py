"""Quality per training step: our U-Net next to diffusers' UNet2DModel of the same size.

Both train on the bundled 8x8 digits (the first 1500; the other 297 are held out) with the same
DDPM process (linear betas, T = 1000), optimizer (AdamW, lr 1e-3), batches, times and noise, on
the eps-MSE loss of Ho et al. 2020 (Eq. 14). Each library is used as its users would: ours
through ``Preconditioned`` (unit-scale input, c_noise = -lam/4), diffusers' net called on
(x_t, timestep). Reported: the held-out eps-MSE (fixed times and noise) after each stage.

Run: ``python benchmarks/bench_unet_quality.py [--steps 600]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_unet.py: spinning threads stall on shared machines

import torch  # noqa: E402
from bench_unet import ours, theirs  # noqa: E402

from torchdiffusion.core.processes import beta_linear


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from torchdiffusion import Discrete, Preconditioned
    from torchdiffusion.data import load_digits

    process = Discrete.from_schedule(beta_linear, 1000)
    x, _ = load_digits()
    train, held = x[:1500], x[1500:]
    g = torch.Generator().manual_seed(1)
    t_held = torch.randint(1, 1001, (len(held),), generator=g).double()
    eps_held = torch.randn(held.shape, generator=g)
    xt_held = process.perturb(held, t_held, eps_held)

    nets = {"torchdiffusion": Preconditioned(ours("digits"), process), "diffusers": theirs("digits")}
    call = {
        "torchdiffusion": lambda m, xt, t: m(xt, t),
        "diffusers": lambda m, xt, t: m(xt, (t - 1).long()).sample,  # diffusers' timestep k is our t = k + 1
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in nets.items()}
    gen = torch.Generator().manual_seed(0)
    stages = sorted({args.steps // 4, args.steps // 2, args.steps})
    print(f"{'step':>6} {'torchdiffusion':>16} {'diffusers':>12}   (held-out eps-MSE)")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        t = torch.randint(1, 1001, (args.batch,), generator=gen).double()
        eps = torch.randn((args.batch, *train.shape[1:]), generator=gen)
        xt = process.perturb(train[idx], t, eps)
        for k, m in nets.items():
            m.train()
            loss = ((call[k](m, xt, t.float()) - eps) ** 2).mean()
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
        if step in stages:
            row = []
            for k, m in nets.items():
                m.eval()
                with torch.no_grad():
                    row.append(float(((call[k](m, xt_held, t_held.float()) - eps_held) ** 2).mean()))
            print(f"{step:>6} {row[0]:>16.4f} {row[1]:>12.4f}", flush=True)


if __name__ == "__main__":
    main()
