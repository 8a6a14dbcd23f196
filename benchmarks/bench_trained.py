"""Benchmark: every sampler on TRAINED models, scored against held-out data, with and without the data box.

``bench_samplers.py`` gives the samplers the exact denoiser, so it measures solver error alone; users sample a
network. Here every sampler runs on trained networks (issue #10, item 3): the demo's 2-D model
(``demo.DEMO_CONFIG``: 8gaussians, VP, eps), the README's two moons (VP, eps, 4000 steps) and the digits U-Net
(``configs/digits.yaml``). Each model is trained once into ``--models/NAME`` (default bench-output/models) and
reused when its checkpoint is complete. Every sampler runs twice from the same prior draw (and the same noise):
on ``checkpoint.load_denoiser(run, clip=True)``, whose x0_hat is clamped to the training data's bounding box
(``support.py``), and on ``clip=False``, the network as it is.

2-D models, per NFE budget (all network calls, final denoise included): every sampler of
``samplers.SAMPLERS`` on its default grid (``INFO[name].grid``; ald with one Langevin step per level,
ode_adaptive on a ladder of tolerances, the tightest that fits), and k-diffusion and diffusers driven with the
same network (``anchors.py``'s conventions, see ``kdiff_model`` and ``diffusers_eps`` below). Metrics on n
samples: sliced W2 to n held-out points (``metrics.sliced_wasserstein``, its fixed 512 directions of seed 0),
the outlier fraction (samples farther than OUTLIER_RADIUS from the nearest of 20,000 held-out points) and
max ||x||. Floor: the same metrics for independent held-out sets of size n (mean ± 2 sd).

Digits: FID in the library's own digits feature space (``nets.features.feature_net_for``, as ``torchdiffusion
evaluate`` uses) of n generated images against one half of the real digits, next to the floor (FID of the
other half against it, over random splits); fewer samplers (IMAGE_SAMPLERS) at NFE 10 and 20. Out of range:
the fraction of images with a pixel more than PIXEL_MARGIN outside the data's range before the clamp to
[-1, 1] that FID applies, and the largest |pixel|.

One thread by default (``--threads``). Run: ``make bench-samplers`` (or ``python benchmarks/bench_trained.py
--quick``: n = 2000, NFE 10 and 20, no digits; a few minutes once the models are trained). Writes
``trained.md`` and ``trained.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
import warnings
from pathlib import Path

import anchors as A
import numpy as np
import torch
from bench_samplers import ADAPTIVE_TOLS
from scipy.spatial import cKDTree

from torchdiffusion.app.demo import DEMO_CONFIG
from torchdiffusion.core.optimized_grid import FINAL_DENOISE, grid_optimized
from torchdiffusion.data import load_images, make_2d
from torchdiffusion.evaluation.metrics import sliced_wasserstein
from torchdiffusion.names import GRID_FUNCTIONS, INFO
from torchdiffusion.samplers import count_nfe
from torchdiffusion.training.checkpoint import find_checkpoint, load_denoiser
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent
# The 2-D data have per-coordinate std ~1 and a sample of 20,000 points reaches every fresh data point within
# ~0.25 (the largest nearest-neighbour distance of 20,000 fresh points, 8gaussians and moons): a sample farther
# than 0.5 from all of them is off the data (the floor rows show the fraction for fresh data: 0).
OUTLIER_RADIUS, NN_POINTS = 0.5, 20_000
PIXEL_MARGIN = 0.1  # 5% of the pixel range [-1, 1]
BUSY_S = 300  # a run folder whose log.csv changed this recently is being trained by another process
MODELS_2D = {
    "8gaussians": DEMO_CONFIG,
    "moons": TrainConfig(data="moons", process={"name": "vp"}, target="eps", steps=4000),
}
IMAGE_SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m", "unipc_3")
DEFAULT = ("optimized", "optimized")  # Pipeline.sample's default (sampler, grid); issue #15 item 2
BEFORE = ("unipc_3", "optimized")  # UniPC-3 on the default's grid: what the 5-step weights add to it
KNOBS = {"ald": {"n_steps_each": 1}}
LIBS = ("torchdiffusion", "k-diffusion", "diffusers")


def zero_denoiser(x, t, **cond):
    return torch.zeros_like(x)


# -- models ---------------------------------------------------------------------------------------------


def ensure_model(name: str, config: TrainConfig, root: Path) -> tuple[Path, float]:
    """The run directory of a trained model, training it (or finishing it, resume semantics) when its checkpoint
    is missing or short of ``config.steps``. Returns (run_dir, seconds spent training)."""
    run, log, said = root / name, root / name / "log.csv", False
    # Another process training into the folder (e.g. started early in the background) writes log.csv every
    # log_every steps: wait for it rather than train into the same folder at once.
    while not _complete(run, config.steps) and log.exists() and time.time() - log.stat().st_mtime < BUSY_S:
        if not said:
            print(f"{run} is being trained by another process (log.csv written < {BUSY_S} s ago): waiting", flush=True)
            said = True
        time.sleep(20)
    if _complete(run, config.steps):
        return run, 0.0
    print(f"training {name} into {run} ({config.steps} steps; once, then reused)", flush=True)
    t0 = time.perf_counter()
    train(config, run, resume=True, progress=False)
    return run, time.perf_counter() - t0


def _complete(run: Path, steps: int) -> bool:
    ckpt = find_checkpoint(run)
    return ckpt is not None and json.loads((ckpt / "config.json").read_text())["step"] >= steps


def denoisers(run: Path) -> tuple[dict, object, dict]:
    """({"clipped": .., "unclipped": ..}, process, config) of a run."""
    clipped, process, cfg = load_denoiser(run, clip=True)
    unclipped, _, _ = load_denoiser(run, clip=False)
    if "data_box" not in cfg:
        raise SystemExit(f"{run}: its checkpoint has no data_box (trained before it was recorded); delete it")
    return {"clipped": clipped, "unclipped": unclipped}, process, cfg


# -- running the samplers within an NFE budget ---------------------------------------------------------------


class Ours:
    """One torchdiffusion sampler on its default grid (or ``grid``, a name of ``GRID_FUNCTIONS``), run within NFE
    budgets (``runs``). On the optimized grid it runs without the final denoise, as ``Pipeline.sample`` does."""

    def __init__(self, name: str, process, seed: int, grid: str | None = None):
        self.name, self.process, self.seed = name, process, seed
        self.fn, self.knobs = INFO[name].fn, dict(KNOBS.get(name, {}))
        self.grid = GRID_FUNCTIONS[grid or INFO[name].grid]
        if self.grid is grid_optimized:
            self.knobs["final_denoise"] = FINAL_DENOISE
        self.adaptive, self.nfe_of_steps = name == "ode_adaptive", {}

    def _nfe(self, n_steps: int, shape) -> float:
        """NFE of n_steps, probed with a zero denoiser on 2 samples (the NFE depends on neither)."""
        if n_steps not in self.nfe_of_steps:
            d = count_nfe(zero_denoiser)
            try:
                x = torch.zeros(2, *shape)
                self.fn(d, self.process, x, self.grid(self.process, n_steps), generator=torch.Generator(), **self.knobs)
                self.nfe_of_steps[n_steps] = d.nfe
            except (ValueError, RuntimeError):
                self.nfe_of_steps[n_steps] = math.inf
        return self.nfe_of_steps[n_steps]

    def steps_for(self, budget: int, shape) -> int | None:
        n = 1
        while self._nfe(n + 1, shape) <= budget:
            n += 1
        return n if self._nfe(n, shape) <= budget else None

    def _once(self, denoiser, x_T, n_steps, **extra):
        g = torch.Generator().manual_seed(self.seed + 1)  # the same noise for the clipped and the raw network
        d = count_nfe(denoiser)
        ts = self.grid(self.process, n_steps)
        out = self.fn(d, self.process, x_T, ts, generator=g, **self.knobs, **extra)
        return out, d.nfe

    def runs(self, denoiser, x_T, budgets):
        """{budget: (x, nfe, steps-or-tolerance)} for the budgets it fits in."""
        out = {}
        if self.adaptive:  # a ladder of tolerances, stopped past the largest budget; each takes the tightest fit
            ladder = []
            for tol in ADAPTIVE_TOLS:
                x, nfe = self._once(denoiser, x_T, 1, rtol=tol, atol=tol)
                ladder.append((x, nfe, f"tol {tol:g}"))
                if nfe > max(budgets):
                    break
            for b in budgets:  # where none fits: no samples, and the NFE of the loosest tolerance
                fits = [r for r in ladder if r[1] <= b]
                out[b] = max(fits, key=lambda r: r[1]) if fits else (None, ladder[0][1], ladder[0][2])
            return out
        for b in budgets:
            if (n := self.steps_for(b, x_T.shape[1:])) is not None:
                x, nfe = self._once(denoiser, x_T, n)
                out[b] = (x, nfe, n)
        return out


def kdiff_model(denoiser, process):
    """The network as k-diffusion's model(x, sigma): x in alpha = 1 units, sigma = the VP sigma / alpha.

    The VP state at the same log-SNR is x / sqrt(1 + sigma^2); the network is called at the VP time with that
    log-SNR (``t_from_lam``, clamped to [t_min, t_max] as a wrapper of a model trained there must)."""

    def model(x, sigma, **kw):
        s = sigma.to(F64)
        t = process.t_from_lam(-torch.log(s[:1])).expand(len(x))
        x_vp = x * (1 + s**2).rsqrt().to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return denoiser(x_vp, t.to(x.dtype))

    return model


def kdiff_runs(name, denoiser, process, z, budgets, seed):
    """k-diffusion's ``name`` on its Karras sigmas over the model's own range [sigma(t_min), sigma(t_max)] (in alpha
    = 1 units, as its scripts take model.sigma_min / sigma_max), from x = sigma_max z: the same start as ours."""
    K = A.load_k_diffusion_sampling()
    s_min, s_max = (float(torch.exp(-process.lam(torch.tensor(t, dtype=F64)))) for t in (process.t_min, process.t_max))
    out = {}
    for b in budgets:
        n = A.kdiff_steps_for_budget(name, b)
        sigmas = K.get_sigmas_karras(n, s_min, s_max, rho=7.0).to(z.dtype)
        model = A._Count(kdiff_model(denoiser, process))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            x = getattr(K, name)(model, s_max * z, sigmas, disable=True)
        out[b] = (x, model.nfe, n)
    return out


def diffusers_eps(denoiser, process, sched):
    """eps(x, timestep) for a diffusers scheduler, from the network: at the scheduler's timestep (its DDPM
    alphas_cumprod, interpolated in sigma as its sigma-space schedulers do: ``anchors.DiffusersProcess``) the
    network is called at the VP time of equal log-SNR, and eps = (x - a x0_hat) / s with the scheduler's a, s,
    so that the scheduler recovers exactly x0_hat."""
    dproc = A.scheduler_process(sched)

    def eps(x, t):
        t = torch.as_tensor(t, dtype=F64).reshape(1)
        a, s = float(dproc.alpha(t)), float(dproc.sigma(t))
        t_vp = process.t_from_lam(torch.tensor([math.log(a / s)], dtype=F64)).expand(len(x))
        return (x - a * denoiser(x, t_vp.to(x.dtype))) / s

    return eps


def diffusers_runs(name, denoiser, process, z, budgets, seed):
    out = {}
    for b in budgets:
        if (n := A.diffusers_steps_for_budget(name, b)) is None:
            continue
        sched = A.make_scheduler(name)
        sched.set_timesteps(n)
        x, nfe = A.diffusers_loop(
            sched, diffusers_eps(denoiser, process, sched), z, torch.Generator().manual_seed(seed)
        )
        out[b] = (x, nfe, n)
    return out


# -- metrics --------------------------------------------------------------------------------------------------


class Held2D:
    """Held-out data of a 2-D set (seeds far from the training data's): the SW2 reference (n points), the
    outlier reference (NN_POINTS points, in a k-d tree) and the floor (independent sets of n).

    SW2 is ``metrics.sliced_wasserstein``'s definition (its 512 directions of seed 0, sorted projections of
    equal-size sets; ``check`` compares the two), with the reference's projections sorted once and numpy's sort,
    ~15x faster than torch's on CPU (as in ``bench_samplers.Reference``)."""

    def __init__(self, data: str, n: int, seed: int):
        self.data, self.n, self.seed = data, n, seed
        self.ref = make_2d(data, n, generator=torch.Generator().manual_seed(10_000 + seed))
        theta = torch.randn(2, 512, generator=torch.Generator().manual_seed(0), dtype=F64)
        self.theta = (theta / theta.norm(dim=0, keepdim=True)).numpy()
        self.ref_sorted = self._sorted(self.ref)
        nn = make_2d(data, NN_POINTS, generator=torch.Generator().manual_seed(20_000 + seed))
        self.tree = cKDTree(nn.to(F64).numpy())

    def _sorted(self, x):
        return np.sort(x.to(F64).numpy() @ self.theta, axis=0)

    def sw2(self, x) -> float:
        return float(np.sqrt(np.mean((self._sorted(x) - self.ref_sorted) ** 2)))

    def check(self, x) -> None:
        """The fast SW2 is ``metrics.sliced_wasserstein`` (to float64 rounding of sums of 1e6 terms)."""
        a, b = self.sw2(x), sliced_wasserstein(x, self.ref)
        if not math.isclose(a, b, rel_tol=1e-9):
            raise AssertionError(f"fast SW2 {a} differs from metrics.sliced_wasserstein {b}")

    def outlier_fraction(self, x) -> float:
        """Fraction of samples farther than OUTLIER_RADIUS from every point of the outlier reference."""
        x = x.to(F64)
        ok = torch.isfinite(x).all(1)
        far = ~ok
        if bool(ok.any()):
            d, _ = self.tree.query(x[ok].numpy(), k=1, distance_upper_bound=2 * OUTLIER_RADIUS)
            far[ok] = torch.from_numpy(d > OUTLIER_RADIUS)
        return float(far.float().mean())

    def __call__(self, x) -> dict:
        finite = bool(torch.isfinite(x).all())
        return {
            "sw2": self.sw2(x) if finite else math.nan,
            "outliers": self.outlier_fraction(x),
            "max_norm": float(x.to(F64).norm(dim=1).max()) if finite else math.inf,
        }

    def floor(self, reps: int) -> dict:
        sets = [
            make_2d(self.data, self.n, generator=torch.Generator().manual_seed(30_000 + 100 * self.seed + r))
            for r in range(reps)
        ]
        self.check(sets[0])
        runs = [self(x) for x in sets]
        return {
            k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))}
            for k in runs[0]
            for v in [[r[k] for r in runs]]
        }


