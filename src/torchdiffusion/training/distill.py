"""Distillation runs: a teacher run in, a few-step student run out (``torchdiffusion distill``).

``distill(method, teacher, out)`` drives ``loop.train`` with the objective of ``training.objective``:

- "progressive" (Salimans & Ho 2022): rounds that halve the steps, ``start_steps`` -> ``student_steps``; round N
  learns N DDIM steps from its teacher's 2N, starts from the teacher's weights, and is the next round's teacher.
  Earlier rounds live in ``out/rounds/NNNN-steps``; the last one is ``out`` itself.
- "consistency" (Song et al. 2023, consistency distillation): one run whose pairs come from the teacher's ``solver``
  step; the recipe ``cm`` or ``ict``.
- "reflow" (Liu et al. 2023): ``rounds`` times, draw (noise, sample) pairs with the teacher's ODE, then fit a
  Flow model to the straight paths between them; round r's student is round r + 1's teacher.

Every round is an ordinary run (checkpoints, log.csv, resume): an interrupted distillation resumes where it stopped,
finished rounds are kept, and each run's config records its objective, its teacher and its options.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.processes import Flow
from ..core.timesteps import grid_lam
from ..names import build_process
from ..samplers import DEFAULT_SAMPLER, progress_callback
from ..utils.io import atomic_write
from .checkpoint import find_checkpoint, load_checkpoint, load_denoiser
from .config import TrainConfig
from .loop import TrainResult, train
from .resolve import load_training_data, resolve_config

__all__ = ["distill", "METHODS", "teacher_pairs"]

METHODS = ("progressive", "consistency", "reflow")


def _done(run_dir: Path, steps: int) -> bool:
    ckpt = find_checkpoint(run_dir)
    return ckpt is not None and load_checkpoint(ckpt).step >= steps


def _run(cfg: TrainConfig, run_dir: Path, resume: bool, progress: bool, teacher=None) -> TrainResult:
    exists = find_checkpoint(run_dir) is not None
    if exists and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume=True (--resume) to continue the distillation"
        )
    if progress:
        tqdm.write(f"{cfg.objective}: {run_dir} (teacher {cfg.teacher}, {cfg.distill})")
    return train(cfg, run_dir, resume=exists, progress=progress, teacher=teacher)


def teacher_pairs(
    model,
    process,
    shape,
    n: int,
    *,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 1000,
    progress: bool = False,
    device="cpu",
):
    """``(samples, noise)`` on the CPU: n draws of the teacher's probability-flow ODE (UniPC-3 on ``grid_lam``,
    ``steps`` steps, on ``device``) and the standard normal noise z each started from (x_T = sigma(t_max) z, drawn
    on the CPU so that one seed gives the same pairs on any device), the couplings of reflow. ``progress``: one
    tqdm bar over every batch's steps."""
    gen = torch.Generator().manual_seed(seed)
    xs, zs = [], []
    ts = grid_lam(process, steps)
    starts = range(0, n, batch_size)
    tick, bar = progress_callback(steps * len(starts), f"reflow pairs ({n})", disable=not progress)
    try:
        with torch.no_grad():
            for start in starts:
                z = torch.randn((min(batch_size, n - start), *shape), generator=gen)
                x_t = (z * process.prior_std).to(device)
                xs.append(DEFAULT_SAMPLER(model, process, x_t, ts, generator=gen, callback=tick).cpu())
                zs.append(z)
    finally:
        bar.close()
    return torch.cat(xs), torch.cat(zs)


def _save_pairs(folder: Path, x: torch.Tensor, z: torch.Tensor) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    images = x.ndim == 4
    data = folder / ("pairs-samples.npz" if images else "pairs-samples.npy")
    noise = folder / "pairs-noise.npy"
    atomic_write(noise, lambda tmp: np.save(tmp, z.numpy().astype(np.float32)))
    if images:
        atomic_write(data, lambda tmp: np.savez(tmp, images=x.numpy().astype(np.float32)))
    else:
        atomic_write(data, lambda tmp: np.save(tmp, x.numpy().astype(np.float32)))
    return os.fspath(data), os.fspath(noise)


