"""Likelihoods of a diffusion model: the variational bounds (``bounds``) and the exact ODE log-likelihood (``ode``).

Convention (once, for this module and ``dequantize``):

- Every result is per example, shape (B,), in nats, summed over the D numbers of an example.
  Bits per dimension = nats / (D ln 2) (``dequantize.bits_per_dim``).
- Signs. ``log_likelihood`` and ``elbo`` return log p(x0) and a lower bound on it (higher is
  better). ``vlb_terms`` and ``vlb`` return losses, as Ho et al. 2020 Eq. 5 writes them:
  L = L_T + sum_t L_{t-1} + L_0 = -ELBO >= -log p(x0).
- Densities are those of x0 in the space the model sees. Data in another space (pixels, 8-bit
  cells) enter through an explicit change of variables: ``dequantize``.
- The prior at the noisy end t_end is N(0, sigma(t_end)^2 I), which is ``process.prior_logp`` at
  the default t_end = t_max: where alpha(t_end) x0 is not negligible, the results include that
  mismatch (a bound says so with its prior term; the ODE likelihood is off by
  log p_T(x_T) - log N(x_T; 0, sigma^2 I)).
- Noise, probes and times come only from ``generator``. Monte-Carlo estimates over several draws
  per example come with their standard error.
- Coefficients and ODE states are float64; the denoiser is called in the dtype of the data.
"""

from .bounds import elbo, vlb, vlb_terms
from .dequantize import bits_per_dim, dequantize, discretized_gaussian_logp, nll_8bit
from .ode import log_likelihood

__all__ = [
    "vlb_terms",
    "vlb",
    "elbo",
    "log_likelihood",
    "bits_per_dim",
    "dequantize",
    "nll_8bit",
    "discretized_gaussian_logp",
]