# -- the 2-D part ------------------------------------------------------------------------------------------------


def bench_2d(name, config, args, budgets, notes) -> tuple[list, dict, dict]:
    run, train_s = ensure_model(name, config, Path(args.models))
    dens, process, cfg = denoisers(run)
    held = Held2D(config.data, args.n, args.seed)
    floor = held.floor(args.floor_reps)
    x_T = process.prior_sample((args.n, 2), generator=torch.Generator().manual_seed(args.seed))
    z = x_T / float(process.sigma(torch.tensor(process.t_max, dtype=F64)))  # the standard normal draw behind x_T
    rows = []
    jobs = jobs_2d(process, args.seed, notes)
    for lib, sampler, grid, runs in jobs:
        for clip, d in dens.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                res = runs(d, z if lib != "torchdiffusion" else x_T, budgets)
            sec = (time.perf_counter() - t0) / max(sum(r[0] is not None for r in res.values()), 1)
            for b in budgets:
                x, nfe, steps = res.get(b, (None, None, None))
                row = {"library": lib, "sampler": sampler, "grid": grid, "clip": clip, "budget": b, "nfe": nfe}
                metrics = held(x) if x is not None else {"sw2": None, "outliers": None, "max_norm": None}
                rows.append(row | {"steps": steps} | metrics | {"seconds": sec if x is not None else None})
        print(f"  {name}: {lib} {sampler} done", flush=True)
    info = {"run": str(run), "train_seconds": train_s, "data_box": cfg["data_box"], "train_steps": cfg["steps"]}
    info["floor_reps"] = args.floor_reps
    return rows, floor, info


