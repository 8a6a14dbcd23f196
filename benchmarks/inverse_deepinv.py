"""deepinv's posterior samplers on the exact Gaussian-mixture problems of ``inverse_problems.py``.

deepinv 0.5.0 (https://deepinv.github.io) is run as its users run it, with the exact denoiser E[x0 | x_t] of the
problem's prior in place of a network, so what is measured is each method's own approximation of p_t(y | x_t) and
its discretization. Only the step count is chosen, so that the denoiser calls fit the NFE budget.

Importing deepinv without torchvision. ``import deepinv`` imports torchvision (deepinv/__init__.py, "early loading",
and ``from torchvision... import`` in its datasets, transforms, utils and training modules), and the torchvision on
PyPI for torch 2.13.0 is a CUDA build that cannot load here. Where no working torchvision is installed,
``_torchvision_stub`` puts stand-in modules into ``sys.modules`` only while ``import deepinv`` runs and removes them
afterwards; no installed file is touched. The stand-ins are ``types.ModuleType`` objects for torchvision and the
submodules deepinv imports from (transforms, transforms.functional, transforms.v2, datasets, datasets.folder,
datasets.utils, utils, models, io); any attribute of them (deepinv 0.5.0 takes IMG_EXTENSIONS, InterpolationMode,
ToTensor, Compose, CenterCrop, Resize, rotate, crop, make_grid, save_image, download_and_extract_archive) is an
object that raises a RuntimeError naming itself when called. None of them is called by the samplers used here.

Conventions (read from deepinv's source). deepinv's denoisers are ``model(x, sigma)`` for images in [0, 1] with
x = x0 + sigma n on that scale (``MinusOneOneDenoiserWrapper``: "all denoisers in deepinv.models"); its measurements,
physics and data-fidelity terms live in [0, 1] too, and DiffPIR and the SDE samplers map their states to [-1, 1]
and back internally. So each problem is handed to deepinv in [0, 1]: x' = (x + 1) / 2 (the problems lie inside
[-1, 1]), hence y' = A x' + n' with y' = (y + A 1) / 2 and sigma_y' = sigma_y / 2, and the denoiser is
D'(x', s') = (exact_x0(problem, 2 x' - 1, 1, 2 s') + 1) / 2. Samples come back in [0, 1] and are mapped by 2 x' - 1.

Physics: one ``deepinv.physics.DecomposablePhysics`` per problem, from the full SVD of ``problem.operator.matrix()``
(A = U diag(s) V^T, V square so that ``prox_l2`` and ``A_dagger`` are exact; singular values below
max(M, D) eps s_max set to 0), noise model ``GaussianNoise(sigma_y')``. It is what DDRM requires, and it is the
class of deepinv's own ``Inpainting`` (so PiGDM takes its exact spectral inverse, as on deepinv's masks). y is
repeated n times: one posterior sample per batch entry, each with its own noise (ScoreSDE re-noises y per entry).

Methods and their deepinv defaults (NFE = denoiser forward calls per sample, a batch call counted once):
    dinv-dps          ``sampling.DPS`` (Chung et al. 2023, "Diffusion posterior sampling for general noisy inverse
                      problems", ICLR; Algorithm 1): VP-SDE (beta 0.1 .. 20), DDPM ancestral solver, residual-norm
                      guidance with weight 1, clip [-1, 1]. ``num_steps`` = nfe + 1 time points linspace(1, 0): nfe
                      steps, one call each (the last step lands on sigma = 0 and returns the denoised estimate, so
                      no extra final denoising). Backpropagates through every call.
    dinv-diffpir      ``sampling.DiffPIR`` (Zhu et al. 2023, "Denoising diffusion models for plug-and-play image
                      restoration", CVPR workshops; Algorithm 1) with ``optim.data_fidelity.L2()``: zeta 0.1,
                      lambda 7, its DDPM betas 1e-4 .. 0.02 (T = 1000) and its quadratic time spacing;
                      ``max_iter`` = nfe, one call per iteration. The data noise level is read from the physics.
    dinv-ddrm         ``sampling.DDRM`` (Kawar et al. 2022, "Denoising diffusion restoration models", NeurIPS;
                      Eq. 7-8): eta 0.85, etab 1, ``sigmas = np.linspace(1, 0, nfe)`` (its default is
                      linspace(1, 0, 100)): nfe calls, the last one at sigma = 0 (the identity for the exact
                      denoiser). Note: deepinv draws the noise of each state as std * randn / sqrt(2) while it
                      tells the denoiser sigma; that is measured as it is.
  ``sampling.PosteriorDiffusion`` with the configuration of deepinv's example ``demo_noisy_data_fidelity.py``
  (which compares the six terms below): ``VarianceExplodingDiffusion(alpha=0.25)`` (sigma 0.001 .. 80),
  ``EulerSolver(timesteps=linspace(1, 0.001, num_steps))``, ``denoise_output=True``, every term at weight 1.
  ``num_steps`` = nfe: nfe - 1 Euler steps with one call each, plus the final denoising call.
    dinv-dps-annealed ``DPSDataFidelity(guidance="annealed")`` (Chung et al. 2023 with the Gaussian likelihood of
                      variance sigma_y^2 + sigma_t^2, as in the example). Backpropagates through every call.
    dinv-pigdm        ``PiGDMDataFidelity(cg_max_iter=10)`` (Song et al. 2023, "Pseudoinverse-guided diffusion
                      models for inverse problems", ICLR; Algorithm 1). One vector-Jacobian product per call.
    dinv-mmps         ``MomentMatchingDataFidelity(cg_max_iter=3)`` (Rozet et al. 2024, "Learning diffusion priors
                      from observations by expectation maximization", NeurIPS; moment-matching posterior sampling,
                      covariance sigma_t^2 J_D). 1 + 3 vector-Jacobian products per call (one forward).
    dinv-ald          ``ALDDataFidelity()`` (Jalal et al. 2021, "Robust compressed sensing MRI with deep generative
                      priors", NeurIPS): A^T (A x_t - y) / (sigma_y^2 + sigma_t^2). No backpropagation.
    dinv-scoresde     ``ScoreSDEDataFidelity()`` (Song et al. 2021, "Score-based generative modeling through
                      stochastic differential equations", ICLR; Sec. 5, controllable generation): as ALD against y
                      re-noised to sigma_t. No backpropagation.
    dinv-ilvr         ``ILVRDataFidelity()`` (Choi et al. 2021, "ILVR: conditioning method for denoising diffusion
                      probabilistic models", ICCV): as ScoreSDE with A^+ in place of A^T. No backpropagation.

Noiseless problems (sigma_y = 0): the physics gets ``GaussianNoise(0)``, the exact model. PiGDM then solves
(r_t^2 A A^T + sigma_y^2 I) z = r on deepinv's spectral domain, whose directions outside the range of A have
singular value 0, so deepinv divides 0 by 0 there (it does so on its own ``Inpainting`` too; every sample is NaN):
it does not apply. Moment matching solves its system by conjugate gradients, which stay in the range of A: it
applies. DiffPIR's data weight rho_t = lambda sigma_y^2 / sigma_t^2 is then 0 and its proximal step
(gamma = 1 / (2 rho_t)) divides by it (every sample is NaN); users of a noiseless physics (deepinv's default
``ZeroNoise``, which has no sigma) get DiffPIR's own default ``sigma = 0.05`` instead, so DiffPIR gets a
``ZeroNoise`` physics there.

Randomness: the SDE samplers take ``rng`` (a generator seeded with ``seed``, also given to ScoreSDE's and ILVR's
re-noising of y); DDRM and DiffPIR use the global RNG, so every run is inside ``torch.random.fork_rng`` with
``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager

import numpy as np
import torch
from inverse_problems import Problem, exact_x0
from torch import Tensor
from torch.nn import functional as F

__all__ = ["METHODS", "available", "applies", "run"]

F64 = torch.float64
EPS64 = torch.finfo(F64).eps

METHODS: dict[str, str] = {
    "dinv-dps": "deepinv DPS: VP-SDE, DDPM solver, residual-norm guidance (Chung et al. 2023, ICLR)",
    "dinv-diffpir": "deepinv DiffPIR: HQS proximal data step between DDIM-like steps (Zhu et al. 2023, CVPRW)",
    "dinv-ddrm": "deepinv DDRM: SVD-space restoration, eta 0.85 (Kawar et al. 2022, NeurIPS)",
    "dinv-dps-annealed": "deepinv PosteriorDiffusion, VE-SDE Euler, DPS with annealed Gaussian guidance (Chung 2023)",
    "dinv-pigdm": "deepinv PosteriorDiffusion, VE-SDE Euler, PiGDM guidance (Song et al. 2023, ICLR)",
    "dinv-mmps": "deepinv PosteriorDiffusion, VE-SDE Euler, moment-matching guidance (Rozet et al. 2024, NeurIPS)",
    "dinv-ald": "deepinv PosteriorDiffusion, VE-SDE Euler, Score-ALD guidance (Jalal et al. 2021, NeurIPS)",
    "dinv-scoresde": "deepinv PosteriorDiffusion, VE-SDE Euler, Score-SDE guidance (Song et al. 2021, ICLR)",
    "dinv-ilvr": "deepinv PosteriorDiffusion, VE-SDE Euler, ILVR guidance (Choi et al. 2021, ICCV)",
}
_NEED_NOISE = ("dinv-pigdm",)  # deepinv divides 0 by 0 at sigma_y = 0 (module docstring)

# -- importing deepinv without torchvision -------------------------------------------------------------------------

_STUB_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.transforms.v2",
    "torchvision.datasets",
    "torchvision.datasets.folder",
    "torchvision.datasets.utils",
    "torchvision.utils",
    "torchvision.models",
    "torchvision.io",
)
_STUB_MARK = "__torchdiffusion_stub__"


class _Missing:
    """A torchvision object that deepinv names at import time: its attributes are stand-ins too; calling raises."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._name}: torchvision is not installed; deepinv was imported with a stand-in for it "
            "(benchmarks/inverse_deepinv.py), so its image I/O, data sets and transforms are unavailable"
        )

    def __repr__(self) -> str:
        return f"<torchvision stand-in {self._name}>"


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "stand-in for torchvision while deepinv is imported (inverse_deepinv.py)")
    module.__path__ = []  # a package, so that its listed submodules import
    setattr(module, _STUB_MARK, True)

    def __getattr__(attr: str):  # PEP 562: any other name is a stand-in object
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{name}.{attr}")

    module.__getattr__ = __getattr__
    return module


