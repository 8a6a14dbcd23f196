"""The libraries people use today, driven by an exact denoiser: the anchors of the sampler benchmark.

Both reference libraries are run the way their users run them, with the exact Gaussian-mixture
denoiser E[x0 | x_t] (``torchdiffusion.core.mixture``) in place of a network, so what is measured is
solver error alone.

k-diffusion (Karras et al. 2022 conventions): the model is a denoiser ``model(x, sigma)`` on the
EDM process (alpha = 1, sigma = t); sigmas are its default for EDM-style models,
``get_sigmas_karras(n, 0.002, 80, rho=7)`` with sigma = 0 appended (its last step returns the
denoised value); the start is ``x = sigma_max * randn``. That start ignores the data term of
p_T = sum_k w_k N(m_k, 80^2 + v_k), which is negligible at sigma_max = 80 (a shift of |m| / 80 of
a standard deviation). Its noise comes from the global RNG (``randn_like``, and the seed of the
Brownian tree of the SDE samplers), which the runner seeds inside ``torch.random.fork_rng``.

diffusers: the scheduler loop of its pipelines (``set_timesteps``, ``x = randn * init_noise_sigma``,
``scale_model_input``, ``step``) with an exact epsilon-prediction on the scheduler's own DDPM
process. Notes on matching diffusers' process:
- Its timestep k indexes ``alphas_cumprod[k] = prod_{j<=k} (1 - beta_j)``, i.e. torchdiffusion's
  ``Discrete`` at t = k + 1 (ours has alpha_bar_0 = 1 at t = 0). ``alphas_cumprod`` is computed
  in float32; ``scheduler_process`` uses those very values.
- Sigma-space schedulers (Euler, Heun, LMS) evaluate the model at fractional timesteps whose
  sigma = sqrt((1 - ab) / ab) is interpolated linearly in t; ``DiffusersProcess`` interpolates the
  same way, so the exact eps is exact at every timestep a scheduler asks for. Their model input
  ``scale_model_input(x) = x / sqrt(sigma^2 + 1)`` is the VP state x_t, which is what the exact
  VP eps takes.
- Every scheduler gets the betas 1e-4 .. 0.02 (linear, T = 1000) explicitly: HeunDiscreteScheduler's
  default is Stable Diffusion's 0.00085 .. 0.012, which would be another process. ``clip_sample``
  (DDPM, DDIM; default True, clips x0 to [-1, 1] for images) is turned off since the mixtures reach
  beyond 1. All other knobs stay at their defaults (spacing, final step, solver order).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging

import torch
from torch import Tensor

from torchdiffusion import EDM, GaussianMixture, NoiseProcess
from torchdiffusion.core.process import as_time

__all__ = [
    "load_k_diffusion_sampling",
    "KDIFF_SAMPLERS",
    "kdiff_sigmas",
    "kdiff_steps_for_budget",
    "run_k_diffusion",
    "DIFFUSERS_SCHEDULERS",
    "make_scheduler",
    "DiffusersProcess",
    "scheduler_process",
    "exact_eps",
    "diffusers_steps_for_budget",
    "run_diffusers",
    "diffusers_loop",
    "overhead_cases",
]

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
BETA_KW = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


# -- k-diffusion ------------------------------------------------------------------------------------


def load_k_diffusion_sampling():
    """``k_diffusion.sampling`` without the package's ``__init__``: see ``torchdiffusion.interop.k_diffusion``."""
    from torchdiffusion.interop.k_diffusion import load_k_diffusion_sampling as load

    return load()


# name -> model calls per step; a two-call sampler spends one call on its last step (to sigma = 0).
KDIFF_SAMPLERS = {
    "sample_euler": 1,
    "sample_euler_ancestral": 1,
    "sample_heun": 2,
    "sample_dpm_2": 2,
    "sample_dpm_2_ancestral": 2,
    "sample_lms": 1,
    "sample_dpmpp_2s_ancestral": 2,
    "sample_dpmpp_sde": 2,
    "sample_dpmpp_2m": 1,
    "sample_dpmpp_2m_sde": 1,
    "sample_dpmpp_3m_sde": 1,
}


def kdiff_sigmas(n: int, dtype=torch.float64) -> Tensor:
    """k-diffusion's Karras sigmas for EDM-style models: n noise levels from 80 to 0.002, then 0."""
    K = load_k_diffusion_sampling()
    return K.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, rho=7.0).to(dtype)


def kdiff_steps_for_budget(name: str, nfe: int) -> int:
    """The number n of sigmas (before the appended 0) whose run costs at most ``nfe`` calls:
    n for one-call samplers, 2 (n - 1) + 1 for two-call ones."""
    per = KDIFF_SAMPLERS[name]
    return max(1, nfe if per == 1 else (nfe + 1) // 2)


class _Count:
    def __init__(self, fn):
        self.fn, self.nfe = fn, 0

    def __call__(self, *args, **kwargs):
        self.nfe += 1
        return self.fn(*args, **kwargs)


def kdiff_model(gm: GaussianMixture):
    """The exact denoiser in k-diffusion's calling convention, model(x, sigma) on EDM."""
    process = EDM()

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        return gm.x0_mean(x, process, sigma).to(x.dtype)

    return model


def run_k_diffusion(
    name: str, gm: GaussianMixture, n_samples: int, nfe: int, *, seed: int = 0, dtype=torch.float32, sigmas=None
) -> tuple[Tensor, int]:
    """Run k-diffusion's ``name`` with default knobs within an NFE budget; returns (x0, NFE used)."""
    K = load_k_diffusion_sampling()
    if sigmas is None:
        sigmas = kdiff_sigmas(kdiff_steps_for_budget(name, nfe))
    model = _Count(kdiff_model(gm))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = SIGMA_MAX * torch.randn(n_samples, *gm.shape, dtype=dtype)
        x = getattr(K, name)(model, x, sigmas.to(dtype), disable=True)
    return x, model.nfe


# -- diffusers ----------------------------------------------------------------------------------------

DIFFUSERS_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
)