def jobs_2d(process, seed: int, notes: list) -> list[tuple]:
    """(library, sampler, grid, runs) for every sampler of the three libraries that is installed; ``runs(denoiser,
    x, budgets)`` takes x_T for ours and the standard normal draw z behind it for the anchors (``bench_2d``)."""
    jobs = [("torchdiffusion", s, INFO[s].grid, Ours(s, process, seed).runs) for s in INFO]
    for sampler, grid in [j for j in (BEFORE, DEFAULT) if j not in {(s, INFO[s].grid) for s in INFO}]:
        jobs.append(("torchdiffusion", sampler, grid, Ours(sampler, process, seed, grid).runs))
    if A.load_k_diffusion_sampling() is None:
        notes.append("k-diffusion not installed: its samplers skipped (make bench-samplers installs it)")
    else:
        jobs += [("k-diffusion", s, "karras", _bind(kdiff_runs, s, process, seed)) for s in A.KDIFF_SAMPLERS]
    if importlib.util.find_spec("diffusers") is None:
        notes.append("diffusers not installed: its schedulers skipped (make bench-samplers installs it)")
    else:
        jobs += [("diffusers", s, "default", _bind(diffusers_runs, s, process, seed)) for s in A.DIFFUSERS_SCHEDULERS]
    return jobs


