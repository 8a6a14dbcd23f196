"""Offline: the few-step grids stored in ``core/optimized_grid.py`` (issue #15 item 2), found once, kept as data.

Each candidate grid minimizes, by Powell's method, the mean over a family of random Gaussian mixtures of
``grid_fit``'s SPREAD objective (distance of the n-step samples to a 400-step DPM-Solver++(3M) teacher per
coordinate, plus half the log-density gap per coordinate) on 512 pilot starts per mixture, for one sampler on VP.
The candidates differ in the family (all dimensions 2-32, or 16-32 only; Align Your Steps, Sabour et al. 2024,
optimizes over one data set's model in the same spirit) and in the sampler they were fitted for. They are then
judged by what the sampler benchmark measures, sliced W2 to exact samples (2000 per mixture, divided by the
data's RMS scale), on a held-out family of 20 other random mixtures, for the default sampler UniPC-3. The rule
(set after the first SW2 scores at n = 5, before any log-density gap on this family was seen): the lowest mean
SW2; among the grids within 5% of it, the smallest mean |log-density gap| per coordinate. The winner per step
count is what ``OPTIMIZED_LAM`` stores. The benchmark's own mixtures are in neither family.

Run: ``python benchmarks/optimize_grids.py --nfe 5 10`` (about 15 minutes per step count on one core);
``--validate-only`` judges the stored grids and the uniform lam grid on the held-out family; ``--validate-only
--samplers unipc-3 unipc-2 dpmpp-2 --family 9001 30`` judges the sampler choice on a family never used for any choice
(UniPC-3 stayed best: ``docs/bench/family.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from functools import partial

import numpy as np
import torch
from bench_samplers import Reference
from scipy.optimize import minimize

from torchdiffusion import VP, GaussianMixture, grid_lam
from torchdiffusion.core.optimized_grid import OPTIMIZED_LAM, grid_optimized
from torchdiffusion.core.timesteps import grid_ends, lam_start
from torchdiffusion.samplers import sample_dpm_solver_pp, sample_unipc
from torchdiffusion.samplers.grid_fit import SPREAD, _times, lam_grid_from_params, logp_difference

F64 = torch.float64
SAMPLERS = {
    "unipc-3": partial(sample_unipc, order=3),
    "unipc-2": partial(sample_unipc, order=2),
    "dpmpp-2": partial(sample_dpm_solver_pp, order=2),
}
PILOT, TEACHER, NODES, HELD_OUT = 512, 400, 16, (99, 20)  # held-out family: seed, size


def family(seed: int, count: int, dims=(2, 4, 8, 16, 32)) -> list[GaussianMixture]:
    """Random mixtures: 2-8 modes of weights U(0.1, 1.1), unit-normal means, per-coordinate stds log-uniform in
    [0.02, 0.6], then scaled to an RMS data std c ~ log-uniform [0.5, 1.5]."""
    g, out = torch.Generator().manual_seed(seed), []
    for i in range(count):
        d, k = dims[i % len(dims)], int(torch.randint(2, 9, (1,), generator=g))
        w = torch.rand(k, generator=g, dtype=F64) + 0.1
        m = torch.randn(k, d, generator=g, dtype=F64)
        s = torch.exp(torch.empty(k, d, dtype=F64).uniform_(math.log(0.02), math.log(0.6), generator=g))
        scale = float(GaussianMixture(w, m, s**2).covariance().diagonal().mean().sqrt())
        c = math.exp(float(torch.empty(1, dtype=F64).uniform_(math.log(0.5), math.log(1.5), generator=g)))
        out.append(GaussianMixture(w, c * m / scale, (c * s / scale) ** 2))
    return out


def unit_family(seed: int = 777, count: int = 8) -> list[GaussianMixture]:
    """The first family tried: 2-16 dimensions, stds log-uniform in [0.03, 0.5], scaled to unit RMS std."""
    g, out = torch.Generator().manual_seed(seed), []
    for i in range(count):
        d, k = (2, 2, 4, 8, 16, 2, 8, 16)[i % 8], int(torch.randint(2, 9, (1,), generator=g))
        w = torch.rand(k, generator=g, dtype=F64) + 0.1
        m = torch.randn(k, d, generator=g, dtype=F64)
        s = torch.exp(torch.empty(k, d, dtype=F64).uniform_(math.log(0.03), math.log(0.5), generator=g))
        scale = float(GaussianMixture(w, m, s**2).covariance().diagonal().mean().sqrt())
        out.append(GaussianMixture(w, m / scale, (s / scale) ** 2))
    return out


# (name, sampler fitted for, family seed, family size, dimensions; None: unit_family): each step count's candidates
CANDIDATES = [
    ("unit-2-16/unipc-3", "unipc-3", 777, 8, None),
    ("all-dims/unipc-3", "unipc-3", 1, 20, (2, 4, 8, 16, 32)),
    ("all-dims/unipc-2", "unipc-2", 1, 20, (2, 4, 8, 16, 32)),
    ("16-32/unipc-3", "unipc-3", 2, 8, (16, 32)),
    ("16-32/unipc-2", "unipc-2", 3, 12, (16, 32)),
]


def joint_fit(sampler, n: int, mixtures, process) -> np.ndarray:
    """n + 1 lam values minimizing the family's mean SPREAD objective (free steps and a free end, no final
    denoise), as ``grid_fit.fit_grid`` parameterizes one model's grid."""
    a, b = grid_ends(process, None, None)
    lam_a, lam_b = lam_start(process, a), float(process.lam(torch.tensor(b, dtype=F64)))
    probs = []
    for j, gm in enumerate(mixtures):
        den = gm.denoiser(process)
        x_T = process.prior_sample((PILOT, gm.dim), generator=torch.Generator().manual_seed(100 + j)).double()
        teacher = sample_dpm_solver_pp(den, process, x_T, grid_lam(process, TEACHER), order=3, final_denoise=False)
        scale = float(teacher.std(0).pow(2).mean().sqrt()) * math.sqrt(gm.dim)
        probs.append((den, x_T, teacher, scale, gm.dim))

    def grid(v):
        lam_e = max(lam_b - float(v[-1]) ** 2, (lam_a + lam_b) / 2)
        return _times(process, lam_grid_from_params(v[:n], n, lam_a, lam_e), a, b if lam_e >= lam_b else None)

    def objective(v):
        total = 0.0
        try:
            ts = grid(v)
            for den, x_T, teacher, scale, d in probs:
                y = sampler(den, process, x_T, ts, final_denoise=False)
                e = float((y - teacher).norm(dim=1).mean())
                gap = float(logp_difference(den, process, b, teacher, y, NODES).mean())
                total += e / scale + SPREAD["logp_weight"] * abs(gap) / d  # fit_grid's J with SPREAD's weight
        except ValueError:  # two times that round to one
            return math.inf
        return total / len(probs) if math.isfinite(total) else math.inf

    res = minimize(
        objective, np.zeros(n + 1), method="Powell", options={"maxfev": 60 * (n + 1), "xtol": 1e-2, "ftol": 1e-4}
    )
    return process.lam(grid(res.x)).numpy()


