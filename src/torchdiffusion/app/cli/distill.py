"""``torchdiffusion distill``: a teacher run in, a few-step student run out (``training.distill``)."""

from __future__ import annotations

from pathlib import Path

import click

from ._shared import _fail, threads_option
from ._train_config import set_option
from .group import main


@main.command()
@click.option(
    "--method",
    type=click.Choice(["progressive", "consistency", "reflow"]),
    required=True,
    help="progressive: halve the DDIM steps round by round (Salimans & Ho 2022); consistency: consistency "
    "distillation (Song et al. 2023); reflow: straighten the flow on the teacher's (noise, sample) pairs "
    "(Liu et al. 2023).",
)
@click.option("--teacher", required=True, type=click.Path(exists=True, file_okay=False), help="The teacher's run.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The student's run directory.")
@click.option("--steps", type=click.IntRange(min=1), default=2000, help="Optimizer steps per round.")
@click.option(
    "--student-steps",
    type=click.IntRange(min=1),
    default=1,
    help="progressive: the last student's sampling steps (a power of 2).",
)
@click.option(
    "--start-steps",
    type=click.IntRange(min=2),
    default=64,
    help="progressive: the teacher's DDIM steps that the first round halves (a power of 2).",
)
@click.option("--recipe", type=click.Choice(["ict", "cm"]), default="ict", help="consistency: the recipe.")
@click.option(
    "--solver", type=click.Choice(["heun", "ddim"]), default="heun", help="consistency: the teacher's ODE step."
)
@click.option("--rounds", type=click.IntRange(min=1), default=1, help="reflow: how many times to straighten.")
@click.option(
    "--pairs", type=click.IntRange(min=1), default=None, help="reflow: couplings per round (default: the data size)."
)
@click.option("--resume", is_flag=True, help="Continue an interrupted distillation (finished rounds are kept).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
@set_option("Override a training field of the student (default: the teacher's), e.g. --set lr=1e-3; repeatable.")
@threads_option
def distill(method, teacher, out, steps, student_steps, start_steps, recipe, solver, rounds, pairs, resume,
            no_progress, sets):  # fmt: skip
    """Distil the --teacher run into a student that samples in 1, 2 or 4 steps, written to --out.

    Sample the student with `torchdiffusion sample --checkpoint OUT --steps K`: it picks the student's sampler.
    """
    from ...training.distill import distill as run_distill

    if not resume and Path(out).exists() and any(Path(out).iterdir()):
        raise click.BadParameter(f"{out} is not empty; choose another --out or pass --resume", param_hint="--out")
    try:
        res = run_distill(
            method, teacher, out, steps=steps, student_steps=student_steps, start_steps=start_steps, recipe=recipe,
            solver=solver, rounds=rounds, pairs=pairs, resume=resume, progress=not no_progress, **dict(sets),
        )  # fmt: skip
    except (ValueError, OSError) as e:
        _fail(e)
    if method == "reflow":
        _report_straightness(teacher, Path(out), rounds)
    loss = f"; final loss {res.history[-1]['loss']:.4g}" if res is not None and res.history else ""
    click.echo(
        f"distilled {teacher} by {method} into {out}{loss}; sample it with: torchdiffusion sample --checkpoint {out}"
    )


def _report_straightness(teacher: str, out: Path, rounds: int, n: int = 1000) -> None:
    """Print and save (out/straightness.json) the straightness of the teacher and of each reflow round's student,
    on the same n noise draws (``evaluation.straightness``, Liu et al. 2023, Eq. 5): it falls as reflow works."""
    import json

    import torch

    from ...evaluation.straightness import straightness
    from ...utils.io import atomic_write
    from ..pipeline import load

    runs = {"teacher": Path(teacher)} | {
        f"reflow-{r}": out if r == rounds else out / "rounds" / f"reflow-{r}" for r in range(1, rounds + 1)
    }
    z = None
    found = {}
    for name, run in runs.items():
        pipe = load(run)
        if z is None:
            z = torch.randn((n, *pipe.shape), generator=torch.Generator().manual_seed(0))
        found[name] = straightness(pipe.denoiser, pipe.process, z)
        click.echo(f"straightness of {name}: {found[name]:.4g}")
    atomic_write(out / "straightness.json", lambda p: p.write_text(json.dumps(found, indent=1)))
