"""Posterior samplers on a trained image model, where no exact posterior exists: what each method does to the
observed pixels and how far its fill is from the picture it was cut from.

For each of ``--images`` digits (one sample each, all at once) and each method at ``--nfe`` calls: the RMS of
y - A x on the observed pixels (0 for the data-consistent methods at sigma_y = 0), the RMS error of the generated
pixels against the true picture (a posterior sample's expected squared error is twice the posterior variance plus
nothing else, so lower is not always better, but a method far above the others is off the data), the share of
samples whose generated pixels leave [-1, 1] by more than 0.05 anywhere, and seconds.

Run: ``python benchmarks/trained_inverse.py --checkpoint bench-output/models/digits``.
"""

from __future__ import annotations

import argparse
import time

import torch

import torchdiffusion as td
from torchdiffusion.core.measurements import Mask, Measurement
from torchdiffusion.core.timesteps import grid_lam
from torchdiffusion.data import load_images
from torchdiffusion.names import INVERSE, get_inverse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default="digits16")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--nfe", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="picks the images")
    ap.add_argument("--noise-seed", type=int, default=None, help="draws the noise [default: seed + 1]")
    ap.add_argument("--precision", default="auto", help="the network's, as `inpaint --precision` (auto, fp32, bf16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", help="write each method's samples to SAVE_<method>.pt (to compare runs)")
    ap.add_argument("--methods", nargs="+", default=list(INVERSE), choices=list(INVERSE))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = td.load(a.checkpoint)
    denoiser, precision = pipe.sampling_denoiser(a.precision)
    x, _ = load_images(a.data)
    g = torch.Generator().manual_seed(a.seed)
    truth = x[torch.randperm(len(x), generator=g)[: a.images]]
    H = pipe.shape[-1]
    keep = torch.ones(pipe.shape, dtype=torch.float64)
    keep[..., H // 4 : 3 * H // 4, H // 4 : 3 * H // 4] = 0  # the centre box is generated
    op = Mask(keep, shape=pipe.shape)
    meas = Measurement(op, op(truth.to(torch.float64)), 0.0)  # one observation per image
    hole = keep == 0
    noise_seed = a.seed + 1 if a.noise_seed is None else a.noise_seed
    print(f"network in {precision}, {a.threads} thread(s), noise seed {noise_seed}")
    print(f"| method | observed RMS | hole RMS error | off [-1, 1] | seconds ({a.images} images, {a.nfe} calls) |")
    print("|---|---|---|---|---|")
    for name in a.methods:
        info = get_inverse(name)
        plan = info.knobs(a.nfe)
        steps, P = plan.pop("steps"), plan.get("particles", 1)
        if name == "smc":  # y[i] goes with the i-th group of P particles
            plan["sigma_data"] = pipe.sigma_data
        gen = torch.Generator().manual_seed(noise_seed)
        x0 = pipe.process.prior_sample((a.images * P, *pipe.shape), generator=gen)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = info.fn(denoiser, pipe.process, x0, grid_lam(pipe.process, steps), meas, generator=gen, **plan)
        sec = time.perf_counter() - t0
        out = out.to(torch.float64)
        obs = (op(out) - meas.y).pow(2).sum((1, 2, 3)).div(keep.sum()).sqrt().mean()
        err = (out - truth.to(torch.float64))[:, hole].pow(2).mean().sqrt()
        off = ((out[:, hole].abs() > 1.05).any(1)).to(torch.float64).mean()
        print(f"| {name} | {float(obs):.4f} | {float(err):.3f} | {float(off):.2f} | {sec:.1f} |", flush=True)
        if a.save:
            torch.save(out, f"{a.save}_{name}.pt")


if __name__ == "__main__":
    main()