def held_out(ts, process, sampler: str = "unipc-3", mixtures=None) -> tuple[list[float], list[float]]:
    """``sampler`` on ``ts`` (no final denoise) on each held-out mixture (default: ``family(*HELD_OUT)``): SW2 to
    2000 exact samples / RMS scale, and the log-density gap per coordinate (> 0: too concentrated)."""
    sw2, gap = [], []
    for j, gm in enumerate(family(*HELD_OUT) if mixtures is None else mixtures):
        x = process.prior_sample((2000, gm.dim), generator=torch.Generator().manual_seed(7 + j))
        y = SAMPLERS[sampler](gm.denoiser(process), process, x, ts.float(), final_denoise=False)
        r = Reference(gm, 2000, 5)(y.double())
        sw2.append(r["sw2"] / float(gm.covariance().diagonal().mean().sqrt()))
        gap.append(r["logp_gap"] / gm.dim)
    return sw2, gap


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--validate-only", action="store_true", help="judge the stored grids, fit nothing")
    ap.add_argument("--grids", help="a JSON file {name: [lam, ...]} of more grids to judge (n from their length)")
    ap.add_argument("--json", help="write the candidates and their held-out scores here")
    ap.add_argument(
        "--samplers", nargs="+", default=["unipc-3"], choices=sorted(SAMPLERS),
        help="judge every grid with each of these (the default's choice was checked with all three)",
    )  # fmt: skip
    ap.add_argument("--family", type=int, nargs=2, metavar=("SEED", "SIZE"), help="judge on another family")
    args = ap.parse_args()
    torch.set_num_threads(1)
    process, report = VP(), {}
    for n in args.nfe:
        rows = {"uniform lam": grid_lam(process, n)}
        if n in OPTIMIZED_LAM:
            rows["stored"] = grid_optimized(process, n)
        if args.grids:
            with open(args.grids) as fh:
                given = {k: np.asarray(v, dtype=np.float64) for k, v in json.load(fh).items() if len(v) == n + 1}
            rows |= {k: _times(process, v, process.t_max) for k, v in given.items()}
        for name, sampler, seed, count, dims in [] if args.validate_only else CANDIDATES:
            t0 = time.perf_counter()
            mixtures = unit_family(seed, count) if dims is None else family(seed, count, dims)
            lam = joint_fit(SAMPLERS[sampler], n, mixtures, process)
            print(f"n = {n} {name}: fitted in {time.perf_counter() - t0:.0f} s: lam {np.round(lam, 3).tolist()}")
            rows[name] = _times(process, lam, process.t_max)
        judge = None if args.family is None else family(*args.family)
        for (name, ts), sampler in itertools.product(rows.items(), args.samplers):
            sw, gap = held_out(ts, process, sampler, judge)
            report[f"{n}/{name}/{sampler}"] = {"lam": process.lam(ts).tolist(), "sw2": sw, "gap": gap}
            print(
                f"n = {n} {name:>18} {sampler}: held-out SW2 / scale {np.mean(sw):.3f} (max {np.max(sw):.3f}), "
                f"|log-density gap| per coordinate {np.mean(np.abs(gap)):.3f} (max {np.max(np.abs(gap)):.3f})",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
