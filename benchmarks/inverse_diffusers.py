"""diffusers' RePaintScheduler on the exact Gaussian-mixture inpainting problems of ``inverse_problems.py``.

RePaint (Lugmayr et al. 2022, "RePaint: inpainting using denoising diffusion probabilistic models", CVPR;
Algorithm 1 with the resampling schedule of its Section 4.2 / Figure 9): at every reverse step the known part of x
is replaced by the observation noised to the step's level, and every ``jump_length`` steps the chain jumps forward
(re-noises) ``jump_length`` steps and redoes them, ``jump_n_sample`` - 1 extra times, to harmonize the two parts.

Driven exactly as ``RePaintPipeline.__call__`` (diffusers 0.42.1) drives it: ``image = randn_tensor(shape,
generator)``; ``scheduler.set_timesteps(num_inference_steps, jump_length, jump_n_sample)``; ``scheduler.eta = eta``;
then for each t of ``scheduler.timesteps``: if t < t_last, ``step(model_output, t, image, original_image,
mask_image, generator)``, else ``undo_step(image, t_last, generator)``. The pipeline's last line maps the image to
[0, 1] and clamps it there; the samples are returned before that mapping (the clamp would not bind: see below).

Model: the exact epsilon prediction on the scheduler's own DDPM process. Its timestep k has
alpha_bar = ``scheduler.alphas_cumprod[k]`` (float32, as the scheduler computes it) and x_k = sqrt(alpha_bar) x0 +
sqrt(1 - alpha_bar) eps, so eps = (x - sqrt(alpha_bar) E[x0 | x_k = x]) / sqrt(1 - alpha_bar) with
E[x0 | x] = ``exact_x0(problem, x, sqrt(alpha_bar), sqrt(1 - alpha_bar))``.

Settings, all diffusers' defaults but the step count: ``RePaintScheduler()`` (T = 1000, linear betas 1e-4 .. 0.02,
``clip_sample=True``), the pipeline's ``eta=0.0``, ``jump_length=10``, ``jump_n_sample=10``.
``num_inference_steps`` (the pipeline's default: 250) is the largest whose schedule makes
at most ``nfe`` model calls, counting every forward (denoising) step, re-done ones included. With the default
jumps a schedule of N > 10 steps costs N + 90 ceil((N - 10) / 10) calls, so budgets of 20 .. 100 calls get N = 10
(10 calls, no jump at all) and 250 gets N = 30 (210 calls).

clip_sample clips the predicted x0 to [-1, 1]. It is left on because it does not bind: the exact E[x0 | x_t] is a
responsibility-weighted mean of the components' posterior means, which stay inside [-1, 1] on these problems (they
keep means and 4 standard deviations inside it). ``repaint`` reports the largest |x0| predicted in a run: 0.65 on
ring2d-s0 and 0.52 on img8-box at nfe 250, n = 1000; the tests check that it stays below 1.

Mask convention: diffusers' ``mask_image`` is 1 where the original image is kept and 0 where it is inpainted
(``step``: ``mask * prev_known_part + (1 - mask) * prev_unknown_part``; the pipeline doc: "0.0 define which part of
the original image to inpaint"), which is ``problem.mask()``. ``original_image`` is the observation y (the kept
entries, zeros elsewhere). RePaint assumes noiseless observations under a mask: it applies to ``problem.is_mask``
with sigma_y = 0 only.

All randomness comes from one ``torch.Generator`` seeded with ``seed`` (the start, ``step``'s and ``undo_step``'s
noise). Each model call is a batch of n (counted once); nothing backpropagates.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache

import torch
from inverse_problems import Problem, exact_x0
from torch import Tensor

__all__ = ["METHODS", "available", "applies", "run", "repaint", "repaint_calls", "repaint_steps"]

F64, F32 = torch.float64, torch.float32
JUMP_LENGTH, JUMP_N_SAMPLE, ETA = 10, 10, 0.0  # RePaintPipeline.__call__'s defaults

METHODS: dict[str, str] = {
    "diffusers-repaint": "diffusers RePaintScheduler, DDIM steps with resampling jumps 10 x 10 (Lugmayr et al. 2022, "
    "CVPR)",
}


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown diffusers method {method!r}; choose from {list(METHODS)}")


@lru_cache(maxsize=1)
def _scheduler_class():
    return importlib.import_module("diffusers").RePaintScheduler


def available() -> bool:
    """Whether diffusers (with its RePaintScheduler) imports."""
    if importlib.util.find_spec("diffusers") is None:
        return False
    try:
        _scheduler_class()
    except Exception:
        return False
    return True


def applies(method: str, problem: Problem) -> bool:
    """Inpainting masks with noiseless observations only."""
    _check(method)
    return problem.is_mask and problem.sigma_y == 0


def _walk(timesteps: Tensor):
    """The pipeline's loop: (t, True) for a denoising step at t, (t_last, False) for an undo_step from t_last."""
    t_last = int(timesteps[0]) + 1
    for t in timesteps.tolist():
        yield (t, True) if t < t_last else (t_last, False)
        t_last = t


