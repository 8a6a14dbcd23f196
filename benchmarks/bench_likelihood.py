"""Benchmark: exact ODE log-likelihood against closed-form mixture densities, next to k-diffusion.

The mixtures are those of the sampler benchmark (``bench_samplers.make_mixtures``): "ring8" (8 sharp
modes, radius 2, std 0.05), "unequal2d" (4 modes, unequal weights and variances), "mix16d" (16-D, 5
modes). Every method is driven by the exact denoiser E[x0 | x_t], so errors are the method's alone, and
is scored on n exact samples x ~ p_0 against the closed forms log p_{t_min}(x) (what the ODE computes)
and log p_0(x):
- k-diffusion ``log_likelihood(model, x, 0.002, 80, atol, rtol)`` on EDM (dopri5 in sigma, one
  Rademacher Hutchinson probe whatever the dimension, prior N(0, 80^2 I));
- ours, ``log_likelihood`` on the same EDM process and tolerances, and on VP: exact trace in 2-D; in 16-D
  one Rademacher probe (k-diffusion's estimator; probes drawn once per call) and, on EDM, also the exact
  trace (16 backward passes per NFE, the library default for D <= 16).
Columns: NFE (denoiser calls, = ODE function evaluations), seconds per 1,000 examples, mean |error| in
nats vs log p_{t_min} and vs log p_0, and the prior mismatch |log p_T(x_T) - log N(x_T; 0, s^2 I)| that
any method with this prior carries (computed from our x_T). With ``--checkpoint`` (a run trained on a 2-D
toy set), also its NLL and ELBO on held-out samples, next to the exact entropy for "8gaussians".

Run: ``python benchmarks/bench_likelihood.py --out bench-output [--quick] [--checkpoint demo-output/run]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import anchors as A
import torch
from bench_samplers import make_mixtures

from torchdiffusion import EDM, VP
from torchdiffusion.likelihood.bounds import elbo
from torchdiffusion.likelihood.ode import log_likelihood

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def ours(gm, process, exact):
    def run(x, tol, seed):
        kw = dict(exact_trace=exact, rtol=tol, atol=tol, generator=_gen(seed), return_info=True)
        ll, info = log_likelihood(gm.denoiser(process), process, x, **kw)
        mismatch = gm.log_prob(info["x_T"], process, process.t_max) - info["prior"]
        return ll, info["nfe"], float(mismatch.abs().mean())

    return run


def kdiffusion(K, gm):
    def run(x, tol, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # its probe comes from the global RNG
            ll, info = K.log_likelihood(A.kdiff_model(gm), x, 0.002, 80.0, atol=tol, rtol=tol)
        return ll, info["fevals"], None

    return run


def bench_mixtures(args, K) -> list[dict]:
    rows = []
    for name, gm in make_mixtures().items():
        if args.quick and name == "unequal2d":
            continue
        x = gm.sample(args.n, generator=_gen(args.seed))
        log_p0 = gm.log_prob(x)
        # exact trace in 2-D; in 16-D one Rademacher probe (k-diffusion's estimator) and the exact trace.
        exact = gm.dim <= 2
        methods = [("ours", "EDM", exact), ("k-diffusion", "EDM", False), ("ours", "VP", exact)]
        if not exact:
            methods.insert(1, ("ours", "EDM", True))
        for tol in args.tols:
            runs = [
                kdiffusion(K, gm) if lib == "k-diffusion" else ours(gm, EDM() if p == "EDM" else VP(), ex)
                for lib, p, ex in methods
            ]
            keep = [K is not None or lib != "k-diffusion" for lib, _, _ in methods]
            out, best = [None] * len(runs), [math.inf] * len(runs)
            for _ in range(args.reps):  # interleaved, the fastest of each: the machine may be shared
                for i, run in enumerate(runs):
                    if keep[i]:
                        t0 = time.perf_counter()
                        out[i] = run(x, tol, args.seed)
                        best[i] = min(best[i], time.perf_counter() - t0)
            for (lib, pname, ex), res, sec, k in zip(methods, out, best, keep):
                if not k:
                    continue
                ll, nfe, mism = res
                process = EDM() if pname == "EDM" else VP()
                log_pt = gm.log_prob(x, process, process.t_min)
                rows.append(
                    {
                        "mixture": name,
                        "D": gm.dim,
                        "library": lib,
                        "process": pname,
                        "trace": "exact" if ex else "hutchinson x1",
                        "tol": tol,
                        "nfe": int(nfe),
                        "sec_per_1000": sec / len(x) * 1000,
                        "err_t_min": float((ll - log_pt).abs().mean()),
                        "err_p0": float((ll - log_p0).abs().mean()),
                        "bias_t_min": float((ll - log_pt).mean()),
                        "prior_mismatch": mism,
                    }
                )
                print(_row_md(rows[-1]), flush=True)
    return rows


def bench_checkpoint(args) -> dict:
    """NLL (ODE) and -ELBO of a trained 2-D model on held-out samples; the exact entropy for 8gaussians."""
    from torchdiffusion import GaussianMixture
    from torchdiffusion.data import make_2d
    from torchdiffusion.data.toy import eight_gaussians_mixture_params
    from torchdiffusion.training.checkpoint import load_denoiser

    denoiser, process, config = load_denoiser(args.checkpoint)
    data = config.get("data")
    x = make_2d(data, args.n_heldout, generator=_gen(10_000 + args.seed)).to(torch.float32)  # not the training seed
    t0 = time.perf_counter()
    with torch.no_grad():
        ll, info = log_likelihood(denoiser, process, x, batch_size=1000, progress=True, return_info=True)
        neg_elbo = -elbo(denoiser, process, x, n_t=32, generator=_gen(args.seed))[0]
    n = len(x)
    out = {
        "checkpoint": str(args.checkpoint),
        "data": data,
        "process": repr(process),
        "n_heldout": n,
        "nll": float(-ll.mean()),
        "nll_se": float(ll.std() / math.sqrt(n)),
        "neg_elbo": float(neg_elbo.mean()),
        "neg_elbo_se": float(neg_elbo.std() / math.sqrt(n)),
        "nfe": info["nfe"],
        "sec": time.perf_counter() - t0,
    }
    if data == "8gaussians":
        gm = GaussianMixture(*eight_gaussians_mixture_params())
        big = gm.sample(1_000_000, generator=_gen(1))
        h = -gm.log_prob(big)
        out["entropy"], out["entropy_se"] = float(h.mean()), float(h.std() / math.sqrt(len(h)))
        out["true_nll_heldout"] = float(-gm.log_prob(x.to(F64)).mean())
    return out


def _row_md(r) -> str:
    mism = "" if r["prior_mismatch"] is None else f"{r['prior_mismatch']:.2e}"
    return (
        f"| {r['mixture']} | {r['library']} | {r['process']} | {r['trace']} | {r['tol']:.0e} | {r['nfe']} | "
        f"{r['sec_per_1000']:.2f} | {r['err_t_min']:.2e} | {r['err_p0']:.2e} | {mism} |"
    )


HEADER = (
    "| mixture | library | process | trace | rtol=atol | NFE | s / 1000 ex. | mean abs err vs log p_tmin (nats) "
    "| vs log p_0 | prior mismatch |\n|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-output")
    p.add_argument("--quick", action="store_true", help="n = 200, two tolerances, no unequal2d")
    p.add_argument("--n", type=int, default=None, help="examples per mixture (default 1000; 200 with --quick)")
    p.add_argument("--tols", type=float, nargs="+", default=None, help="rtol = atol values (default 1e-3 1e-4 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="interleaved timed runs per cell; the fastest is reported")
    p.add_argument("--checkpoint", default=None, help="a run or checkpoint dir of a 2-D model")
    p.add_argument("--n-heldout", type=int, default=5000)
    args = p.parse_args(argv)
    args.n = args.n or (200 if args.quick else 1000)
    args.tols = args.tols or ([1e-3, 1e-5] if args.quick else [1e-3, 1e-4, 1e-5])
    torch.set_num_threads(args.threads)
    K = A.load_k_diffusion_sampling()
    if K is None:
        print("k-diffusion not available (make bench installs it): our rows only")
    print(HEADER)
    result = {"n": args.n, "threads": args.threads, "reps": args.reps, "torch": torch.__version__}
    result["rows"] = bench_mixtures(args, K)
    result["loadavg_after"] = os.getloadavg()  # timings are the fastest of --reps runs on a possibly shared machine
    if args.checkpoint:
        result["checkpoint"] = c = bench_checkpoint(args)
        print(f"\ntrained model ({c['data']}, {c['process']}), {c['n_heldout']} held-out samples:")
        print(f"  NLL (ODE)   {c['nll']:.4f} +- {c['nll_se']:.4f} nats   ({c['nfe']} NFE, {c['sec']:.1f} s)")
        print(f"  -ELBO       {c['neg_elbo']:.4f} +- {c['neg_elbo_se']:.4f} nats")
        if "entropy" in c:
            print(f"  true entropy {c['entropy']:.4f} +- {c['entropy_se']:.4f}; true -log p on these samples")
            print(f"  {c['true_nll_heldout']:.4f} (the model's NLL exceeds it by KL(p || p_model) + MC error)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "likelihood.json").write_text(json.dumps(result, indent=2))
    (out / "likelihood.md").write_text(HEADER + "\n" + "\n".join(_row_md(r) for r in result["rows"]) + "\n")
    print(f"\nwrote {out / 'likelihood.json'} and {out / 'likelihood.md'}")


if __name__ == "__main__":
    main()