def _is_stub(module) -> bool:
    """Whether ``module`` is one of the stand-ins (read from its __dict__: torch.ops answers any attribute)."""
    return isinstance(module, types.ModuleType) and vars(module).get(_STUB_MARK) is True


@contextmanager
def _torchvision_stub():
    """Stand-in torchvision modules in ``sys.modules`` for the duration of the block, removed afterwards."""
    if "torchvision" in sys.modules:  # a torchvision is loaded already: leave it alone
        yield
        return
    modules = {name: _stub_module(name) for name in _STUB_MODULES}
    for name, module in modules.items():  # bind submodules as attributes, as a real import does
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in modules.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def _forget(prefix: str) -> None:
    for name in [k for k in sys.modules if k == prefix or k.startswith(prefix + ".")]:
        del sys.modules[name]


_DINV = None
_IMPORT_ERROR: str | None = None


def _deepinv():
    """deepinv, imported once: with the installed torchvision if one loads, else with the stand-in."""
    global _DINV, _IMPORT_ERROR
    if _DINV is not None:
        return _DINV
    if _IMPORT_ERROR is not None:
        raise ImportError(_IMPORT_ERROR)
    if importlib.util.find_spec("deepinv") is None:
        _IMPORT_ERROR = "deepinv is not installed (pip install deepinv==0.5.0 --no-deps, see the compare extra)"
        raise ImportError(_IMPORT_ERROR)
    if "deepinv" not in sys.modules and importlib.util.find_spec("torchvision") is not None:
        try:
            importlib.import_module("torchvision")
        except Exception:  # e.g. a CUDA build without its libraries: fall back to the stand-in
            _forget("torchvision")
    try:
        with _torchvision_stub():
            _DINV = importlib.import_module("deepinv")
    except Exception as e:
        _forget("deepinv")
        _IMPORT_ERROR = f"deepinv does not import: {type(e).__name__}: {e}"
        raise ImportError(_IMPORT_ERROR) from e
    return _DINV


