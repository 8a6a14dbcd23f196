"""Posterior samplers for linear inverse problems y = A x0 + sigma_y n (seed 003: inpainting, outpainting,
colorization, super-resolution, restoration), each with the common sampler shape plus the measurement:
``sample_xxx(denoiser, process, x, ts, measurement, *, knobs, generator, callback, **cond)``.

    sample_projection   replacement / projection of the measured part (Song et al. 2021)      sigma_y = 0
    sample_ddnm         range-null space decomposition of x0_hat (Wang et al. 2023)          sigma_y = 0
    sample_dps          diffusion posterior sampling (Chung et al. 2023)                      any sigma_y
    sample_pigdm        pseudo-inverse guidance (Song et al. 2023)                            any sigma_y
    sample_repaint      inpainting with resampling jumps (Lugmayr et al. 2022)                sigma_y = 0, masks
    sample_ddrm         spectral DDIM step in A's SVD (Kawar et al. 2022)                     any sigma_y
    sample_mmps         moment matching: p(x0 | x_t) with the denoiser's own covariance      any sigma_y
                        (Rozet et al. 2024)
    sample_smc          twisted SMC, exact as its particles grow (TDS, Wu et al. 2023)        any sigma_y

``core.measurements`` holds the operators and ``Measurement``; ``core.mixture`` the exact posterior they are
measured against (``GaussianMixture.posterior``).

Editing (``editing.py``; SDEdit from x0' at t0 samples p(x0 | x_t0), the posterior of A = alpha(t0) I,
sigma_y = sigma(t0) for each noise draw):

    sdedit              perturb a guide to t0 = strength of the time range and sample back (Meng et al. 2022)
    ddim_invert         the deterministic DDIM map from data to noise (Song, Meng & Ermon 2021, Sec. 4.3)
    interpolate         slerp between two latents (Shoemake 1985)
    ddim_interpolate    invert two examples, slerp their latents, decode with DDIM
"""

from .ddnm import sample_ddnm
from .ddrm import sample_ddrm
from .dps import sample_dps
from .editing import ddim_interpolate, ddim_invert, interpolate, sdedit
from .mmps import sample_mmps
from .pigdm import sample_pigdm
from .projection import sample_projection
from .repaint import sample_repaint
from .smc import sample_smc

__all__ = ["sample_projection", "sample_ddnm", "sample_dps", "sample_pigdm", "sample_repaint", "sample_ddrm"]
__all__ += ["sample_smc", "sample_mmps"]
__all__ += ["sdedit", "ddim_invert", "interpolate", "ddim_interpolate"]
