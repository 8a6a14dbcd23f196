"""Benchmark: one to four steps (issue #13): progressive distillation, consistency distillation and training, and
rectified-flow reflow, each measured against the exact distribution, next to the teacher with our best sampler.

Cases (``CASES``): the mixtures of ``bench_samplers.make_mixtures`` ("ring8": 8 sharp modes on a ring; "unequal2d":
4 modes of weights 0.5/0.25/0.15/0.1; "mix16d": 5 modes in 16-D) with the exact teacher E[x0 | x_t]
(``GaussianMixture.denoiser``), "mix16d-trained" with an MLP teacher trained on the mixture's samples (once, cached
in ``--out/teachers``; "ring8-trained" and "unequal2d-trained" on request), and "digits" with the digits U-Net of
``bench_trained.py`` (``bench-output/models/digits``) as the teacher.

Students (``METHODS``), all on EDM with an x0-predicting MLP for the mixtures (the trained teacher's own network),
trained on N_DATA exact samples of the mixture (the same file for teacher and students):
    progressive    Salimans & Ho 2022: rounds START_STEPS -> ... -> 4 -> 2 -> 1 DDIM steps, each round's student
                   its next teacher; the 4-, 2- and 1-step students are three rounds' students. Costs are
                   cumulative up to that round.
    cd-ict, cd-cm  consistency distillation (Song et al. 2023, Alg. 2) with the improved recipe (Song & Dhariwal
                   2023) or the original one, the teacher's Heun step between adjacent levels.
    ct-ict, ct-cm  consistency training (no teacher; Song et al. 2023, Alg. 3). The same run serves the exact- and
                   the trained-teacher case of a mixture (it never sees a teacher).
    reflow         Liu et al. 2023: (noise, sample) pairs from the teacher's ODE (UniPC-3, PAIR_STEPS steps; their
                   cost is in the training time), then a Flow model fitted to the straight paths; sampled with
                   Euler on k uniform steps from t = 1 to t = 0 (exactly k network calls). ``--reflow-rounds 2``
                   adds "reflow-2" (round 2, from round 1's pairs) and the straightness of each round.
Every student is sampled at 1, 2 and 4 network evaluations from the same prior draw (seed ``--seed``); NFE is
counted (``count_nfe``), not assumed. The teacher runs every torchdiffusion sampler of ``bench_samplers`` (exact
teacher: VP/lam, EDM/karras and the fitted EDM grid, as there) or of ``bench_trained`` (trained teacher: its own
process and default grids) at 5, 10 and 50 NFE; "teacher best" is ``bench_samplers.best_rows``'s pick (lowest SW2,
or within one floor sd of it the smallest |logp gap|).

Metrics (mixtures): ``bench_samplers.Reference`` (sliced W2 to n exact samples, mixture-weight error, log-density
gap; the floor: the same for independent exact sets of size n). Digits: FID in the own digits feature space against
one half of the real digits, the floor the other half against it (``bench_trained.py``'s definition).
Straightness (reflow, Liu et al. 2023, Eq. 8 on a discretised path): on a 32-step Euler trajectory from z,
mean over steps and samples of |(z - x0_end) - (eps_hat - x0_hat)|^2 / dim: 0 for a straight flow.

Targets (measured): at 2 NFE the best student's SW2 <= 1.5 x the teacher's best 10-NFE SW2; at 1 NFE the best
student's SW2 < the teacher's best 5-NFE SW2 (mixtures; the teacher's value: the lowest of its samplers at that NFE).
On digits (FID, for information) the progressive and cd students start from the teacher's weights (progressive
predicting v: an eps student cannot take one step from pure noise), reflow's from scratch.

Students are cached in ``--out/students/CASE/METHOD`` with ``bench.json`` (spec, steps, seconds) and reused when the
spec matches; ``results.json`` is written after each case and merged (per case and student) with earlier runs.
One thread (``--threads``). Run: ``make bench-few-step`` (about 45 minutes), or ``python benchmarks/bench_few_step.py
--quick`` (a smoke run of every path in a few minutes, into OUT/quick); ``--report`` rebuilds the page and the
figures from results.json (docs/bench/few_step.md, docs/few_step_sw2.png, docs/few_step_digits.png).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_name
from bench_samplers import (
    FIT_LABELS,
    SETUPS,
    OursRunner,
    Reference,
    _ours_specs,
    best_rows,
    default_label,
    make_mixtures,
)
from bench_trained import Ours, ensure_model

from torchdiffusion import EDM, Flow
from torchdiffusion.samplers import count_nfe, sample_euler
from torchdiffusion.training.checkpoint import find_checkpoint, load_denoiser
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.distill import distill
from torchdiffusion.training.loop import train
from torchdiffusion.training.objective import consistency_t_min, is_consistency, kind_sampler

F64, DTYPE = torch.float64, torch.float32
ROOT = Path(__file__).resolve().parent.parent
STUDENT_NFE, TEACHER_NFE = (1, 2, 4), (5, 10, 50)
METHODS = ("progressive", "cd-ict", "cd-cm", "ct-ict", "ct-cm", "reflow")
CASES = {  # name -> (mixture or "digits", teacher)
    "ring8": ("ring8", "exact"),
    "unequal2d": ("unequal2d", "exact"),
    "mix16d": ("mix16d", "exact"),
    "mix16d-trained": ("mix16d", "trained"),
    "digits": ("digits", "trained"),
    "ring8-trained": ("ring8", "trained"),
    "unequal2d-trained": ("unequal2d", "trained"),
}
DEFAULT_CASES = ("ring8", "unequal2d", "mix16d", "mix16d-trained", "digits")
DIGITS_METHODS = ("progressive", "cd-ict", "reflow")  # the default on digits (each costs minutes per 100 steps)
N_DATA = 20_000  # training samples of each mixture (seed DATA_SEED), the teacher's and the students'
DATA_SEED = 7
NET = {"name": "mlp", "width": 256, "depth": 3}
# Optimizer steps per student (progressive: in all, split evenly over its rounds). Chosen so that one student trains
# in about a minute on one shared core (``--steps`` sets them all); the trained teacher: TEACHER_STEPS.
STEPS = {"progressive": 3600, "cd-ict": 3000, "cd-cm": 3000, "ct-ict": 3000, "ct-cm": 3000, "reflow": 3000}
DIGITS_STEPS = {"progressive": 300, "cd-ict": 300, "cd-cm": 300, "ct-ict": 300, "ct-cm": 300, "reflow": 300}
TEACHER_STEPS = 8000
START_STEPS, DIGITS_START_STEPS = 64, 8
PAIR_STEPS, DIGITS_PAIRS, DIGITS_PAIR_STEPS = 50, 2000, 20
# EMA decay per method: the consistency recipes' "cm" target is this EMA, and progressive rounds are short, so 0.99
# (a 100-step memory); reflow is a plain regression (the library's default 0.999).
EMA = {"progressive": 0.99, "cd-ict": 0.99, "cd-cm": 0.99, "ct-ict": 0.99, "ct-cm": 0.99, "reflow": 0.999}
TRAIN_MIX = {"batch_size": 256, "lr": 2e-3, "warmup": 100, "log_every": 100, "checkpoint_every": 10**6}
TRAIN_DIGITS = {"log_every": 25, "checkpoint_every": 10**6, "sample_every": 0, "warmup": 50}
TEACHER_SAMPLERS_DIGITS = ("dpmpp_2m", "unipc_3")  # the two best of bench_trained's digits table
TEACHER_SAMPLERS_TRAINED = ("ddim", "euler", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m", "unipc_2", "unipc_3")
STRAIGHT_STEPS = 32


# -- teachers ---------------------------------------------------------------------------------------------------


def data_file(out: Path, mixture: str, gm) -> Path:
    path = out / "data" / f"{mixture}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        x = gm.sample(N_DATA, generator=torch.Generator().manual_seed(DATA_SEED))
        np.save(path, x.numpy().astype(np.float32))
    return path


def base_config(data: Path) -> TrainConfig:
    return TrainConfig(data=str(data), process={"name": "edm"}, target="x0", net=dict(NET), **TRAIN_MIX)


def trained_teacher(out: Path, mixture: str, data: Path, quick: bool) -> tuple[Path, dict]:
    """The MLP teacher of a mixture (denoising on the data file), trained once into out/teachers/MIXTURE."""
    steps = 300 if quick else TEACHER_STEPS
    cfg = TrainConfig.from_dict({**base_config(data).to_dict(), "steps": steps})
    run, seconds = ensure_model(mixture, cfg, out / "teachers")
    info_file = run / "bench.json"
    if seconds > 0 or not info_file.exists():
        info_file.write_text(json.dumps({"steps": steps, "seconds": seconds}))
    return run, json.loads(info_file.read_text())


def teacher_rows_exact(gm, ref, floor, n, seed, quick) -> list[dict]:
    """Every torchdiffusion sampler of bench_samplers on the exact denoiser, at TEACHER_NFE, on VP/lam and
    EDM/karras; the default sampler also on its fitted grid (each fit costs ~40 s, so only that one)."""
    rows, notes = [], []
    for label, fn, knobs in _ours_specs(quick, notes):
        fit = not quick and label == default_label()[0] and label in FIT_LABELS
        setups = ("VP/lam", "EDM/karras") + (("EDM/fit",) if fit else ())
        for setup in setups:
            process, grid = SETUPS[setup]
            run = OursRunner(fn, knobs, process, grid, gm, n, seed, [] if grid is None else None)
            for b in TEACHER_NFE:
                if (res := run(b, max(TEACHER_NFE))) is not None:
                    rows.append({"library": "teacher", "sampler": label, "setup": setup, "budget": b, "nfe": res[1]})
                    rows[-1] |= ref(res[0])
    return rows


def teacher_rows_trained(den, process, shape, metric, n, seed, names) -> list[dict]:
    """Samplers of ``names`` on a trained teacher's own process and default grids (bench_trained.Ours)."""
    x_T = process.prior_sample((n, *shape), generator=torch.Generator().manual_seed(seed))
    rows = []
    for name in names:
        with torch.no_grad():
            res = Ours(name, process, seed).runs(den, x_T, TEACHER_NFE)
        for b, (x, nfe, steps) in res.items():
            row = {"library": "teacher", "sampler": name, "setup": "own", "budget": b, "nfe": nfe, "steps": steps}
            rows.append(row | metric(x))
    return rows