def distill(
    method: str,
    teacher: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    base: TrainConfig | None = None,
    teacher_model=None,
    steps: int = 2000,
    student_steps: int = 1,
    start_steps: int = 64,
    recipe: str = "ict",
    solver: str = "heun",
    rounds: int = 1,
    pairs: int | None = None,
    pair_steps: int = 50,
    resume: bool = False,
    progress: bool = True,
    **overrides,
) -> TrainResult:
    """Distil ``teacher`` (a run directory) into a few-step student in ``out``; returns the last round's result.

    Args:
        method: "progressive", "consistency" or "reflow" (the module docstring).
        teacher: the teacher's run; its config is the student's (data, net, process, target), overridden by
            ``base`` and ``overrides`` (TrainConfig fields, e.g. lr=1e-3, batch_size=256).
        teacher_model: a denoiser to use as the teacher instead of loading ``teacher`` (e.g. a mixture's exact
            denoiser, with ``base`` the student's config).
        steps: optimizer steps per round. student_steps, start_steps: progressive's last and first student (powers
            of 2). recipe, solver: consistency distillation's ("cm" / "ict"; "ddim" / "heun").
        rounds: reflow rounds. pairs: reflow couplings per round (default: as many as training examples). pair_steps:
            UniPC steps of each coupling's ODE.
        resume: continue an interrupted distillation (finished rounds are kept).
    """
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {list(METHODS)}")
    if teacher is None and (teacher_model is None or base is None):
        raise ValueError("give a teacher run directory, or teacher_model= with base= (the student's TrainConfig)")
    out = Path(out)
    if base is None:
        base = TrainConfig.from_dict(load_checkpoint(teacher).config)
    label = os.fspath(teacher) if teacher is not None else "python:" + type(teacher_model).__name__
    options = dict(overrides.pop("distill", None) or {})  # e.g. {"form": "v"} or {"t_min": 0.01}: merged below
    common = {**base.to_dict(), "steps": steps, "teacher": label, "init": None, **overrides}
    if method == "consistency":
        # Song et al. 2023 start the student from the teacher; its weights fit a consistency model's output only
        # where the teacher's net is EDM's x0 parameterization, whose c_skip, c_out are the consistency ones at
        # s_min = 0 (core.consistency), so only such a teacher is copied.
        x0_net = base.target == "x0" and base.precondition_output and teacher is not None
        if x0_net and "init" not in overrides:
            common["init"] = os.fspath(teacher)
        cfg = TrainConfig.from_dict(
            {
                **common,
                "objective": "consistency_distillation",
                "distill": {"recipe": recipe, "solver": solver, **options},
            }
        )
        return _run(cfg, out, resume, progress, teacher_model)
    if method == "progressive":
        if common["target"] in ("eps", "score"):  # Salimans & Ho 2022, Sec. 4: the student predicts v
            if progress:
                tqdm.write(f"progressive: the student predicts v, not the teacher's {common['target']!r}")
            common |= {"target": "v", "precondition_output": True}
        common["distill"] = options
    if method == "progressive":
        return _progressive(common, teacher, teacher_model, out, start_steps, student_steps, resume, progress)
    if common.get("class_conditional"):
        raise ValueError(
            "reflow of a class-conditional teacher is not supported: its (noise, sample) pairs carry no labels"
        )
    return _reflow(common, teacher, teacher_model, out, rounds, pairs, pair_steps, resume, progress)


def _progressive(common, teacher, teacher_model, out, start_steps, student_steps, resume, progress):
    for name, n in (("start_steps", start_steps), ("student_steps", student_steps)):
        if n < 1 or n & (n - 1):
            raise ValueError(f"{name} must be a power of 2, got {n}")
    if not start_steps > student_steps:
        raise ValueError(f"start_steps ({start_steps}) must exceed student_steps ({student_steps})")
    options = common.pop("distill")
    n, result = start_steps // 2, None
    prev = os.fspath(teacher) if teacher is not None else None  # the last round's run, once there is one
    while n >= student_steps:
        run_dir = out if n == student_steps else out / "rounds" / f"{n:04d}-steps"
        fields = {"objective": "progressive", "distill": {**options, "steps": n}}
        fields |= {"teacher": prev or common["teacher"], "init": prev or common["init"]}
        cfg = TrainConfig.from_dict({**common, **fields})
        if resume and n != student_steps and _done(run_dir, cfg.steps):
            result = None
        else:
            result = _run(cfg, run_dir, resume, progress, teacher_model if prev is None else None)
        prev = os.fspath(run_dir)
        n //= 2
    return result


def _reflow(common, teacher, teacher_model, out, rounds, pairs, pair_steps, resume, progress):
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    flow, device = {"name": "flow"}, common.get("device", "cpu")
    prev_model = teacher_model
    prev = teacher
    result = None
    for r in range(1, rounds + 1):
        run_dir = out if r == rounds else out / "rounds" / f"reflow-{r}"
        if prev_model is None:  # a run directory: the teacher's, or the last round's
            prev_model, process, _ = load_denoiser(prev, device=device)
        else:  # the teacher given in Python, on the process of the student's base config
            process = build_process(common["process"])
        shape, n_data = _data_facts(common)
        folder = run_dir / "pairs"
        data_file = folder / ("pairs-samples.npz" if len(shape) == 3 else "pairs-samples.npy")
        if not (resume and data_file.exists() and (folder / "pairs-noise.npy").exists()):
            n = pairs or n_data
            x, z = teacher_pairs(prev_model, process, shape, n, steps=pair_steps, progress=progress, device=device)
            data, noise = _save_pairs(folder, x, z)
        else:
            data, noise = os.fspath(data_file), os.fspath(folder / "pairs-noise.npy")
        # A Flow teacher's network already predicts the flow: start from it (Liu et al. 2023 do); others start fresh.
        is_flow = isinstance(build_process(common["process"]), Flow) and common["target"] == "flow"
        init = os.fspath(prev) if prev is not None and (is_flow or r > 1) else None
        label = os.fspath(prev) if prev is not None else common["teacher"]
        fields = {"objective": "reflow", "process": flow, "target": "flow", "data": data, "data_options": {}}
        fields |= {"distill": {"noise": noise, "round": r}, "teacher": label, "init": init, "flip": False}
        fields |= {"precondition_output": True, "weighting": "simple", "class_conditional": False}
        cfg = TrainConfig.from_dict({**common, **fields, "label_dropout": 0.0})
        if resume and r < rounds and _done(run_dir, cfg.steps):
            result = None
        else:
            result = _run(cfg, run_dir, resume, progress)
        prev, prev_model = os.fspath(run_dir), None
    return result


def _data_facts(common) -> tuple[tuple[int, ...], int]:
    """(the shape of one example, the number of training examples) of the student's data."""
    cfg = TrainConfig.from_dict(common)
    data, labels = load_training_data(cfg, generator=torch.Generator().manual_seed(0))
    net = resolve_config(cfg, data, labels).net
    if "dim" in net:
        return (int(net["dim"]),), len(data)
    return (int(net.get("in_channels", 1)), int(net["image_size"]), int(net["image_size"])), len(data)