def make_scheduler(name: str, **overrides):
    """A diffusers scheduler with its defaults, except the linear betas 1e-4 .. 0.02 and no x0 clipping."""
    import diffusers

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # DPMSolverSinglestep warns on odd n
    cls = getattr(diffusers, name)
    kwargs = dict(BETA_KW)
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        kwargs["clip_sample"] = False
    kwargs.update(overrides)
    return cls(**kwargs)


class DiffusersProcess(NoiseProcess):
    """diffusers' DDPM process as a ``NoiseProcess`` on its timestep axis t in [0, T - 1].

    sigma_ve(t) = sqrt((1 - ab) / ab) interpolated linearly between integer t (as its sigma-space
    schedulers do), alpha = 1 / sqrt(1 + sigma_ve^2), sigma = sigma_ve alpha. At integer t this is
    alphas_cumprod[t] exactly.
    """

    def __init__(self, alphas_cumprod: Tensor):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.table = ((1 - ab) / ab).sqrt()
        self.t_min, self.t_max = 0.0, float(len(ab) - 1)

    def _sigma_ve(self, t: Tensor) -> Tensor:
        t = as_time(t).clamp(self.t_min, self.t_max)
        i = t.floor().clamp(max=self.t_max - 1)
        frac = t - i
        i = i.long()
        return self.table[i] * (1 - frac) + self.table[i + 1] * frac

    def alpha(self, t):
        return (1 + self._sigma_ve(t) ** 2).rsqrt()

    def sigma(self, t):
        s = self._sigma_ve(t)
        return s * (1 + s**2).rsqrt()


def scheduler_process(sched) -> DiffusersProcess:
    return DiffusersProcess(sched.alphas_cumprod)


def exact_eps(gm: GaussianMixture, process: NoiseProcess):
    """eps(x_t, t) = (x_t - alpha x0_hat) / sigma with the exact x0_hat: a perfect eps-prediction network."""

    def eps(x: Tensor, t) -> Tensor:
        t = as_time(torch.as_tensor(t)).expand(x.shape[0])
        a, s = process.at(t, x.to(torch.float64))
        x64 = x.to(torch.float64)
        return ((x64 - a * gm.x0_mean(x64, process, t)) / s).to(x.dtype)

    return eps


def diffusers_steps_for_budget(name: str, nfe: int) -> int | None:
    """The largest num_inference_steps whose loop makes at most ``nfe`` model calls (None if none does)."""
    sched = make_scheduler(name)
    for n in range(nfe, 0, -1):
        try:
            sched.set_timesteps(n)
        except ValueError:  # PNDM's Runge-Kutta warm-up needs a few steps
            continue
        if len(sched.timesteps) <= nfe:
            return n
    return None


def run_diffusers(
    name: str,
    gm: GaussianMixture,
    n_samples: int,
    nfe: int,
    *,
    seed: int = 0,
    dtype=torch.float32,
    n_steps: int | None = None,
    sched_kwargs: dict | None = None,
    x: Tensor | None = None,
) -> tuple[Tensor, int]:
    """The standard diffusers sampling loop with an exact eps; returns (x0, NFE used).

    ``n_steps`` overrides the budget's num_inference_steps; ``x`` the initial (unscaled) noise.
    """
    sched = make_scheduler(name, **(sched_kwargs or {}))
    n = n_steps if n_steps is not None else diffusers_steps_for_budget(name, nfe)
    if n is None:
        raise ValueError(f"{name} cannot run within {nfe} NFE")
    sched.set_timesteps(n)
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(n_samples, *gm.shape, generator=gen, dtype=dtype)
    return diffusers_loop(sched, exact_eps(gm, scheduler_process(sched)), x, gen)


def diffusers_loop(sched, eps, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """diffusers' pipeline loop after ``set_timesteps``: scale the noise, then per timestep scale the input,
    call the model, step (passing the generator where ``step`` takes one). Returns (x0, model calls)."""
    x = x * sched.init_noise_sigma
    kw = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    calls = 0
    for t in sched.timesteps:
        model_out = eps(sched.scale_model_input(x, t), t)
        calls += 1
        x = sched.step(model_out, t, x, **kw).prev_sample
    return x, calls


def overhead_cases(model, x: Tensor, steps: int) -> dict:
    """Callables running k-diffusion's sample_euler / sample_dpmpp_2m and diffusers' DDIM, DPMSolverMultistep and
    EulerDiscrete for ``steps`` steps with ``model`` (for the per-step overhead; whichever is installed)."""
    cases = {}
    if (K := load_k_diffusion_sampling()) is not None:
        sig = kdiff_sigmas(steps + 1).to(x.dtype)
        for name in ("sample_euler", "sample_dpmpp_2m"):
            cases[f"k-diffusion/{name}"] = lambda name=name: getattr(K, name)(model, x * SIGMA_MAX, sig, disable=True)
    if importlib.util.find_spec("diffusers") is not None:
        for name in ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"):
            sched = make_scheduler(name)
            cases[f"diffusers/{name}"] = lambda s=sched: (s.set_timesteps(steps), diffusers_loop(s, model, x))
    return cases