# -- students -----------------------------------------------------------------------------------------------------


def _finished_at(run_dir: Path) -> float:
    ckpt = find_checkpoint(run_dir)
    return max(p.stat().st_mtime for p in ckpt.iterdir())


def student_dirs(method: str, out: Path, rounds: int) -> dict:
    """{label: {k: run_dir}}: the run that samples at k NFE, per row label of the method."""
    if method == "progressive":
        return {"progressive": {k: out if k == 1 else out / "rounds" / f"{k:04d}-steps" for k in STUDENT_NFE}}
    if method == "reflow":
        dirs = {r: out if r == rounds else out / "rounds" / f"reflow-{r}" for r in range(1, rounds + 1)}
        return {("reflow" if r == 1 else f"reflow-{r}"): dict.fromkeys(STUDENT_NFE, d) for r, d in dirs.items()}
    return {method: dict.fromkeys(STUDENT_NFE, out)}


def train_student(method, out: Path, *, teacher_run, teacher_model, base, steps, digits, rounds, pairs) -> dict:
    """Train (or reuse) one student; returns {"spec", "steps": {label: {k: steps}}, "seconds": {label: {k: s}}}."""
    teacher = None if method.startswith("ct") else str(teacher_run)  # consistency training never sees one
    spec = {"method": method, "teacher": teacher, "base": base.to_dict() if base else None}
    spec |= {"steps": steps, "rounds": rounds if method == "reflow" else None, "ema": EMA[method]}
    spec |= {"pairs": pairs if method == "reflow" else None}
    info_file = out / "bench.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        if info["spec"] == spec:
            return info
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    over = dict(TRAIN_DIGITS if digits else TRAIN_MIX) | {"ema_decay": EMA[method]}
    kw = {"base": base, "teacher_model": teacher_model, "progress": False}
    if teacher_run is not None:
        kw["base"] = None
    t0 = time.time()
    kind, _, recipe = method.partition("-")
    if method == "progressive":
        start = DIGITS_START_STEPS if digits else START_STEPS
        n_rounds = int(math.log2(start))
        per_round = max(1, steps // n_rounds)
        if digits:  # an eps student cannot take one step from pure noise (Salimans & Ho 2022, Sec. 4): predict v
            over |= {"target": "v", "precondition_output": False}
        distill("progressive", teacher_run, out, start_steps=start, steps=per_round, **kw, **over)
        dirs = student_dirs(method, out, rounds)["progressive"]
        done = {
            k: dict(steps=per_round * int(math.log2(start // k)), seconds=_finished_at(d) - t0) for k, d in dirs.items()
        }
        info = {"progressive": done}
    elif kind == "cd":
        if digits:  # Song et al. 2023 start the student from the teacher's weights
            over["init"] = str(teacher_run)
        distill("consistency", teacher_run, out, recipe=recipe, solver="heun", steps=steps, **kw, **over)
        info = {method: {k: dict(steps=steps, seconds=time.time() - t0) for k in STUDENT_NFE}}
    elif kind == "ct":
        cfg = TrainConfig.from_dict(
            {**base.to_dict(), **over, "steps": steps, "objective": "consistency", "distill": {"recipe": recipe}}
        )
        train(cfg, out, progress=False)
        info = {method: {k: dict(steps=steps, seconds=time.time() - t0) for k in STUDENT_NFE}}
    else:
        pair_steps = DIGITS_PAIR_STEPS if digits else PAIR_STEPS
        distill(
            "reflow", teacher_run, out, rounds=rounds, pairs=pairs, pair_steps=pair_steps, steps=steps, **kw, **over
        )
        info = {}
        for label, dirs in student_dirs(method, out, rounds).items():
            r = 1 if label == "reflow" else int(label.split("-")[1])
            info[label] = {k: dict(steps=steps * r, seconds=_finished_at(d) - t0) for k, d in dirs.items()}
    info = json.loads(json.dumps({"spec": spec, "students": info}))  # the k keys as strings, as when reloaded
    info_file.write_text(json.dumps(info, indent=1))
    return info


def sample_student(run_dir: Path, method: str, k: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """n samples of a student at k network evaluations, from the prior draw of ``seed``; (x, counted NFE)."""
    den, process, cfg = load_denoiser(run_dir)
    shape = _shape(cfg)
    g = torch.Generator().manual_seed(seed)
    x = process.prior_sample((n, *shape), generator=g, dtype=DTYPE)
    d = count_nfe(den)
    with torch.no_grad():
        if method.startswith("reflow"):  # Euler on k uniform steps of the straight path, ending at t = 0 exactly
            ts = torch.linspace(float(process.t_max), 0.0, k + 1, dtype=F64)
            out = sample_euler(d, process, x, ts, generator=g, final_denoise=False)
        else:
            sampler, ts, _ = kind_sampler(cfg, process, k)
            extra = {"t_min": consistency_t_min(cfg, process)} if is_consistency(cfg["objective"]) else {}
            out = sampler(d, process, x, ts, generator=g, **extra)
    return out, d.nfe


def _shape(cfg) -> tuple[int, ...]:
    net = cfg["net"]
    if "dim" in net:
        return (int(net["dim"]),)
    return (int(net.get("in_channels", 1)), int(net["image_size"]), int(net["image_size"]))


def straightness(denoiser, z: torch.Tensor, steps: int = STRAIGHT_STEPS) -> float:
    """mean over an Euler trajectory (Flow, t = 1 -> 0 in ``steps`` uniform steps) of
    |(z - x0_end) - (eps_hat - x0_hat)|^2 / dim: the straight path's velocity against the predicted one."""
    seen = []

    def record(x, t, **cond):
        x0 = denoiser(x, t, **cond)
        seen.append((x, t, x0))
        return x0

    process = Flow()
    with torch.no_grad():
        x_end = sample_euler(
            record, process, z.clone(), torch.linspace(1.0, 0.0, steps + 1, dtype=F64), final_denoise=False
        )
        total = 0.0
        for x, t, x0 in seen:
            tt = t.reshape(-1, *([1] * (x.ndim - 1))).to(x)
            eps = (x - (1 - tt) * x0) / tt
            total += float(((z - x_end) - (eps - x0)).pow(2).mean())
    return total / len(seen)


# -- digits ---------------------------------------------------------------------------------------------------------


class DigitsRef:
    """FID in the own digits feature space against half A of the real digits (bench_trained.bench_digits)."""

    def __init__(self, models: Path, floor_reps: int):
        from torchdiffusion.data import load_images
        from torchdiffusion.evaluation.features import feature_net_for
        from torchdiffusion.evaluation.image_metrics import extract_features, feature_statistics, frechet_distance

        self._x, self._s, self._f = extract_features, feature_statistics, frechet_distance
        real, labels = load_images("digits16")
        self.net = feature_net_for("digits16", models / "features", images=real, labels=labels)
        feats = extract_features(self.net, real)
        self.half = len(real) // 2

        def split(r):
            p = torch.randperm(len(real), generator=torch.Generator().manual_seed(40_000 + r))
            return p[: self.half], p[self.half : 2 * self.half]

        self.ref = feature_statistics(feats[split(0)[0]])
        v = [
            frechet_distance(*feature_statistics(feats[b]), *feature_statistics(feats[a]))
            for a, b in map(split, range(floor_reps))
        ]
        self.floor = {"fid": {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))}}

    def __call__(self, x) -> dict:
        if not bool(torch.isfinite(x).all()):
            return {"fid": math.nan}
        return {"fid": self._f(*self._s(self._x(self.net, x.clamp(-1, 1))), *self.ref)}


# -- one case -------------------------------------------------------------------------------------------------------


def run_case(case: str, methods, args, log) -> dict:
    mixture, teacher_kind = CASES[case]
    digits = mixture == "digits"
    out = Path(args.out)
    models = Path(args.models)
    res = {"case": case, "mixture": mixture, "teacher": teacher_kind, "students": {}, "straightness": {}}
    t_case = time.time()
    if digits:
        config = TrainConfig.from_yaml(ROOT / "configs" / "digits.yaml")
        teacher_run, secs = ensure_model("digits", config, models)
        n = args.digits_n or (200 if args.quick else None)
        ref = DigitsRef(models, 3 if args.quick else args.floor_reps)
        n = n or ref.half
        floor, metric, key = ref.floor, ref, "fid"
        den, process, tcfg = load_denoiser(teacher_run)
        res["teacher_info"] = {
            "run": str(teacher_run),
            "steps": tcfg["steps"],
            "seconds": secs or _log_seconds(teacher_run),
        }
        names = TEACHER_SAMPLERS_DIGITS[-1:] if args.quick else TEACHER_SAMPLERS_DIGITS
        trows = cached(
            out,
            case,
            (n, args.seed, names),
            lambda: teacher_rows_trained(den, process, _shape(tcfg), metric, n, args.seed, names),
        )
        teacher_model, base = None, None
    else:
        gm = make_mixtures()[mixture]
        n = args.n
        ref = Reference(gm, n, args.seed)
        floor, metric, key = ref.floor(args.floor_reps, args.seed), ref, "sw2"
        data = data_file(out, mixture, gm)
        base = base_config(data)
        if teacher_kind == "exact":
            teacher_run, teacher_model = None, gm.denoiser(EDM())
            trows = cached(
                out,
                case,
                (n, args.seed, args.quick),
                lambda: teacher_rows_exact(gm, ref, floor, n, args.seed, args.quick),
            )
            res["teacher_info"] = {"run": "exact"}
        else:
            teacher_run, tinfo = trained_teacher(out, mixture, data, args.quick)
            teacher_model = None
            den, process, tcfg = load_denoiser(teacher_run)
            names = TEACHER_SAMPLERS_TRAINED[-2:] if args.quick else TEACHER_SAMPLERS_TRAINED
            ckey = (n, args.seed, names, tinfo["steps"])
            trows = cached(
                out, case, ckey, lambda: teacher_rows_trained(den, process, (gm.dim,), metric, n, args.seed, names)
            )
            res["teacher_info"] = {"run": str(teacher_run)} | tinfo
    log(f"{case}: teacher rows done ({time.time() - t_case:.0f} s)")
    res |= {"floor": floor, "n": n, "metric": key, "teacher_rows": trows}
    best = best_rows(trows, floor if key == "sw2" else None) if key == "sw2" else _best_fid(trows)
    res["teacher_best"] = {str(b): best[("teacher", b)] for b in TEACHER_NFE if ("teacher", b) in best}
    steps_of = DIGITS_STEPS if digits else STEPS
    pairs = (500 if args.quick else DIGITS_PAIRS) if digits else N_DATA
    for method in methods:
        steps = args.steps or (20 if digits and args.quick else 300 if args.quick else steps_of[method])
        share = method.startswith("ct") and not digits  # no teacher: one run per mixture
        sdir = out / "students" / (mixture if share else case) / method
        t0 = time.time()
        info = train_student(
            method, sdir, teacher_run=teacher_run, teacher_model=teacher_model, base=base, steps=steps,
            digits=digits, rounds=args.reflow_rounds, pairs=pairs,
        )  # fmt: skip
        log(f"{case}: {method} trained ({time.time() - t0:.0f} s now; recorded {_secs(info):.0f} s)")
        for label, dirs in student_dirs(method, sdir, args.reflow_rounds).items():
            rows = []
            for k, d in dirs.items():
                x, nfe = sample_student(d, label, k, n, args.seed)
                cost = info["students"][label][str(k)]
                rows.append(
                    {"k": k, "nfe": nfe, **metric(x), "train_steps": cost["steps"], "train_seconds": cost["seconds"]}
                )
                if digits:
                    _save_images(out, case, label, k, x)
            res["students"][label] = {"rows": rows, "shared_with_trained_case": share}
            if label.startswith("reflow"):
                d = dirs[1]
                den_s, proc_s, cfg_s = load_denoiser(d)
                z = proc_s.prior_sample(
                    (min(n, 2000), *_shape(cfg_s)), generator=torch.Generator().manual_seed(args.seed)
                )
                res["straightness"][label] = straightness(den_s, z)
    if not digits and teacher_kind == "exact" and any(m.startswith("reflow") for m in methods):
        z = torch.randn(min(n, 2000), gm.dim, generator=torch.Generator().manual_seed(args.seed), dtype=DTYPE)
        res["straightness"]["teacher (exact, Flow)"] = straightness(gm.denoiser(Flow()), z)
    if digits:
        for r in res["teacher_best"].values():
            _save_teacher_images(out, teacher_run, r, n, args.seed)
    res["seconds"] = time.time() - t_case
    return res


def cached(out: Path, case: str, key, compute) -> list[dict]:
    """The teacher's rows of a case, from out/teacher_rows/CASE.json when computed with the same key (n, seed,
    samplers): a rerun of some students does not redo the teacher's minutes of sampling. Delete it to redo."""
    path, key = out / "teacher_rows" / f"{case}.json", json.loads(json.dumps(key))
    if path.exists() and (d := json.loads(path.read_text()))["key"] == key:
        return d["rows"]
    rows = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "rows": rows}))
    return rows