def repaint_calls(steps: int, jump_length: int = JUMP_LENGTH, jump_n_sample: int = JUMP_N_SAMPLE) -> int:
    """The model calls (denoising steps, re-done ones included) of the pipeline's loop for ``steps`` steps."""
    sched = _scheduler_class()()
    sched.set_timesteps(steps, jump_length, jump_n_sample)
    return sum(1 for _, denoise in _walk(sched.timesteps) if denoise)


def repaint_steps(nfe: int, jump_length: int = JUMP_LENGTH, jump_n_sample: int = JUMP_N_SAMPLE) -> int:
    """The largest ``num_inference_steps`` whose loop makes at most ``nfe`` model calls (calls grow with steps)."""
    if nfe < 1:
        raise ValueError(f"nfe must be at least 1, got {nfe}")
    steps = 1
    while steps < 1000 and repaint_calls(steps + 1, jump_length, jump_n_sample) <= nfe:
        steps += 1
    return steps


def repaint(
    problem: Problem,
    steps: int,
    n: int,
    seed: int,
    *,
    jump_length: int = JUMP_LENGTH,
    jump_n_sample: int = JUMP_N_SAMPLE,
) -> tuple[Tensor, int, float]:
    """RePaintPipeline's loop with the exact eps: (samples (n, *shape) float64, model calls, max |predicted x0|)."""
    sched = _scheduler_class()()  # diffusers' defaults (module docstring)
    ab = sched.alphas_cumprod  # float32, (1000,)
    g = torch.Generator().manual_seed(seed)
    mask = problem.mask().to(F32)  # 1 = keep, like diffusers' mask_image
    original = problem.y.to(F32)  # (1, *shape): the kept entries, zeros elsewhere
    calls, max_x0 = 0, 0.0

    def model(x: Tensor, t: int) -> Tensor:  # the exact epsilon prediction at diffusers' timestep t
        nonlocal calls, max_x0
        calls += 1
        a, s = float(ab[t]) ** 0.5, (1 - float(ab[t])) ** 0.5
        x0 = exact_x0(problem, x.to(F64), a, s)
        max_x0 = max(max_x0, float(x0.abs().max()))
        return ((x.to(F64) - a * x0) / s).to(x.dtype)

    # RePaintPipeline.__call__, with the U-Net replaced by the exact eps
    image = torch.randn((n, *problem.shape), generator=g, dtype=F32)
    sched.set_timesteps(steps, jump_length, jump_n_sample)
    sched.eta = ETA
    for t, denoise in _walk(sched.timesteps):
        if denoise:
            image = sched.step(model(image, t), t, image, original, mask, g).prev_sample
        else:
            image = sched.undo_step(image, t, g)
    return image.to(F64), calls, max_x0


def run(method: str, problem: Problem, nfe: int, n: int, seed: int) -> tuple[Tensor, int]:
    """n posterior samples (n, *problem.shape) float64 and the model calls made (at most ``nfe``)."""
    _check(method)
    if not applies(method, problem):
        raise ValueError(
            f"{method} does not apply to {problem.name}: RePaint takes an inpainting mask with sigma_y = 0 "
            f"(got {type(problem.operator).__name__}, sigma_y = {problem.sigma_y})"
        )
    x, calls, _ = repaint(problem, repaint_steps(nfe), n, seed)
    return x, calls