def available() -> bool:
    """Whether deepinv imports (with the torchvision stand-in where needed)."""
    try:
        _deepinv()
    except ImportError:
        return False
    return True


# -- the problem in deepinv's conventions --------------------------------------------------------------------------


class ExactDenoiser(torch.nn.Module):
    """The exact denoiser in deepinv's convention: ``model(x, sigma)`` for x = x0 + sigma n with x0 in [0, 1].

    The problem lives in [-1, 1]: 2 x - 1 = (2 x0 - 1) + 2 sigma n, so D(x, sigma) = (E[2 x0 - 1 | 2 x - 1] + 1) / 2
    with the exact denoiser at noise level 2 sigma.
    sigma: a number, a 0-d tensor, or one per example ((B,) or (B, 1, ...)). ``calls`` counts the forward calls.
    """

    def __init__(self, problem: Problem):
        super().__init__()
        self.problem = problem
        self.calls = 0

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=F64).detach().reshape(-1).to(x.device)
        if s.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma has {s.numel()} values for a batch of {x.shape[0]}")
        return (exact_x0(self.problem, 2 * x - 1, 1.0, 2 * s) + 1) / 2


def physics_of(problem: Problem, sigma_y: float | None = None):
    """``DecomposablePhysics`` of the problem's operator in [0, 1] (the same A), noise ``GaussianNoise(sigma_y')``
    with sigma_y' = sigma_y / 2 by default; ``sigma_y=-1`` gives deepinv's noiseless ``ZeroNoise``."""
    dinv = _deepinv()
    A = problem.operator.matrix()  # (M, D) float64
    M, D = A.shape
    U, s, Vh = torch.linalg.svd(A, full_matrices=True)  # U (M, M), s (min(M, D),), Vh (D, D)
    s = torch.where(s > max(M, D) * EPS64 * float(s.max()), s, torch.zeros_like(s))  # numpy's matrix_rank rule
    mask = torch.zeros(1, D, dtype=F64)  # the singular values on the D spectral coordinates
    mask[0, : len(s)] = s
    in_shape, out_shape = problem.shape, problem.operator.out_shape

    def V_adjoint(x):  # (B, *in_shape) -> (B, D): coefficients on the right singular vectors
        return x.reshape(x.shape[0], D) @ Vh.T.to(x)

    def V(z):  # (B, D) -> (B, *in_shape)
        return (z @ Vh.to(z)).reshape(z.shape[0], *in_shape)

    def U_(z):  # (B, D) -> (B, *out_shape): the first M spectral coordinates (the rest have s = 0)
        z = z[:, :M] if D >= M else F.pad(z, (0, M - D))
        return (z @ U.T.to(z)).reshape(z.shape[0], *out_shape)

    def U_adjoint(y):  # (B, *out_shape) -> (B, D)
        w = y.reshape(y.shape[0], M) @ U.to(y)
        return F.pad(w, (0, D - M)) if D >= M else w[:, :D]

    sy = problem.sigma_y / 2 if sigma_y is None else sigma_y
    noise = dinv.physics.ZeroNoise() if sy < 0 else dinv.physics.GaussianNoise(sigma=sy)
    return dinv.physics.DecomposablePhysics(
        U=U_, U_adjoint=U_adjoint, V=V, V_adjoint=V_adjoint, mask=mask, noise_model=noise
    )