def _log_seconds(run: Path) -> float:
    """A finished run's training time from its log.csv (log_every steps per row at the logged steps/s)."""
    import csv

    with open(run / "log.csv", newline="") as fh:
        rows = [(int(r["step"]), float(r["steps_per_s"])) for r in csv.DictReader(fh)]
    return sum((s - p) / v for (s, v), (p, _) in zip(rows, [(0, 0.0)] + rows[:-1]) if v > 0)


def _secs(info) -> float:
    return max(c["seconds"] for per in info["students"].values() for c in per.values())


def _best_fid(rows) -> dict:
    best = {}
    for r in rows:
        if math.isfinite(r["fid"]) and (
            ("teacher", r["budget"]) not in best or r["fid"] < best[("teacher", r["budget"])]["fid"]
        ):
            best[("teacher", r["budget"])] = r
    return best


def _save_images(out: Path, case: str, label: str, k: int, x: torch.Tensor) -> None:
    path = out / "images" / f"{case}__{label}__{k}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x[:16].clamp(-1, 1).numpy().astype(np.float32))


def _save_teacher_images(out: Path, run: Path, row: dict, n: int, seed: int) -> None:
    """The first 16 of the teacher's best sampler at this budget (re-run on 16 of the same prior draw)."""
    den, process, cfg = load_denoiser(run)
    x_T = process.prior_sample((n, *_shape(cfg)), generator=torch.Generator().manual_seed(seed))[:16]
    with torch.no_grad():
        res = Ours(row["sampler"], process, seed).runs(den, x_T, (row["budget"],))
    _save_images(out, "digits", f"teacher {row['sampler']}", row["budget"], res[row["budget"]][0])