def _bind(fn, sampler, process, seed):
    return lambda d, z, budgets: fn(sampler, d, process, z, budgets, seed)


# -- the digits ---------------------------------------------------------------------------------------------------


def bench_digits(args, budgets, notes) -> dict:
    from torchdiffusion.evaluation.features import feature_net_for
    from torchdiffusion.evaluation.image_metrics import extract_features, feature_statistics, frechet_distance

    config = TrainConfig.from_yaml(ROOT / "configs" / "digits.yaml")
    run, train_s = ensure_model("digits", config, Path(args.models))
    dens, process, cfg = denoisers(run)
    lo, hi = cfg["data_box"][0][0], cfg["data_box"][1][0]
    real, labels = load_images(config.data)
    net = feature_net_for(config.data, Path(args.models) / "features", images=real, labels=labels)
    feats = extract_features(net, real)
    # FID of n generated images against half A of the real digits; the floor is half B against half A, over
    # random splits (the same sizes, so the same small-sample bias).
    half = len(real) // 2

    def split(r):
        p = torch.randperm(len(real), generator=torch.Generator().manual_seed(40_000 + r))
        return p[:half], p[half : 2 * half]

    a_idx, _ = split(0)
    ref_stats = feature_statistics(feats[a_idx])
    floor_v = [
        frechet_distance(*feature_statistics(feats[b]), *feature_statistics(feats[a]))
        for a, b in map(split, range(args.floor_reps))
    ]
    floor = {"fid": {"mean": float(np.mean(floor_v)), "sd": float(np.std(floor_v, ddof=1))}}
    n = args.digits_n or half
    x_T = process.prior_sample((n, *real.shape[1:]), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for sampler, grid in [(s, INFO[s].grid) for s in IMAGE_SAMPLERS] + [BEFORE, DEFAULT]:
        for clip, d in dens.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                res = Ours(sampler, process, args.seed, grid).runs(d, x_T, budgets)
            sec = (time.perf_counter() - t0) / max(len(res), 1)
            for b, (x, nfe, steps) in res.items():
                flat = x.reshape(len(x), -1).to(F64)
                bad = (flat < lo - PIXEL_MARGIN) | (flat > hi + PIXEL_MARGIN) | ~torch.isfinite(flat)
                fid = math.nan
                if bool(torch.isfinite(flat).all()):
                    fid = frechet_distance(*feature_statistics(extract_features(net, x.clamp(-1, 1))), *ref_stats)
                row = {"library": "torchdiffusion", "sampler": sampler, "grid": grid, "clip": clip}
                row |= {"budget": b, "nfe": nfe, "steps": steps, "fid": fid, "max_abs": float(flat.abs().max())}
                row |= {
                    "out_of_range": float(bad.any(1).float().mean()),
                    "out_of_range_pixels": float(bad.float().mean()),
                }
                rows.append(row | {"seconds": sec})
            print(f"  digits: {sampler} [{grid}] {clip} done ({sec:.0f} s per run)", flush=True)
    info = {"run": str(run), "train_seconds": train_s, "data_box": cfg["data_box"], "n": n, "n_real_half": half}
    info |= {"features": getattr(net, "label", "own"), "floor_reps": args.floor_reps}
    return {"rows": rows, "floor": floor, "info": info}


# -- reporting -------------------------------------------------------------------------------------------------


def _band(f, fmt=".3f") -> str:
    return f"{f['mean']:{fmt}} ± {2 * f['sd']:{fmt}}"


def _ran(r) -> bool:
    return r is not None and r.get("sw2", r.get("fid")) is not None


def _nfe_note(r) -> str:
    return "" if r["nfe"] == r["budget"] else f" ({r['nfe']})"


def _cell2d(r) -> str:
    if not _ran(r):
        return "—" if r is None or r["nfe"] is None else f"— (needs {r['nfe']})"
    sw2 = "diverged" if not math.isfinite(r["sw2"]) else f"{r['sw2']:.3f}"
    return f"{sw2} / {100 * r['outliers']:.2f}% / {r['max_norm']:.3g}{_nfe_note(r)}"


def _cell_img(r) -> str:
    if not _ran(r):
        return "—"
    fid = "diverged" if not math.isfinite(r["fid"]) else f"{r['fid']:.2f}"
    return f"{fid} / {100 * r['out_of_range']:.1f}% / {r['max_abs']:.3g}{_nfe_note(r)}"


def _table(rows, budgets, cell) -> list[str]:
    by = {}
    for r in rows:
        by.setdefault((r["library"], r["sampler"], r["grid"], r["clip"]), {})[r["budget"]] = r
    lines = ["| library | sampler | grid | x0 clip | " + " | ".join(f"NFE {b}" for b in budgets) + " |"]
    lines.append("|" + "---|" * (4 + len(budgets)))
    for (lib, s, g, clip), cells in by.items():
        c = "box" if clip == "clipped" else "none"
        lines.append(f"| {lib} | {s} | {g} | {c} | " + " | ".join(cell(cells.get(b)) for b in budgets) + " |")
    return lines


def deterministic(r) -> bool:
    if r["library"] == "torchdiffusion":
        return not INFO[r["sampler"]].stochastic
    return not any(k in r["sampler"] for k in ("ancestral", "sde", "DDPM"))


def summary_2d(rows, budgets) -> list[tuple]:
    """Per (budget, library, clip), over the deterministic samplers that ran: SW2 median, min and max, the median
    and largest outlier fraction, and the largest max ||x||."""
    out = []
    for b in budgets:
        for lib in LIBS:
            for clip in ("unclipped", "clipped"):
                rs = [r for r in rows if (r["budget"], r["library"], r["clip"]) == (b, lib, clip)]
                rs = [r for r in rs if _ran(r) and deterministic(r)]
                if rs:
                    sw = [r["sw2"] if math.isfinite(r["sw2"]) else math.inf for r in rs]
                    o = [r["outliers"] for r in rs]
                    mx = max(r["max_norm"] for r in rs)
                    out.append((b, lib, clip, float(np.median(sw)), min(sw), max(sw), float(np.median(o)), max(o), mx))
    return out


def default_vs_anchors(rows, floor, budgets) -> list[dict]:
    """Issue #15 item 2 on trained models: per budget and clip, our default (``DEFAULT``, no fit) against the best
    anchor (k-diffusion or diffusers, any sampler, each on its own default grid) with the same network. Holds when
    ours is at most the anchor's SW2 plus two floor sd (a statistical tie counts as no worse)."""
    out = []
    for b in budgets:
        for clip in ("clipped", "unclipped"):
            here = [r for r in rows if (r["budget"], r["clip"]) == (b, clip) and _ran(r) and math.isfinite(r["sw2"])]
            mine = [r for r in here if (r["library"], r["sampler"], r["grid"]) == ("torchdiffusion", *DEFAULT)]
            theirs = [r for r in here if r["library"] != "torchdiffusion"]
            if mine and theirs:
                best = min(theirs, key=lambda r: r["sw2"])
                ok = mine[0]["sw2"] <= best["sw2"] + 2 * floor["sw2"]["sd"]
                out.append({"budget": b, "clip": clip, "ours": mine[0]["sw2"], "anchor": f"{best['library']} "
                            f"{best['sampler']}", "anchor_sw2": best["sw2"], "holds": bool(ok)})  # fmt: skip
    return out


def write_markdown(path, results, digits, budgets, img_budgets, meta):
    lines = [
        "# Samplers on trained models, against held-out data\n",
        meta + "\n",
        "x0 clip 'box': `load_denoiser(run)`, x0_hat clamped to the training data's bounding box (`support.py`); "
        "'none': `load_denoiser(run, clip=False)`, the network as it is. Every row of a model starts from the same "
        "prior draw (k-diffusion: the same normal draw times its sigma_max; diffusers: times its init_noise_sigma) "
        "and draws the same noise for both clip settings. k-diffusion and diffusers get the same network, clipped "
        "or not, at the same log-SNR (`bench_trained.kdiff_model`, `diffusers_eps`). Every sampler runs on its "
        "default grid (torchdiffusion: `samplers.INFO[name].grid`; k-diffusion: Karras sigmas over the model's "
        "range; diffusers: the scheduler's default spacing). NFE: all network calls, final denoise included; the "
        "actual NFE in parentheses where the steps do not fill the budget; '—': no step count fits.\n",
        f"2-D cells: sliced W2 to n held-out points / outliers: samples farther than {OUTLIER_RADIUS} (data units, "
        f"per-coordinate std ~1) from the nearest of {NN_POINTS:,} held-out points / max ||x||.\n",
    ]
    for name, res in results.items():
        f, info = res["floor"], res["info"]
        lines += [
            f"## {name}\n",
            f"Model: `{info['run']}` ({info['train_steps']} training steps), data box {_box(info['data_box'])}. "
            f"Floor (independent held-out sets of n, mean ± 2 sd over {info['floor_reps']}): SW2 {_band(f['sw2'])}, "
            f"outliers {100 * f['outliers']['mean']:.2f}%, max ||x|| {_band(f['max_norm'], '.2f')}.\n",
            "Deterministic samplers per library and NFE: SW2 median [min, max]; outliers median [max]; largest "
            "max ||x||.\n",
            "| NFE | library | x0 clip | SW2 median [min, max] | outliers median [max] | max ‖x‖ |",
            "|---|---|---|---|---|---|",
        ]
        for b, lib, clip, med, lo, hi, omed, omax, mx in summary_2d(res["rows"], budgets):
            c = "box" if clip == "clipped" else "none"
            lines.append(
                f"| {b} | {lib} | {c} | {med:.3f} [{lo:.3f}, {hi:.3f}] | {100 * omed:.2f}% [{100 * omax:.2f}%] "
                f"| {mx:.3g} |"
            )
        lines += [
            "",
            f"Our default ({DEFAULT[0]} on the {DEFAULT[1]} grid, no fit) against the best anchor with the same "
            "network (holds: ours <= the anchor's SW2 + 2 floor sd):\n",
            "| NFE | x0 clip | ours | best anchor | its SW2 | holds |",
            "|---|---|---|---|---|---|",
        ]
        for c in default_vs_anchors(res["rows"], f, budgets):
            clip = "box" if c["clip"] == "clipped" else "none"
            lines.append(
                f"| {c['budget']} | {clip} | {c['ours']:.3f} | {c['anchor']} | {c['anchor_sw2']:.3f} | "
                f"{'yes' if c['holds'] else 'NO'} |"
            )
        lines += ["", "Every sampler (SW2 / outliers / max ||x||):\n", *_table(res["rows"], budgets, _cell2d), ""]
    if digits is not None:
        f, info = digits["floor"], digits["info"]
        lines += [
            "## digits (16x16 U-Net, configs/digits.yaml)\n",
            f"Model: `{info['run']}`. FID in the own digits feature space ({info['features']}) of {info['n']} "
            f"generated images against one half ({info['n_real_half']} images) of the real digits; floor: the other "
            f"half against it, over {info['floor_reps']} random splits (mean ± 2 sd): {_band(f['fid'], '.2f')}. "
            f"Cells: FID / images with a pixel more than {PIXEL_MARGIN} outside the data range "
            f"{_box(info['data_box'])}, before the clamp to [-1, 1] that FID applies / max |pixel|.\n",
            *_table(digits["rows"], img_budgets, _cell_img),
            "",
        ]
    Path(path).write_text("\n".join(lines) + "\n")


def _box(box) -> str:
    if all(len(side) == 1 for side in box):  # images: one interval
        return f"[{box[0][0]:.3g}, {box[1][0]:.3g}]"
    return "[" + ", ".join("(" + ", ".join(f"{v:.3g}" for v in side) + ")" for side in box) + "]"


def print_summary(results, digits, budgets, wall):
    for name, res in results.items():
        f = res["floor"]
        print(f"\n{name}: floor SW2 {_band(f['sw2'])}; deterministic samplers, SW2 median [min, max], outliers max:")
        for b, lib, clip, med, lo, hi, _, omax, mx in summary_2d(res["rows"], budgets):
            print(
                f"  NFE {b:>3} {lib:>14} {clip:>9}: SW2 {med:.3f} [{lo:.3f}, {hi:.3f}], "
                f"outliers <= {100 * omax:.2f}%, max||x|| <= {mx:.3g}"
            )
        for c in default_vs_anchors(res["rows"], f, budgets):
            print(
                f"  default NFE {c['budget']:>3} {c['clip']:>9}: {c['ours']:.3f} vs {c['anchor']} {c['anchor_sw2']:.3f}"
                f" -> {'holds' if c['holds'] else 'FAILS'}"
            )
    if digits is not None:
        print(f"\ndigits: floor FID {_band(digits['floor']['fid'], '.2f')}")
        for r in (r for r in digits["rows"] if _ran(r)):
            print(
                f"  {r['sampler']:>9} NFE {r['budget']:>3} {r['clip']:>9}: FID {r['fid']:.2f}, "
                f"out of range {100 * r['out_of_range']:.1f}%, max|x| {r['max_abs']:.3g}"
            )
    print(f"wall time {wall:.0f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-output")
    p.add_argument("--models", default=None, help="cache of trained models (default OUT/models)")
    p.add_argument("--quick", action="store_true", help="n = 2000, NFE 10 20, no digits")
    p.add_argument("--n", type=int, default=None, help="2-D samples per run (default 5000; 2000 with --quick)")
    p.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE budgets (default 5 10 20 50)")
    p.add_argument("--no-digits", action="store_true", help="skip the digits model (~10-30 min to train once)")
    p.add_argument("--digits-n", type=int, default=None, help="generated digits (default: half the real set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--floor-reps", type=int, default=10, help="independent held-out sets for the floor")
    args = p.parse_args(argv)
    args.n = args.n or (2000 if args.quick else 5000)
    args.models = args.models or str(Path(args.out) / "models")
    budgets = sorted(args.nfe or ([10, 20] if args.quick else [5, 10, 20, 50]))
    img_budgets = [b for b in budgets if b in (10, 20)] or budgets[:2]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torchsde")  # its Brownian-tree bounds, rounded in float32
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    out, start, notes, results = Path(args.out), time.perf_counter(), [], {}
    out.mkdir(parents=True, exist_ok=True)
    for name, config in MODELS_2D.items():
        rows, floor, info = bench_2d(name, config, args, budgets, notes)
        results[name] = {"rows": rows, "floor": floor, "info": info}
    digits = None if args.quick or args.no_digits else bench_digits(args, img_budgets, notes)
    wall, notes = time.perf_counter() - start, sorted(set(notes))
    meta = (
        f"n = {args.n} samples per 2-D run, NFE budgets {budgets}, seed {args.seed}, {args.threads} thread(s), "
        f"float32, wall time {wall:.0f} s including {sum(r['info']['train_seconds'] for r in results.values()):.0f} s "
        f"of 2-D training (torch {torch.__version__})." + "".join(f"\n- {n}" for n in notes)
    )
    config = {"n": args.n, "budgets": budgets, "seed": args.seed, "quick": args.quick, "threads": args.threads}
    config |= {"outlier_radius": OUTLIER_RADIUS, "nn_points": NN_POINTS, "pixel_margin": PIXEL_MARGIN}
    summary = {"config": config, "wall_time_s": wall, "models": results, "digits": digits, "notes": notes}
    (out / "trained.json").write_text(json.dumps(summary, indent=1, default=str))
    write_markdown(out / "trained.md", results, digits, budgets, img_budgets, meta)
    print_summary(results, digits, budgets, wall)


if __name__ == "__main__":
    main()
