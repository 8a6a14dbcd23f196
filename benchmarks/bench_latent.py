"""Benchmark: pixel, latent and cascaded diffusion on the digits at equal training wall time (issue #14, items 2, 4).

Contenders, all on 16 x 16 digits (``digits16``, split once with seed ``SPLIT_SEED`` into ``TRAIN_N`` training
images and the rest held out), every diffusion network the command line's image U-Net (``IMAGE_NET``, 1.1M
parameters at 16 x 16) on VP predicting eps (the super-resolution stage v, the library's default there) with
``TRAIN`` (configs/digits.yaml's batch, lr, warm-up, clipping and EMA; a constant lr after the warm-up, since the
number of steps a time budget buys is not known in advance):
    pixel    the U-Net on the 16 x 16 pixels.
    latent   Rombach et al. 2022: the KL autoencoder of ``training.autoencoder`` (16 x 16 x 1 -> 4 x 4 x 4, kl weight
             1e-6) trained for ``--ae-share`` of the budget, then the U-Net on its scaled latents for the rest;
             ``sample`` decodes.
    cascade  Ho et al. 2022: a base U-Net on the 8 x 8 images avgpool2(x16) and a super-resolution U-Net 8 -> 16
             (``super_resolution=2``, conditioning augmentation up to ``low_res_noise`` = 0.2), each trained for its
             share of the budget (``--base-share``) and sampled as ``app.pipeline.cascade`` at ``--aug-level``.
             The base learns avgpool2(x16), not the native 8 x 8 digits, because that is what the upsampler is
             conditioned on: digits16 is the bilinear 2x upsampling of the 8 x 8 digits, and avgpool2 of it is the
             8 x 8 digit blurred by [1/8, 3/4, 1/8] per axis (mean |difference| 0.14, max 0.79, on [-1, 1]).

Budget: each contender trains for ``--budget`` wall seconds on ``--threads`` threads (default 2: the issue's "2
cores"). A run is trained in chunks: ``train`` (or ``train_autoencoder``) is called with ``resume=True`` and a
callback that stops it (``_OutOfTime``, a KeyboardInterrupt, on which both loops save a checkpoint of the last
completed step) when the run's cumulative time reaches the chunk's end; the next chunk resumes bit for bit where it
stopped. A chunk's time is the whole call (loading, resuming, the steps, the checkpoint), so chunking costs every
contender a little start-up. Curve points at ``FRACTIONS`` of the budget (the latent model: those after its
autoencoder's share; the cascade: both stages trained to their share of the fraction) are each evaluated.

Metrics (every point): FID in the own digits feature space of ``--n`` samples (default 898, half the real digits)
against one half of the real digits, the floor the other half against it (``bench_few_step.DigitsRef``, the
definition of ``bench_trained.py``), every model sampled with ``--sampler`` at ``--steps`` steps (default
DPM-Solver++(2M), 20 steps; the cascade: that per stage), all from seed ``--seed``. Each point's sampling runs in a
fresh Python process (``--child``), which also measures samples per second (n samples in one batch, decoding and
every stage included, after a warm-up of 4 samples x 2 steps) and the peak resident memory of sampling: VmHWM of
/proc/self/status after sampling minus before it (``bench_memory.vm_hwm_mib``, the house way; linux only). The final
cascade is also sampled at ``AUG_LEVELS``. The latent model's ceiling: FID and PSNR of its autoencoder's
reconstructions of the held-out images.

Item 2's comparison (``--sr``): the held-out 16 x 16 images pooled 2 x 2 (y = avgpool2(x)) upsampled by the
cascade's learned super-resolution model (``--sampler``, ``--steps``, aug level 0: the input is exact) and zero-shot
by the pixel model with the posterior samplers ``--sr-methods`` (``app.restore.solve``, ``core.measurements.
Downsample``, sigma_y = 0, ``--sr-nfe`` denoiser calls per sample), next to pixel replication (A^+ y) and bicubic
interpolation and the exact linear inverse U (P U)^-1 y (``linear_inverse``: the 16 x 16 digits are the bilinear
upsampling U of the 8 x 8 ones, so their pools determine them): FID against the training split (the held-out ground
truth is an independent sample; its own FID, at this n, is the floor), PSNR against the ground truth (per image,
peak-to-peak 2, averaged), and the consistency residual |avgpool2(x) - y| (mean and max over pixels).

Target (measured): the latent or the cascaded model reaches the pixel model's final FID in at most half the pixel
model's training time. The time each needs is read off its curve (piecewise linear between points; "<=" when its
first point is already below); when neither does, the page says by how much it misses (the time ratio, or its FID at
half and at the full budget against the pixel model's).

Runs are cached in ``--out/runs/CONTENDER`` with ``bench.json`` (the spec, the parts' steps and seconds, the curve so
far) and resumed when the spec matches (a stopped benchmark continues where it was); ``results.json`` is written after
each contender and merged with earlier runs' contenders. Run: ``make bench-latent`` (about 40 minutes on 2 quiet
cores at the default budget of 540 s per contender), or ``python benchmarks/bench_latent.py --quick`` (a smoke run
of every path in a few minutes, into OUT/quick); ``--report`` rebuilds the page and the figures from results.json
(docs/bench/latent.md, docs/latent_samples.png, docs/latent_fid_time.png, docs/latent_sr.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("pixel", "latent", "cascade")
PARTS = {"pixel": ("pixel",), "latent": ("autoencoder", "latent"), "cascade": ("base", "sr")}
TRAIN_N, SPLIT_SEED = 1500, 14  # training images of the 1797; the other 297 are held out (item 2's inputs)
# configs/digits.yaml's optimisation, with a constant lr after the warm-up (the budget, not a step count, ends a run)
TRAIN = {"process": {"name": "vp"}, "target": "eps", "batch_size": 64, "lr": 1e-3, "warmup": 200,
         "lr_schedule": "constant", "grad_clip": 1.0, "ema_decay": 0.999, "seed": 0, "log_every": 50,
         "checkpoint_every": 10**8, "sample_every": 0, "steps": 10**8}  # fmt: skip
AUTOENCODER = {"latent": [4, 4, 4], "channels": 32, "kl_weight": 1e-6, "batch_size": 64, "lr": 1e-3,
               "warmup": 100, "lr_schedule": "constant", "seed": 0, "log_every": 50, "checkpoint_every": 10**8,
               "steps": 10**8}  # fmt: skip
LOW_RES_NOISE = 0.2
FRACTIONS, QUICK_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0), (0.5, 1.0)
AUG_LEVELS = (0.0, 0.1, 0.2)
SR_METHODS = ("ddrm", "ddnm", "pigdm", "mmps")
BUDGET, QUICK_BUDGET = 540.0, 20.0


class _OutOfTime(KeyboardInterrupt):
    """The training callback's stop: ``train`` and ``train_autoencoder`` save a checkpoint of the last completed step
    on a KeyboardInterrupt and re-raise it, so a run stopped at a time resumes later exactly where it was."""


# -- data ---------------------------------------------------------------------------------------------------------


def split_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(training images, held-out images) of digits16, (N, 1, 16, 16) in [-1, 1], from one seeded permutation."""
    from torchdiffusion.data import load_images

    x, _ = load_images("digits16")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return x[perm[:TRAIN_N]], x[perm[TRAIN_N:]]