# -- report -----------------------------------------------------------------------------------------------------------


def targets(case_res) -> list[dict]:
    """Per case: best student at 2 NFE <= 1.5 x teacher's at 10; best at 1 NFE < teacher's at 5 (SW2; digits: FID,
    for information: the issue sets the targets on the mixtures). The teacher's value is the lowest of any of its
    samplers at that NFE (stricter than best_rows' tie-break on the gap)."""
    out = []
    for case, r in case_res.items():
        key = r["metric"]
        tb = {}
        for row in r["teacher_rows"]:
            b = str(row["budget"])
            if math.isfinite(row[key]) and row[key] < tb.get(b, {key: math.inf})[key]:
                tb[b] = row
        band = r["floor"][key]["mean"] + 2 * r["floor"][key]["sd"]
        best = {}
        for label, s in r["students"].items():
            for row in s["rows"]:
                if row["nfe"] == row["k"] and math.isfinite(row[key]) and row[key] < best.get(row["k"], (math.inf,))[0]:
                    best[row["k"]] = (row[key], label)
        for k, b, factor, strict in ((2, "10", 1.5, False), (1, "5", 1.0, True)):
            if k in best and b in tb:
                v, label = best[k]
                limit = factor * tb[b][key]
                ok = v < limit if strict else v <= limit
                t = {"case": case, "metric": key, "nfe": k, "student": label, "value": v, "teacher_nfe": int(b)}
                t |= {"teacher_sampler": f"{tb[b]['sampler']} [{tb[b]['setup']}]", "teacher_value": tb[b][key]}
                t |= {"ratio": v / tb[b][key], "limit": factor, "ok": bool(ok)}
                out.append(t | {"in_band": [bool(x <= band) for x in (v, tb[b][key])]})
    return out