def measurement_01(problem: Problem) -> Tensor:
    """y' = (y + A 1) / 2, the observation of x' = (x + 1) / 2 (noise sigma_y / 2), batch 1, float64."""
    ones = torch.ones(1, *problem.shape, dtype=F64)
    return (problem.y.to(F64) + problem.operator(ones)) / 2


# -- the methods ---------------------------------------------------------------------------------------------------


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown deepinv method {method!r}; choose from {list(METHODS)}")


def applies(method: str, problem: Problem) -> bool:
    """Every method takes any linear operator; PiGDM needs sigma_y > 0 (module docstring)."""
    _check(method)
    return not (method in _NEED_NOISE and problem.sigma_y == 0)


def _fidelity(dinv, method: str, g: torch.Generator):
    """The noisy data-fidelity term of a PosteriorDiffusion method, as in deepinv's demo_noisy_data_fidelity.py
    (PosteriorDiffusion hands it the denoiser)."""
    S = dinv.sampling
    return {
        "dinv-dps-annealed": lambda: S.DPSDataFidelity(weight=1.0, guidance="annealed"),
        "dinv-pigdm": lambda: S.PiGDMDataFidelity(weight=1.0, cg_max_iter=10),
        "dinv-mmps": lambda: S.MomentMatchingDataFidelity(weight=1.0, cg_max_iter=3),
        "dinv-ald": lambda: S.ALDDataFidelity(weight=1.0),
        "dinv-scoresde": lambda: S.ScoreSDEDataFidelity(weight=1.0, rng=g),
        "dinv-ilvr": lambda: S.ILVRDataFidelity(weight=1.0, rng=g),
    }[method]()