def data_files(out: Path) -> dict[str, Path]:
    """The training split as .npz files the configs name: 16 x 16 images and their 2 x 2 average pools (8 x 8)."""
    train16, _ = split_digits()
    files = {"x16": out / "data" / "digits16_train.npz", "x8": out / "data" / "digits16_train_pool2.npz"}
    files["x16"].parent.mkdir(parents=True, exist_ok=True)
    for key, x in (("x16", train16), ("x8", F.avg_pool2d(train16, 2))):
        if not files[key].exists():
            np.savez(files[key], images=x.numpy().astype(np.float32))
    return files


# -- training in chunks -------------------------------------------------------------------------------------------


def configs(files: dict[str, Path], part_dirs: dict[str, Path]) -> dict:
    """The TrainConfig / AutoencoderConfig of every part."""
    from torchdiffusion.app.cli._train_config import IMAGE_NET
    from torchdiffusion.training.autoencoder import AutoencoderConfig
    from torchdiffusion.training.config import TrainConfig

    net = dict(IMAGE_NET)
    return {
        "pixel": TrainConfig(data=str(files["x16"]), net=net, **TRAIN),
        "autoencoder": AutoencoderConfig(data=str(files["x16"]), **AUTOENCODER),
        "latent": TrainConfig(data=str(files["x16"]), net=net, autoencoder=str(part_dirs["autoencoder"]), **TRAIN),
        "base": TrainConfig(data=str(files["x8"]), net=net, **TRAIN),
        "sr": TrainConfig(
            data=str(files["x16"]), net=net, super_resolution=2, low_res_noise=LOW_RES_NOISE, **{**TRAIN, "target": "v"}
        ),  # the library's default for super-resolution: v (config.py)
    }


def train_until(part: str, cfg, run: Path, state: dict, seconds: float) -> None:
    """Train ``run`` until its cumulative wall time (``state["seconds"]``) reaches ``seconds``; updates ``state``."""
    from torchdiffusion.training.autoencoder import train_autoencoder
    from torchdiffusion.training.loop import train

    if state["seconds"] >= seconds:
        return
    fn = train_autoencoder if part == "autoencoder" else train
    start, before = time.perf_counter(), state["seconds"]

    def stop(step, _info):
        state["step"] = step
        if before + time.perf_counter() - start >= seconds:
            raise _OutOfTime

    try:
        fn(cfg, run, resume=True, progress=False, callback=stop)
    except _OutOfTime:
        pass
    finally:  # also on Ctrl-C, after which the loop has saved the steps this time bought
        state["seconds"] = before + time.perf_counter() - start