def _fmt(r, key) -> str:
    if key == "fid":
        return "diverged" if not math.isfinite(r["fid"]) else f"{r['fid']:.2f}"
    if not math.isfinite(r["sw2"]):
        return "diverged"
    return f"{r['sw2']:.3f} / {r['weight_err']:.3f} / {r['logp_gap']:+.2f}"


def _band(f) -> str:
    return f"{f['mean']:.3f} ± {2 * f['sd']:.3f}"


def _time(s) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def write_markdown(path: Path, d: dict) -> None:
    cfg, cases = d["config"], d["cases"]
    lines = [
        "# One to four steps: distilled and consistency students against the exact distribution\n",
        "Generated by `make bench-few-step` (`python benchmarks/bench_few_step.py --out bench-output/few_step`; "
        "`--report bench-output/few_step/results.json` rebuilds this page and the figures). Issue #13, item 4.\n",
        f"{cpu_name()}, {cfg['threads']} thread(s), torch {cfg['torch']}; n = {cfg['n']} samples per run (digits: "
        f"{cases.get('digits', {}).get('n', '-')} images), seed {cfg['seed']}; every run starts from the same prior "
        f"draw. Wall time of the runs that made this page (summed, reruns of some students included): "
        f"{d['wall_time_min']:.1f} min (cases: "
        + ", ".join(f"{c} {r['seconds'] / 60:.1f} min" for c, r in cases.items())
        + ").\n",
        "Students: MLP "
        f"{NET['width']}x{NET['depth']} on EDM predicting x0 for the mixtures (reflow: a Flow model), trained on "
        f"{N_DATA} exact samples; the trained mixture teacher is the same MLP trained {TEACHER_STEPS} steps on them. "
        f"Progressive: {START_STEPS} -> 1 DDIM steps (digits {DIGITS_START_STEPS} -> 1; v-prediction), the 4-, 2- and "
        "1-step students are rounds of one run, their costs cumulative. Consistency: the teacher's Heun step (cd) or "
        "no teacher (ct); the ct runs of a mixture serve its exact- and its trained-teacher case. Reflow: pairs "
        f"from the teacher's UniPC-3 ODE ({PAIR_STEPS} steps, {N_DATA} pairs; digits {DIGITS_PAIR_STEPS} steps, "
        f"{DIGITS_PAIRS} pairs; their cost is in the time), sampled with Euler on k uniform steps. Training: steps "
        "and wall time (one thread, a machine shared with other jobs).\n",
        "Cells (mixtures): sliced W2 / mixture-weight error / log-density gap (> 0: too concentrated; < 0: too "
        "spread); digits: FID in the own digits feature space (not comparable with published FID). Teacher: the "
        "best of every torchdiffusion sampler at that NFE (exact teacher: every sampler of bench_samplers on VP/lam "
        "and EDM/karras, the default one also on its fitted grid; trained: its own process and default grids), "
        "picked as bench_samplers does: the lowest SW2, or among those within one floor sd of it the smallest "
        "|logp gap|. Digits students: progressive and cd start from the teacher's weights (Salimans & Ho 2022; "
        "Song et al. 2023), reflow from scratch; a few hundred steps each is what the CPU budget allows.\n",
        "The SW2 of n exact samples is itself far from 0 (the floor: mode weights fluctuate by sqrt(w (1 - w) / n), "
        "and moving mass between modes costs their distance), so SW2 differences inside the floor's band are noise; "
        "the weight error and the logp gap separate models there.\n",
        "## Summary (SW2; digits: FID)\n",
        "| case | floor | teacher 5 | teacher 10 | teacher 50 | best student 1 | best student 2 | best student 4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, r in cases.items():
        key, tb = r["metric"], r["teacher_best"]
        cells = [_band(r["floor"][key])]
        cells += [f"{r2[key]:.3f} ({r2['sampler']})" if (r2 := tb.get(str(b))) else "—" for b in TEACHER_NFE]
        for k in STUDENT_NFE:
            cand = [
                (row[key], label)
                for label, s in r["students"].items()
                for row in s["rows"]
                if row["k"] == k and math.isfinite(row[key])
            ]
            cells.append(f"{min(cand)[0]:.3f} ({min(cand)[1]})" if cand else "—")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    tg = d.get("targets", [])
    if tg:
        lines += [
            "\n## Targets\n",
            "At 2 NFE the best student's SW2 <= 1.5 x the teacher's at 10 NFE; at 1 NFE below the teacher's at 5 "
            "NFE. The teacher's value here is the lowest SW2 of any of its samplers at that NFE (stricter than the "
            "pick of the tables, which breaks SW2 ties by the logp gap); only students whose counted NFE is k count. "
            "The issue sets the targets on the mixtures; the digits rows (FID) are for information.\n",
            "| case | NFE | best student | value | teacher (NFE) | teacher value | ratio | limit | holds "
            "| inside the floor band (student / teacher) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {t['case']} | {t['nfe']} | {t['student']} | {t['metric'].upper()} {t['value']:.3f} | "
            f"{t['teacher_sampler']} ({t['teacher_nfe']}) | "
            f"{t['teacher_value']:.3f} | {t['ratio']:.2f} | {'<=' if t['nfe'] == 2 else '<'} {t['limit']:g} | "
            f"{'yes' if t['ok'] else 'NO'} | {' / '.join('yes' if x else 'no' for x in t['in_band'])} |"
            for t in tg
        ]
    for case, r in cases.items():
        key = r["metric"]
        ti = r.get("teacher_info", {})
        tdesc = "exact denoiser" if ti.get("run") == "exact" else f"`{ti.get('run')}`"
        if "seconds" in ti:
            tdesc += (
                f", trained {ti['steps']} steps in {_time(ti['seconds'])}"
                if ti["seconds"]
                else f", {ti['steps']} steps (cached)"
            )
            tdesc += " (its log.csv's steps/s)" if r["mixture"] == "digits" else ""
        lines += [
            f"\n## {case}\n",
            f"Teacher: {tdesc}. Floor ({'half the real digits against the other' if key == 'fid' else 'exact samples'}"
            ", mean ± 2 sd): " + ", ".join(f"{m} {_band(f)}" for m, f in r["floor"].items()) + ".\n",
            "| model | NFE 1 | NFE 2 | NFE 4 | NFE 5 | NFE 10 | NFE 50 | train steps (1 / 2 / 4) "
            "| train time (1 / 2 / 4) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        tb = r["teacher_best"]
        tcells = ["—"] * 3 + [
            f"{_fmt(x, key)} ({x['sampler']}{', ' + x['setup'] if x['setup'] != 'own' else ''})"
            if (x := tb.get(str(b)))
            else "—"
            for b in TEACHER_NFE
        ]
        lines.append("| teacher (best sampler) | " + " | ".join(tcells) + " | — | — |")
        for label, s in r["students"].items():
            by = {row["k"]: row for row in s["rows"]}
            cells = [
                (_fmt(by[k], key) + (f" ({by[k]['nfe']} NFE)" if by[k]["nfe"] != k else "")) if k in by else "—"
                for k in STUDENT_NFE
            ]
            st = " / ".join(str(by[k]["train_steps"]) for k in STUDENT_NFE if k in by)
            tt = " / ".join(_time(by[k]["train_seconds"]) for k in STUDENT_NFE if k in by)
            shared = " (shared)" if s.get("shared_with_trained_case") and r["teacher"] == "trained" else ""
            lines.append(f"| {label}{shared} | " + " | ".join(cells + ["—"] * 3) + f" | {st} | {tt} |")
        if r.get("straightness"):
            lines.append(
                "\nStraightness (32-step Euler path, mean |(z - x0_end) - (eps_hat - x0_hat)|^2 / dim; 0: straight): "
                + ", ".join(
                    f"{k} {v:.4f}" for k, v in sorted(r["straightness"].items(), key=lambda kv: kv[0][0] != "t")
                )
                + "."
            )
    lines += ["", "![SW2 against NFE](../few_step_sw2.png)", ""]
    if "digits" in cases:
        lines += ["![1-, 2-, 4-step digits next to the teacher's](../few_step_digits.png)", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def plot_sw2(path: Path, d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = d["cases"]
    ncol = min(3, len(cases))
    nrow = -(-len(cases) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(4.4 * ncol, 9), 3.9 * nrow + 0.5), squeeze=False)
    for ax in axes.flat[len(cases) :]:
        ax.axis("off")
    axes = [list(axes.flat)]
    labels = ("progressive", "cd-ict", "cd-cm", "ct-ict", "ct-cm", "reflow", "reflow-2")
    markers, colors = dict(zip(labels, "osD^v*P")), dict(zip(labels, (f"C{i}" for i in range(len(labels)))))
    for ax, (case, r) in zip(axes[0], cases.items()):
        key = r["metric"]
        f = r["floor"][key]
        ax.axhline(f["mean"], color="gray", ls="--", lw=1, label="exact floor")
        ax.axhspan(max(f["mean"] - 2 * f["sd"], 1e-4), f["mean"] + 2 * f["sd"], color="gray", alpha=0.2)
        tb = [r["teacher_best"][str(b)] for b in TEACHER_NFE if str(b) in r["teacher_best"]]
        ax.plot([t["nfe"] for t in tb], [t[key] for t in tb], "k-o", lw=2, label="teacher, best sampler")
        for label, s in r["students"].items():
            rows = [row for row in s["rows"] if math.isfinite(row[key])]
            ax.plot(
                [row["nfe"] for row in rows],
                [row[key] for row in rows],
                marker=markers.get(label, "x"),
                color=colors.get(label),
                ls=":",
                lw=0.8,
                ms=7,
                label=label,
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="NFE",
            ylabel="sliced W2" if key == "sw2" else "FID (own features)",
            title=f"{case} ({'exact' if r['teacher'] == 'exact' else 'trained'} teacher)",
        )
        ax.set_xticks([1, 2, 4, 5, 10, 50], ["1", "2", "4", "5", "10", "50"])
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / (3.9 * nrow + 0.5), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_digits(path: Path, out: Path, d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = d["cases"].get("digits")
    if r is None:
        return
    tb = r["teacher_best"]
    grid = [("teacher", [(f"teacher {tb[str(b)]['sampler']}", b) for b in TEACHER_NFE if str(b) in tb])]
    grid += [(label, [(label, k) for k in STUDENT_NFE]) for label in r["students"]]
    fig, axes = plt.subplots(len(grid), 3, figsize=(6.5, 2.2 * len(grid)), squeeze=False)
    for (_, cells), ax_row in zip(grid, axes):
        for ax, (label, k) in zip(ax_row, cells):
            f = out / "images" / f"digits__{label}__{k}.npy"
            ax.axis("off")
            if not f.exists():
                continue
            x = np.load(f)[:16, 0]
            tile = x.reshape(4, 4, *x.shape[1:]).transpose(0, 2, 1, 3).reshape(4 * x.shape[1], 4 * x.shape[2])
            ax.imshow(tile, cmap="gray", vmin=-1, vmax=1)
            ax.set_title(f"{label}, {k} NFE", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(d: dict, out: Path, doc: Path, figs: Path) -> None:
    d["targets"] = targets(d["cases"])
    write_markdown(doc, d)
    plot_sw2(figs / "few_step_sw2.png", d)
    plot_digits(figs / "few_step_digits.png", out, d)


def print_summary(d: dict) -> None:
    for case, r in d["cases"].items():
        key = r["metric"]
        print(f"\n{case}: floor {key} {_band(r['floor'][key])}")
        for b, t in r["teacher_best"].items():
            print(f"  teacher {b:>3} NFE {t['sampler']} [{t['setup']}]: {_fmt(t, key)}")
        for label, s in r["students"].items():
            print(
                f"  {label:12s} "
                + "  ".join(f"{row['nfe']}: {_fmt(row, key)}" for row in s["rows"])
                + f"  ({s['rows'][0]['train_steps']} steps, {_time(s['rows'][0]['train_seconds'])} for 1 NFE)"
            )
    for t in d.get("targets", []):
        print(
            f"target {t['case']} {t['nfe']} NFE: {t['student']} {t['value']:.3f} vs teacher {t['teacher_value']:.3f} "
            f"-> {t['ratio']:.2f} ({'holds' if t['ok'] else 'FAILS'})"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-output/few_step")
    p.add_argument("--models", default="bench-output/models", help="where bench_trained keeps the digits teacher")
    p.add_argument(
        "--quick", action="store_true", help="n = 1000, 300 steps per student (digits 20), into OUT/quick: a smoke run"
    )
    p.add_argument("--cases", nargs="+", default=None, choices=list(CASES), metavar="CASE", help=f"of {list(CASES)}")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="M", help=f"of {list(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every student (progressive: all rounds)")
    p.add_argument("--reflow-rounds", type=int, default=1, help="2 adds reflow-2 and its straightness")
    p.add_argument("--n", type=int, default=None, help="samples per run (default 4000; 1000 with --quick)")
    p.add_argument("--digits-n", type=int, default=None, help="digits per run (default: half the real set, 898)")
    p.add_argument("--floor-reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", default=None, help="the page (default docs/bench/few_step.md; --quick: OUT/few_step.md)")
    p.add_argument("--report", default=None, metavar="RESULTS", help="only rebuild page and figures from results.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module="torchsde")
    out = Path(a.out) / "quick" if a.quick else Path(a.out)  # a smoke run never mixes with the real results
    doc = Path(a.doc) if a.doc else (out / "few_step.md" if a.quick else ROOT / "docs" / "bench" / "few_step.md")
    figs = out if a.quick else ROOT / "docs"
    if a.report:
        d = json.loads(Path(a.report).read_text())
        report(d, Path(a.report).parent, doc, figs)
        print_summary(d)
        return
    a.n = a.n or (1000 if a.quick else 4000)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    d = json.loads(results.read_text()) if results.exists() else {"cases": {}}
    cfg = {"n": a.n, "seed": a.seed, "threads": a.threads, "quick": a.quick, "torch": torch.__version__}
    d["config"] = cfg
    start = time.time()

    def log(msg):
        print(f"[{(time.time() - start) / 60:5.1f} min] {msg}", flush=True)

    for case in a.cases or DEFAULT_CASES:
        methods = a.methods or (DIGITS_METHODS if CASES[case][0] == "digits" else METHODS)
        new, old = run_case(case, methods, a, log), d["cases"].get(case)
        if old is not None and old.get("n") == new["n"]:  # keep the students of earlier runs not rerun now
            new["students"] = {
                **{k: v for k, v in old["students"].items() if k not in new["students"]},
                **new["students"],
            }
            order = [*METHODS, "reflow-2", "reflow-3"]
            new["students"] = dict(sorted(new["students"].items(), key=lambda kv: order.index(kv[0])))
            new["straightness"] = {**old.get("straightness", {}), **new["straightness"]}
            new["seconds"] += old["seconds"]
        d["cases"][case] = new
        d["cases"] = dict(sorted(d["cases"].items(), key=lambda kv: list(CASES).index(kv[0])))
        d["wall_time_min"] = sum(r["seconds"] for r in d["cases"].values()) / 60
        d["targets"] = targets(d["cases"])
        results.write_text(json.dumps(d, indent=1))
        log(f"{case} done")
    report(d, out, doc, figs)
    results.write_text(json.dumps(d, indent=1))
    print_summary(d)
    log(f"wall time {(time.time() - start) / 60:.1f} min; {results}, {doc}")


if __name__ == "__main__":
    main()