def run(method: str, problem: Problem, nfe: int, n: int, seed: int) -> tuple[Tensor, int]:
    """n posterior samples (n, *problem.shape) float64 from deepinv's ``method``, and the denoiser calls made.

    Every call is a batch of n (counted once); ``nfe`` >= 2 (the VE-SDE samplers take nfe time points).
    """
    _check(method)
    if not applies(method, problem):
        raise ValueError(f"{method} does not apply to {problem.name} (sigma_y = 0; see inverse_deepinv.py)")
    if nfe < 2:
        raise ValueError(f"nfe must be at least 2, got {nfe}")
    dinv = _deepinv()
    den = ExactDenoiser(problem)
    noiseless_diffpir = method == "dinv-diffpir" and problem.sigma_y == 0
    physics = physics_of(problem, sigma_y=-1.0 if noiseless_diffpir else None)
    y = measurement_01(problem).expand(n, *problem.operator.out_shape).clone()  # one sample per batch entry
    shape = (n, *problem.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        if method == "dinv-dps":
            model = dinv.sampling.DPS(den, num_steps=nfe + 1, rng=g, dtype=F64)
            out = model(y, physics, x_init=shape)
        elif method == "dinv-diffpir":
            model = dinv.sampling.DiffPIR(den, data_fidelity=dinv.optim.data_fidelity.L2(), max_iter=nfe)
            out = model(y, physics)
        elif method == "dinv-ddrm":
            out = dinv.sampling.DDRM(den, sigmas=np.linspace(1, 0, nfe))(y, physics)
        else:
            sde = dinv.sampling.VarianceExplodingDiffusion(alpha=0.25, dtype=F64)
            solver = dinv.sampling.EulerSolver(timesteps=torch.linspace(1.0, 0.001, nfe, dtype=F64), rng=g)
            model = dinv.sampling.PosteriorDiffusion(
                data_fidelity=_fidelity(dinv, method, g),
                denoiser=den,
                sde=sde,
                solver=solver,
                dtype=F64,
            )
            with torch.no_grad():
                out = model(y=y, physics=physics, x_init=shape, denoise_output=True)
    x = (2 * out.detach().to(F64) - 1).reshape(shape)
    return x, den.calls