class Contender:
    """One contender's runs, its bench.json (spec, parts' steps and seconds, curve) and its training schedule."""

    def __init__(self, name: str, root: Path, files: dict, spec: dict):
        self.name, self.dir = name, root / name
        self.runs = {p: self.dir / p for p in PARTS[name]}
        self.cfgs = configs(files, {"autoencoder": root / "latent" / "autoencoder"})
        self.spec = spec | {"configs": {p: self.cfgs[p].to_dict() for p in PARTS[name]}}
        self.spec = json.loads(json.dumps(self.spec))
        self.file = self.dir / "bench.json"
        info = json.loads(self.file.read_text()) if self.file.exists() else None
        if info is None or info["spec"] != self.spec:
            shutil.rmtree(self.dir, ignore_errors=True)
            info = {"spec": self.spec, "parts": {p: {"seconds": 0.0, "step": 0} for p in PARTS[name]}, "curve": []}
        self.info = info

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.info, indent=1))

    def fractions(self, fractions, ae_share: float) -> list[float]:
        return [f for f in fractions if self.name != "latent" or f > ae_share]

    def train_to(self, f: float, budget: float, ae_share: float, base_share: float) -> None:
        """Train every part to its share of f x budget seconds."""
        targets = {
            "pixel": {"pixel": f * budget},
            "latent": {"autoencoder": ae_share * budget, "latent": (f - ae_share) * budget},
            "cascade": {"base": base_share * f * budget, "sr": (1 - base_share) * f * budget},
        }[self.name]
        for part, secs in targets.items():
            try:
                train_until(part, self.cfgs[part], self.runs[part], self.info["parts"][part], secs)
            finally:
                self.save()

    def seconds(self) -> float:
        return sum(p["seconds"] for p in self.info["parts"].values())


# -- sampling (in a fresh process) --------------------------------------------------------------------------------


def load_pipes(kind: str, runs: dict[str, str]) -> list:
    import torchdiffusion as td

    if kind == "cascade":
        return [td.load(runs["base"]), td.load(runs["sr"])]
    return [td.load(runs[kind])]


def draw(kind: str, pipes: list, n: int, *, sampler: str, steps: int, seed: int, aug: float) -> torch.Tensor:
    """n images (n, 1, 16, 16) of a contender, from seed: the pixel model's, the latent model's decoded, or the
    cascade's last stage."""
    from torchdiffusion.app.pipeline import cascade

    g = torch.Generator().manual_seed(seed)
    if kind == "cascade":
        return cascade(pipes, n, steps=steps, aug_level=aug, sampler=sampler, generator=g)
    return pipes[0].sample(n, sampler=sampler, steps=steps, generator=g)


