"""What the posterior samplers share: the measurement checked against the batch, and y spread over it."""

from __future__ import annotations

from torch import Tensor

from ..core.measurements import Measurement


def observation(measurement: Measurement, x: Tensor, *, noiseless: str | None = None) -> Tensor:
    """y as a (B, *out_shape) tensor in x's dtype and device, after checking ``measurement`` against x.

    ``noiseless``: the sampler's name when it assumes sigma_y = 0 (it is then refused for sigma_y > 0).
    """
    if not isinstance(measurement, Measurement):
        raise TypeError(f"measurement must be a Measurement(operator, y, sigma_y), got {type(measurement).__name__}")
    A = measurement.operator
    if tuple(x.shape[1:]) != A.in_shape:
        raise ValueError(f"x has examples of shape {tuple(x.shape[1:])}, the operator takes {A.in_shape}")
    if noiseless and measurement.sigma_y > 0:
        raise ValueError(
            f"{noiseless} assumes a noise-free measurement (sigma_y = 0), got sigma_y = {measurement.sigma_y}; "
            "use sample_ddrm, sample_dps or sample_pigdm for noisy y"
        )
    y = measurement.y.to(device=x.device, dtype=x.dtype)
    if y.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"y has a batch of {y.shape[0]}, x of {x.shape[0]}: give one y or one per example")
    return y.expand(x.shape[0], *y.shape[1:])
