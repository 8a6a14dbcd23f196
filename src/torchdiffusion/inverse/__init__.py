"""Posterior samplers for linear inverse problems y = A x0 + sigma_y n (seed 003: inpainting, outpainting,
colorization, super-resolution, restoration), each with the common sampler shape plus the measurement:
``sample_xxx(denoiser, process, x, ts, measurement, *, knobs, generator, callback, **cond)``.

    sample_projection   replacement / projection of the measured part (Song et al. 2021)      sigma_y = 0
    sample_ddnm         range-null space decomposition of x0_hat (Wang et al. 2023)          sigma_y = 0
    sample_dps          diffusion posterior sampling (Chung et al. 2023)                      any sigma_y
    sample_pigdm        pseudo-inverse guidance (Song et al. 2023)                            any sigma_y

``core.measurements`` holds the operators and ``Measurement``; ``core.mixture`` the exact posterior they are
measured against (``GaussianMixture.posterior``).
"""

from .ddnm import sample_ddnm
from .dps import sample_dps
from .pigdm import sample_pigdm
from .projection import sample_projection

__all__ = ["sample_projection", "sample_ddnm", "sample_dps", "sample_pigdm"]