def child(spec: dict) -> dict:
    """In a fresh process: load, warm up, then sample n with the clock and VmHWM read around it; save the images."""
    from dataclasses import replace

    from bench_memory import vm_hwm_mib

    from torchdiffusion.samplers import count_nfe

    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    kind, kw = spec["kind"], {"sampler": spec["sampler"], "seed": spec["seed"], "aug": spec["aug"]}
    pipes = load_pipes(kind, spec["runs"])
    params = sum(sum(q.numel() for q in p.denoiser.parameters()) for p in pipes if hasattr(p.denoiser, "parameters"))
    if pipes[0].autoencoder is not None:
        params += sum(q.numel() for q in pipes[0].autoencoder.autoencoder.parameters())
    draw(kind, pipes, 4, steps=2, **kw)  # lazy initialisation (thread pools, kernels) is not the sampling's cost
    pipes = [replace(p, denoiser=count_nfe(p.denoiser)) for p in pipes]
    before, t0 = vm_hwm_mib(), time.perf_counter()
    x = draw(kind, pipes, spec["n"], steps=spec["steps"], **kw)
    seconds, after = time.perf_counter() - t0, vm_hwm_mib()
    np.save(spec["path"], x.numpy().astype(np.float32))
    batches = -(-spec["n"] // 1000)  # Pipeline.sample's image batch (IMAGE_BATCH)
    return {"sample_seconds": seconds, "samples_per_s": spec["n"] / seconds, "hwm_before_mib": before,
            "hwm_after_mib": after, "peak_added_mib": after - before, "params": params,
            "nfe": [p.denoiser.nfe // batches for p in pipes]}  # fmt: skip


def sample_in_child(kind: str, runs: dict, path: Path, args, aug: float) -> dict:
    spec = {"kind": kind, "runs": {k: str(v) for k, v in runs.items()}, "n": args.n, "seed": args.seed,
            "sampler": args.sampler, "steps": args.steps, "aug": aug, "threads": args.threads,
            "path": str(path)}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"sampling {kind} in a child process failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- one contender ------------------------------------------------------------------------------------------------


def run_contender(c: Contender, args, ref, held_ref, log) -> dict:
    fracs = c.fractions(args.fractions, args.ae_share)
    samples = Path(args.out_dir) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    done = {p["fraction"] for p in c.info["curve"]}
    for f in fracs:
        if f in done:
            continue
        c.train_to(f, args.budget, args.ae_share, args.base_share)
        path = samples / f"{c.name}__{f:g}.npy"
        point = {"fraction": f, "seconds": c.seconds(), "parts": json.loads(json.dumps(c.info["parts"]))}
        point |= sample_in_child(c.name, c.runs, path, args, args.aug_level)
        point |= ref(torch.from_numpy(np.load(path)))
        c.info["curve"].append(point)
        c.save()
        steps = ", ".join(f"{p} {s['step']} steps {s['seconds']:.0f} s" for p, s in point["parts"].items())
        log(f"{c.name} at {f:g} of the budget ({steps}): FID {point['fid']:.2f}, {point['samples_per_s']:.1f}/s")
    res = {"curve": c.info["curve"], "parts": c.info["parts"], "seconds": c.seconds(), "final": c.info["curve"][-1]}
    shutil.copyfile(samples / f"{c.name}__{fracs[-1]:g}.npy", samples / f"{c.name}.npy")
    if c.name == "latent":
        res["autoencoder"] = autoencoder_ceiling(c.runs["autoencoder"], held_ref)
    if c.name == "cascade":
        sweep = c.info.setdefault("aug_sweep", {f"{args.aug_level:g}": res["final"]["fid"]})
        for aug in AUG_LEVELS:
            if f"{aug:g}" not in sweep:
                x = draw("cascade", load_pipes("cascade", c.runs), args.n, sampler=args.sampler, steps=args.steps,
                         seed=args.seed, aug=aug)  # fmt: skip
                sweep[f"{aug:g}"] = ref(x)["fid"]
                c.save()
        res["aug_sweep"] = dict(sorted(sweep.items(), key=lambda kv: float(kv[0])))
    return res


def autoencoder_ceiling(run: Path, held_ref) -> dict:
    """The autoencoder's reconstructions of the held-out images: PSNR and FID (what a perfect latent model gives)."""
    from torchdiffusion.training.autoencoder import decode_latents, encode_dataset, load_autoencoder

    _, held = split_digits()
    ae, meta = load_autoencoder(run)
    s = float(meta["scale_factor"])
    rec = decode_latents(ae, encode_dataset(ae, held, s), s).clamp(-1, 1)
    return {"psnr": psnr(rec, held), "fid": held_ref(rec), "held_fid": held_ref(held), "scale_factor": s,
            "n": len(held)}  # fmt: skip


# -- item 2: learned vs zero-shot super-resolution ----------------------------------------------------------------


class TrainSplitRef:
    """FID in the own digits features against the training split (the reference of the held-out comparisons: the
    held-out originals are then an independent sample, and their own FID is the floor at their n)."""

    def __init__(self, net):
        from torchdiffusion.evaluation.image_metrics import extract_features, feature_statistics, frechet_distance

        self.net, self._x, self._s, self._f = net, extract_features, feature_statistics, frechet_distance
        self.stats = feature_statistics(extract_features(net, split_digits()[0]))

    def __call__(self, x: torch.Tensor) -> float:
        if not bool(torch.isfinite(x).all()):
            return math.nan
        return self._f(*self._s(self._x(self.net, x.float().clamp(-1, 1))), *self.stats)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of 10 log10(2^2 / MSE): images in [-1, 1], peak-to-peak 2."""
    mse = (x.double().clamp(-1, 1) - ref.double()).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4 / mse.clamp_min(1e-20))).mean())


def slug(method: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in method.split(" (")[0])


def linear_inverse(y: torch.Tensor) -> torch.Tensor:
    """x = U (P U)^-1 y: the exact 16 x 16 digit of its 2 x 2 pools y (N, 1, 8, 8). digits16 is the bilinear 2x
    upsampling U of the 8 x 8 digits (``data.load_digits``), so x = U x8 and y = P U x8 with P the 2 x 2 average
    pooling; P U is the blur [1/8, 3/4, 1/8] per axis ([7/8, 1/8] at the borders), diagonally dominant and so
    invertible: no detail is missing from y, and the super-resolution of these digits has one exact answer."""

    def up(z):
        return F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)

    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    m = F.avg_pool2d(up(basis), 2).reshape(64, 64)  # row i: P U e_i, so y = x8 @ m (flattened)
    x8 = torch.linalg.solve(m.T, y.double().flatten(1).T).T.reshape(-1, 1, 8, 8)
    return up(x8).clamp(-1, 1)


def sr_comparison(pixel_run: Path, sr_run: Path, args, held_ref, log) -> dict:
    from dataclasses import replace

    import torchdiffusion as td
    from torchdiffusion.app.restore import solve
    from torchdiffusion.core.measurements import Downsample, Measurement
    from torchdiffusion.samplers import count_nfe

    _, held = split_digits()
    held = held[: args.held] if args.held else held
    y = F.avg_pool2d(held, 2)
    samples = Path(args.out_dir) / "samples"
    rows = []

    def row(method, nfe, x, seconds):
        x = x.float()
        resid = (F.avg_pool2d(x, 2) - y).abs()
        r = {"method": method, "file": slug(method), "nfe": nfe, "fid": held_ref(x), "psnr": psnr(x, held),
             "residual_mean": float(resid.mean()), "residual_max": float(resid.max()),
             "seconds_per_image": seconds / len(held)}  # fmt: skip
        np.save(samples / f"sr__{r['file']}.npy", x[:16].numpy())
        rows.append(r)
        log(f"sr {method} ({nfe} NFE): FID {r['fid']:.2f}, PSNR {r['psnr']:.2f} dB, residual {r['residual_mean']:.3g}")

    np.save(samples / "sr__input.npy", y[:16].numpy())
    row("ground truth", 0, held, 0.0)
    t0 = time.perf_counter()
    row("A^+ y (pixel replication)", 0, Downsample(2, shape=(1, 16, 16)).pinv(y), time.perf_counter() - t0)
    t0 = time.perf_counter()
    row("linear inverse U (P U)^-1 y", 0, linear_inverse(y), time.perf_counter() - t0)
    t0 = time.perf_counter()
    row("bicubic", 0, F.interpolate(y, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1),
        time.perf_counter() - t0)  # fmt: skip
    sr = td.load(sr_run)
    sr = replace(sr, denoiser=count_nfe(sr.denoiser))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    x = sr.sample(len(held), low_res=y, aug_level=0.0, sampler=args.sampler, steps=args.steps, generator=g)
    row(f"learned SR ({args.sampler}, {args.steps} steps)", sr.denoiser.nfe, x, time.perf_counter() - t0)
    pipe = td.load(pixel_run)
    m = Measurement(Downsample(2, shape=pipe.shape), y.double(), 0.0)
    for method in args.sr_methods:
        counted = replace(pipe, denoiser=count_nfe(pipe.denoiser))
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        x = solve(counted, m, len(held), method=method, nfe=args.sr_nfe, generator=g)
        row(f"{method} (pixel model)", counted.denoiser.nfe, x, time.perf_counter() - t0)
    return {"n": len(held), "nfe": args.sr_nfe, "rows": rows, "held_fid": rows[0]["fid"]}


# -- targets ------------------------------------------------------------------------------------------------------


def _at(curve: list[dict], seconds: float) -> float | None:
    """The curve's FID at ``seconds`` (piecewise linear between points), None outside its points."""
    pts = sorted((p["seconds"], p["fid"]) for p in curve)
    for (s0, f0), (s1, f1) in zip(pts, pts[1:]):
        if s0 <= seconds <= s1:
            return f0 + (f1 - f0) * (seconds - s0) / (s1 - s0)
    return pts[-1][1] if pts and abs(seconds - pts[-1][0]) < 1e-9 else None


def reach(curve: list[dict], level: float) -> tuple[float | None, bool]:
    """(seconds when the curve first reaches FID <= level, interpolated; None if never), and whether that is only an
    upper bound (its first point is already below)."""
    pts = sorted((p["seconds"], p["fid"]) for p in curve)
    for i, (s, f) in enumerate(pts):
        if math.isfinite(f) and f <= level:
            if i == 0:
                return s, True
            s0, f0 = pts[i - 1]
            return s0 + (f0 - level) * (s - s0) / (f0 - f), False
    return None, False


def targets(res: dict) -> list[dict]:
    """The latent or cascaded model reaches the pixel model's final FID in at most half the pixel model's time."""
    c = res.get("contenders", {})
    if "pixel" not in c:
        return []
    level, t_pix = c["pixel"]["final"]["fid"], c["pixel"]["final"]["seconds"]
    own, _ = reach(c["pixel"]["curve"], level)
    out = []
    for name in ("latent", "cascade"):
        if name not in c:
            continue
        curve = c[name]["curve"]
        t, bound = reach(curve, level)
        t_row = {"contender": name, "pixel_fid": level, "pixel_seconds": t_pix, "pixel_reach_seconds": own}
        t_row |= {"reach_seconds": t, "upper_bound": bound, "ratio": None if t is None else t / t_pix}
        t_row |= {"fid_at_half": _at(curve, t_pix / 2), "final_fid": c[name]["final"]["fid"]}
        t_row["ok"] = t is not None and t <= 0.5 * t_pix
        out.append(t_row)
    return out


# -- report -------------------------------------------------------------------------------------------------------


def _time(s) -> str:
    return "—" if s is None else f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def _band(f) -> str:
    return f"{f['mean']:.2f} ± {2 * f['sd']:.2f}"


def _steps(parts: dict) -> str:
    return " + ".join(f"{p} {s['step']}" for p, s in parts.items())


def write_markdown(path: Path, d: dict, figs: str) -> None:
    cfg, c = d["config"], d.get("contenders", {})
    quick = " (--quick: a smoke run, not a measurement)" if cfg["quick"] else ""
    lines = [
        f"# Bigger images for the same cost: pixel, latent and cascaded diffusion on the digits{quick}\n",
        "Generated by `make bench-latent` (`python benchmarks/bench_latent.py --out bench-output/latent`; `--report "
        "bench-output/latent/results.json` rebuilds this page and the figures). Issue #14, items 2 and 4.\n",
        f"{cfg['machine']}, {cfg['threads']} thread(s) for training and sampling, torch {cfg['torch']}; budget "
        f"{cfg['budget']:.0f} s of training wall time per contender; {cfg['train_n']} training digits (16 x 16), "
        f"{cfg['held_n']} held out; FID of n = {cfg['n']} samples ({cfg['sampler']}, {cfg['steps']} steps per stage, "
        f"seed {cfg['seed']}). Wall time of the runs that made this page: {d.get('wall_time_min', 0):.1f} min.\n",
        "Every diffusion network is the command line's image U-Net (channels 32, mult [1, 2, 2], attention at 4; VP, "
        "eps (the super-resolution U-Net v), batch 64, lr 1e-3 constant after 200 warm-up steps, EMA 0.999). Latent: "
        "the KL autoencoder 16 x 16 x 1 "
        f"-> 4 x 4 x 4 gets {cfg['ae_share']:.0%} of the budget, the latent U-Net the rest. Cascade: a base U-Net on "
        f"avgpool2(x) (8 x 8) and an 8 -> 16 super-resolution U-Net (augmentation up to {LOW_RES_NOISE}), "
        f"{cfg['base_share']:.0%} / {1 - cfg['base_share']:.0%} of the budget, sampled at aug level "
        f"{cfg['aug_level']:g}. Training time: the wall time of the training calls, chunked (start-up and one "
        "checkpoint per chunk included); the machine ran nothing else of ours during the runs.\n",
        "FID: in the own digits feature space (not comparable with published FID), against one half of the real "
        f"digits; floor (the other half against it, mean ± 2 sd): {_band(d['floor']['fid'])}. Differences inside "
        "about 2 sd of the floor are noise. Memory: peak resident set (VmHWM) added by sampling n images in one "
        "batch, in a fresh process after loading and a warm-up.\n",
    ]
    if c:
        lines += [
            "## Final models\n",
            "| contender | FID | training steps | training time | NFE per sample | samples / s | peak memory added "
            "| peak RSS | parameters |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in c.items():
            f = r["final"]
            lines.append(
                f"| {name} | {f['fid']:.2f} | {_steps(f['parts'])} | {_time(f['seconds'])} | "
                f"{' + '.join(map(str, f['nfe']))} | {f['samples_per_s']:.1f} | {f['peak_added_mib']:.0f} MiB | "
                f"{f['hwm_after_mib']:.0f} MiB | {f['params'] / 1e6:.2f}M |"
            )
        if "latent" in c and "autoencoder" in c["latent"]:
            a = c["latent"]["autoencoder"]
            lines.append(
                f"\nThe latent model's ceiling: its autoencoder reconstructs the {a['n']} held-out digits at "
                f"{a['psnr']:.1f} dB PSNR, FID {a['fid']:.2f} against the training digits (the held-out originals: "
                f"{a['held_fid']:.2f}, the floor at this n); latent scale factor {a['scale_factor']:.3f}."
            )
        if "cascade" in c and "aug_sweep" in c["cascade"]:
            sw = c["cascade"]["aug_sweep"]
            lines.append(
                "\nThe final cascade at other augmentation levels of its low-res input (FID): "
                + ", ".join(f"{k}: {v:.2f}" for k, v in sw.items())
                + "."
            )
        lines += [
            "\n## FID against training time\n",
            "| contender | " + " | ".join(f"{f:g} budget" for f in cfg["fractions"]) + " |",
            "|---|" + "---|" * len(cfg["fractions"]),
        ]
        for name, r in c.items():
            by = {p["fraction"]: p for p in r["curve"]}
            cells = [f"{by[f]['fid']:.2f} ({_time(by[f]['seconds'])})" if f in by else "—" for f in cfg["fractions"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append(f"\n![FID against training time]({figs}latent_fid_time.png)\n")
    tg = d.get("targets", [])
    if tg:
        lines += [
            "## Target\n",
            "The latent or the cascaded model reaches the pixel model's final FID in at most half the pixel model's "
            "training time. Time to reach it: read off the curve (linear between points; <= when the first point is "
            "already below).\n",
            "| contender | pixel final FID (time) | time to reach it | ratio to the pixel time | FID at half the "
            "pixel time | final FID | holds |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in tg:
            reach_s = ("<= " if t["upper_bound"] else "") + _time(t["reach_seconds"]) if t["reach_seconds"] else "never"
            ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}"
            half = "—" if t["fid_at_half"] is None else f"{t['fid_at_half']:.2f}"
            lines.append(
                f"| {t['contender']} | {t['pixel_fid']:.2f} ({_time(t['pixel_seconds'])}) | {reach_s} | {ratio} | "
                f"{half} | {t['final_fid']:.2f} | {'yes' if t['ok'] else 'NO'} |"
            )
        lines.append("\n" + verdict(tg) + "\n")
    if "sr" in d:
        s = d["sr"]
        lines += [
            "## Learned upsampler against zero-shot super-resolution (item 2)\n",
            f"The {s['n']} held-out digits pooled 2 x 2, y = avgpool2(x), upsampled to 16 x 16: by the cascade's "
            "learned super-resolution model (aug level 0), and by the pixel model with posterior samplers "
            f"(`app.restore.solve`, `Downsample(2)`, sigma_y = 0, {s['nfe']} denoiser calls per sample). FID against "
            f"the {d['config']['train_n']} training digits (the held-out ground truth is an independent sample: its "
            "row is the floor at this n); PSNR against the ground truth (per image, peak-to-peak 2, averaged); "
            "residual |avgpool2(x) - y| (mean / max over pixels); NFE counted (per sample).\n",
            "These inputs lose nothing: digits16 is the bilinear 2x upsampling U of the 8 x 8 digits, so y = P U x8 "
            "with P U the blur [1/8, 3/4, 1/8] per axis, which is invertible, and x = U (P U)^-1 y exactly (the "
            "linear-inverse row). Super-resolution of these digits has one right answer; a method's PSNR says how "
            "close it comes to it, and its FID how digit-like its answer is.\n",
            "| method | NFE | FID | PSNR (dB) | residual mean / max | time per image |",
            "|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            fid = "diverged" if not math.isfinite(r["fid"]) else f"{r['fid']:.2f}"
            ps = "∞ (exact)" if r["psnr"] > 150 else f"{r['psnr']:.2f}"
            lines.append(
                f"| {r['method']} | {r['nfe'] or '—'} | {fid} | {ps} | {r['residual_mean']:.3g} / "
                f"{r['residual_max']:.3g} | {r['seconds_per_image'] * 1e3:.1f} ms |"
            )
        lines.append(f"\n![held-out inputs, ground truth and upsamplings]({figs}latent_sr.png)\n")
    lines.append(f"![final samples of each contender]({figs}latent_samples.png)\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def verdict(tg: list[dict]) -> str:
    if any(t["ok"] for t in tg):
        best = min((t for t in tg if t["ok"]), key=lambda t: t["ratio"])
        return (
            f"The target holds: the {best['contender']} model reaches the pixel model's FID in "
            f"{best['ratio']:.2f} of its training time."
        )
    parts = []
    for t in tg:
        if t["ratio"] is not None:
            parts.append(f"the {t['contender']} model needs {t['ratio']:.2f} of the pixel time ({t['ratio'] / 0.5:.2f}"
                         " x the target's half)")  # fmt: skip
        else:
            half = "—" if t["fid_at_half"] is None else f"{t['fid_at_half']:.2f}"
            parts.append(
                f"the {t['contender']} model never reaches it (FID {half} at half and {t['final_fid']:.2f} at the "
                f"full budget, {t['final_fid'] / t['pixel_fid']:.2f} x the pixel model's)"
            )
    return "The target is missed: " + "; ".join(parts) + "."


def _tile(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    x = x[: rows * cols, 0]
    h, w = x.shape[1:]
    return x.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)


def plot_samples(path: Path, out: Path, d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in d.get("contenders", {}) if (out / "samples" / f"{n}.npy").exists()]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.8), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        f = d["contenders"][name]["final"]
        ax.imshow(_tile(np.load(out / "samples" / f"{name}.npy"), 6, 6), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(f"{name}: FID {f['fid']:.2f}\n{_time(f['seconds'])} training", fontsize=9)
        ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: Path, d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = d.get("contenders", {})
    if not c:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    f = d["floor"]["fid"]
    ax.axhspan(max(f["mean"] - 2 * f["sd"], 1e-3), f["mean"] + 2 * f["sd"], color="gray", alpha=0.2)
    ax.axhline(f["mean"], color="gray", ls="--", lw=1, label="floor (real vs real)")
    for (name, r), m in zip(c.items(), "osD"):
        pts = sorted((p["seconds"], p["fid"]) for p in r["curve"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=m, label=name)
    if "pixel" in c:
        pf = c["pixel"]["final"]
        ax.axhline(pf["fid"], color="C0", ls=":", lw=1)
        ax.axvline(pf["seconds"] / 2, color="k", ls=":", lw=1, label="half the pixel model's time")
    ax.set(xlabel="training wall time (s)", ylabel="FID (own features)", yscale="log",
           title=f"digits 16 x 16, {d['config']['threads']} thread(s)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sr(path: Path, out: Path, d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "sr" not in d:
        return
    rows = [("input y (8 x 8)", "input")] + [(r["method"], r["file"]) for r in d["sr"]["rows"]]
    rows = [(t, out / "samples" / f"sr__{m}.npy") for t, m in rows]
    rows = [(t, p) for t, p in rows if p.exists()]
    k = 10
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(0.55 * k + 2.6, 0.62 * len(rows) + 0.3), squeeze=False, layout="constrained"
    )
    for ax, (title, p) in zip(axes[:, 0], rows):
        x = torch.from_numpy(np.load(p)[:k])
        if x.shape[-1] == 8:  # the input, shown at the size of the others (each pixel a 2 x 2 block)
            x = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
        ax.imshow(_tile(x.numpy(), 1, len(x)), cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(title.replace(" (", "\n("), fontsize=7, rotation=0, ha="right", va="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(d: dict, out: Path, doc: Path, figs: Path) -> None:
    d["targets"] = targets(d)
    write_markdown(doc, d, os.path.relpath(figs, doc.parent) + "/")
    plot_samples(figs / "latent_samples.png", out, d)
    plot_curves(figs / "latent_fid_time.png", d)
    plot_sr(figs / "latent_sr.png", out, d)


def print_summary(d: dict) -> None:
    print(f"\nfloor FID {_band(d['floor']['fid'])}")
    for name, r in d.get("contenders", {}).items():
        f = r["final"]
        curve = ", ".join(f"{p['seconds']:.0f} s: {p['fid']:.2f}" for p in r["curve"])
        print(f"  {name:8s} final FID {f['fid']:.2f} ({_steps(f['parts'])}), {f['samples_per_s']:.1f} samples/s, "
              f"+{f['peak_added_mib']:.0f} MiB; curve {curve}")  # fmt: skip
    for r in d.get("sr", {}).get("rows", []):
        print(f"  sr {r['method']:34s} FID {r['fid']:.2f}  PSNR {r['psnr']:.2f}  residual {r['residual_mean']:.3g}")
    if d.get("targets"):
        print(verdict(d["targets"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-output/latent")
    p.add_argument("--models", default="bench-output/models", help="where the own digits feature net is cached")
    p.add_argument("--quick", action="store_true", help=f"budget {QUICK_BUDGET:g} s, n = 200, 10 steps, 32 held-out "
                   "images, 10 NFE: a smoke run into OUT/quick")  # fmt: skip
    p.add_argument("--budget", type=float, default=None, help=f"training seconds per contender (default {BUDGET:g})")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--no-sr", dest="sr", action="store_false", help="skip item 2's super-resolution comparison")
    p.add_argument("--ae-share", type=float, default=0.2, help="the latent contender's autoencoder share of the budget")
    p.add_argument("--base-share", type=float, default=0.5, help="the cascade's base model share of the budget")
    p.add_argument("--aug-level", type=float, default=0.1, help="the cascade's low-res augmentation at sampling")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per stage (default 20; --quick 10)")
    p.add_argument("--n", type=int, default=None, help="samples per FID (default 898, half the real digits)")
    p.add_argument("--held", type=int, default=None, help="held-out images for item 2 (default all 297; --quick 32)")
    p.add_argument("--sr-methods", nargs="+", default=list(SR_METHODS))
    p.add_argument("--sr-nfe", type=int, default=None, help="denoiser calls per zero-shot sample (default 100)")
    p.add_argument("--floor-reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--doc", default=None, help="the page (default docs/bench/latent.md; --quick: OUT/latent.md)")
    p.add_argument("--figs", default=None, help="folder of the figures (default docs/; --quick: OUT)")
    p.add_argument("--report", default=None, metavar="RESULTS", help="only rebuild page and figures from results.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    out = Path(a.out) / "quick" if a.quick else Path(a.out)  # a smoke run never mixes with the real results
    doc = Path(a.doc) if a.doc else (out / "latent.md" if a.quick else ROOT / "docs" / "bench" / "latent.md")
    figs = Path(a.figs) if a.figs else out if a.quick else ROOT / "docs"
    if a.report:
        d = json.loads(Path(a.report).read_text())
        report(d, Path(a.report).parent, doc, figs)
        print_summary(d)
        return
    from bench_few_step import DigitsRef

    a.budget = a.budget or (QUICK_BUDGET if a.quick else BUDGET)
    a.steps = a.steps or (10 if a.quick else 20)
    a.held = a.held if a.held is not None else (32 if a.quick else 0)
    a.sr_nfe = a.sr_nfe or (10 if a.quick else 100)
    a.fractions = QUICK_FRACTIONS if a.quick else FRACTIONS
    if not 0 < a.ae_share < max(a.fractions) or not 0 < a.base_share < 1:
        p.error("--ae-share must lie in (0, 1) and leave the latent model a curve point; --base-share in (0, 1)")
    a.out_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def log(msg):
        print(f"[{(time.time() - start) / 60:5.1f} min] {msg}", flush=True)

    ref = DigitsRef(Path(a.models), 3 if a.quick else a.floor_reps)
    held_ref = TrainSplitRef(ref.net)
    a.n = a.n or (200 if a.quick else ref.half)
    results = out / "results.json"
    d = json.loads(results.read_text()) if results.exists() else {}
    cfg = {"budget": a.budget, "fractions": list(a.fractions), "ae_share": a.ae_share, "base_share": a.base_share,
           "aug_level": a.aug_level, "sampler": a.sampler, "steps": a.steps, "n": a.n, "seed": a.seed,
           "threads": a.threads, "quick": a.quick, "train_n": TRAIN_N, "held_n": len(split_digits()[1]),
           "torch": torch.__version__, "machine": cpu_name()}  # fmt: skip
    if d.get("config", cfg) != cfg:  # another budget or sampler: earlier contenders are not comparable
        d = {}
    d |= {"config": cfg, "floor": ref.floor}
    d.setdefault("contenders", {})
    d.setdefault("seconds", 0.0)
    files = data_files(out)
    spec = {k: cfg[k] for k in ("budget", "fractions", "ae_share", "base_share", "threads", "aug_level", "sampler",
                                "steps", "n", "seed")}  # fmt: skip
    contenders = {}
    for name in a.contenders:
        contenders[name] = c = Contender(name, out / "runs", files, spec)
        t0 = time.time()
        d["contenders"][name] = run_contender(c, a, ref, held_ref, log)
        d["contenders"] = {k: d["contenders"][k] for k in CONTENDERS if k in d["contenders"]}
        d["seconds"] += time.time() - t0
        d["targets"] = targets(d)
        results.write_text(json.dumps(d, indent=1))
        log(f"{name} done")
    runs = out / "runs"
    if a.sr and (runs / "pixel" / "pixel").is_dir() and (runs / "cascade" / "sr").is_dir():
        t0 = time.time()
        d["sr"] = sr_comparison(runs / "pixel" / "pixel", runs / "cascade" / "sr", a, held_ref, log)
        d["seconds"] += time.time() - t0
    d["wall_time_min"] = d["seconds"] / 60
    report(d, out, doc, figs)
    results.write_text(json.dumps(d, indent=1))
    print_summary(d)
    log(f"wall time {(time.time() - start) / 60:.1f} min; {results}, {doc}")


if __name__ == "__main__":
    main()
