"""What a grid fit costs and what it buys: ``grid_fit.fit_grid``'s defaults against its first recipe.

On the sampler benchmark's exact mixtures (``bench_samplers.make_mixtures``), UniPC-3 on VP, SPREAD, 1024 pilot
starts of seed 1000: the first recipe (400-step teacher, 16 Gauss-Legendre nodes, 40 Powell runs per unknown from
the uniform lam grid) and the defaults (200 steps, 8 nodes, 15 runs per unknown from each of the uniform lam grid
and the stored optimized grid). Both search the end unknown first (the current code). Reported: the fit's
evaluations of the pilot batch and the sliced W2 / log-density gap of 4000 samples of seed 0 on the fitted grid
(the noise floors are in docs/bench/samplers.md).

Run: ``python benchmarks/fit_cost.py`` (a few minutes on one core).
"""

from __future__ import annotations

import time

import torch
from bench_samplers import Reference, make_mixtures

from torchdiffusion import VP
from torchdiffusion.samplers import DEFAULT_SAMPLER
from torchdiffusion.samplers.grid_fit import SPREAD, fit_grid

RECIPES = {
    "first recipe": lambda n: {"init": "lam", "max_evals": 40 * (n + 1), "teacher_steps": 400, "logp_nodes": 16},
    "defaults": lambda n: {},
}


def main():
    torch.set_num_threads(1)
    process = VP()
    print("| mixture | NFE | recipe | evaluations of the pilot batch | SW2 | log-density gap | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, gm in make_mixtures().items():
        ref = Reference(gm, 4000, 0)
        pilot = process.prior_sample((1024, gm.dim), generator=torch.Generator().manual_seed(1000))
        x = process.prior_sample((4000, gm.dim), generator=torch.Generator().manual_seed(0))
        for n in (5, 10):
            for recipe, kw in RECIPES.items():
                t0 = time.perf_counter()
                fit = fit_grid(DEFAULT_SAMPLER, gm.denoiser(process), process, n, pilot, **SPREAD, **kw(n))
                y = DEFAULT_SAMPLER(gm.denoiser(process), process, x, fit.ts.float(), final_denoise=False)
                r, sec = ref(y.double()), time.perf_counter() - t0
                print(f"| {name} | {n} | {recipe} | {fit.nfe:,} | {r['sw2']:.3f} | {r['logp_gap']:+.2f} | {sec:.0f} |")


if __name__ == "__main__":
    main()
