"""Autoencoders for latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", Sec. 3 and App. G): diffusion runs on z = E(x) and samples are decoded, x = D(z).

``KLAutoencoder`` is the paper's KL-regularized autoencoder, sized for the CPU: a convolutional encoder gives a
diagonal Gaussian q(z | x) = N(mean, diag exp(logvar)) on a latent image downsampled by a factor f, and a mirrored
decoder maps z back; it is trained with ``objectives.autoencoder.autoencoder_loss`` (reconstruction plus a small
KL to N(0, I)). Layout (the paper's ``AutoencoderKL`` Encoder / Decoder, without their 1x1 ``quant_conv`` /
``post_quant_conv``, which compose with the adjacent linear convolutions into one):

    encoder: conv_in -> [level: num_res_blocks x ResBlock, Downsample except last]
             -> middle: ResBlock, Attention, ResBlock -> GroupNorm, SiLU, conv_out (2 * latent_channels)
    decoder: conv_in -> middle: ResBlock, Attention, ResBlock
             -> [level, reversed: (num_res_blocks + 1) x ResBlock, Upsample except first]
             -> GroupNorm, SiLU, conv_out (in_channels)

``LinearAutoencoder`` is the linear case z = P^T (x - mu), x = P z + mu (PCA when P holds the leading
principal directions): a Gaussian mixture on images stays a Gaussian mixture on its latents
(``core.mixture.FullCovarianceMixture.affine``), so latent diffusion with it has an exact denoiser.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import Attention, _norm

__all__ = ["KLAutoencoder", "LinearAutoencoder", "LOGVAR_MIN", "LOGVAR_MAX"]

# The range the encoder's log-variance is clamped to, as in the paper's code (ldm/modules/distributions,
# DiagonalGaussianDistribution): exp(-30 / 2) ~ 3e-7 is a latent std far below any useful noise and exp(20 / 2)
# ~ 2e4 far above the prior's 1, so the clamp only keeps exp(logvar) and the KL finite early in training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _positive_int(name: str, value) -> int:
    try:
        value = operator.index(value)  # rejects 16.0 instead of truncating it
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class _ResBlock(nn.Module):
    """h = skip(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))): the autoencoder's ResnetBlock (Rombach et al.
    2022, App. G; the block of Ho et al. 2020, App. B without the time embedding). The skip is the identity, or a
    1x1 convolution when the channels change."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _Down(nn.Module):
    """Halve H and W: pad one row and column at the bottom / right, then a 3x3 convolution of stride 2 (the
    paper's ``Downsample``, whose asymmetric padding keeps the output grid aligned with the input's corners)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 convolution (the paper's ``Upsample``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Middle(nn.Module):
    """ResBlock, self-attention (optional), ResBlock at the latent resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block1, self.block2 = _ResBlock(channels, channels, groups), _ResBlock(channels, channels, groups)
        self.attn = Attention(channels, 1, groups) if attention else None

    def forward(self, h: Tensor) -> Tensor:
        h = self.block1(h)
        if self.attn is not None:
            h = self.attn(h)
        return self.block2(h)


class KLAutoencoder(nn.Module):
    """A small KL-regularized convolutional autoencoder (Rombach et al. 2022, Sec. 3 and App. G).

    The encoder gives q(z | x) = N(mean, diag exp(logvar)) on a latent of shape
    ``latent_shape = (latent_channels, H / factor, W / factor)``; ``forward`` draws z = mean + exp(logvar / 2) n,
    n ~ N(0, I) (the reparameterization of Kingma & Welling 2014, Sec. 2.4) and decodes it. Train it with
    ``objectives.autoencoder.autoencoder_loss``; a diffusion model then learns the latents scaled by
    ``objectives.autoencoder.latent_scale_factor`` (the paper's Sec. 4.3.2 / App. G).

    Args (defaults: 16 x 16 x 1 images -> 4 x 4 x 4 latents, 953,321 parameters):
        in_channels: image channels C.           image_size: the training resolution (a multiple of ``factor``);
            other multiples of ``factor`` also run.
        latent_channels: channels of z.          factor: the downsampling factor f, a power of 2 (f = 1: none).
        channels: base width; level i has channels * channel_mult[i].
        channel_mult: one multiplier per level, log2(f) + 1 of them (default 1, then 2 for every further level).
        num_res_blocks: ResBlocks per level in the encoder (one more in the decoder, as in the paper).
        groups: GroupNorm groups (reduced to divide the channels).
        attention: self-attention in the middle blocks (the paper's ``mid.attn_1``).

    ``config`` holds these arguments (JSON-able): ``KLAutoencoder(**config)`` rebuilds the architecture for a
    checkpoint's ``state_dict``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 16,
        latent_channels: int = 4,
        factor: int = 4,
        channels: int = 32,
        channel_mult=None,
        num_res_blocks: int = 1,
        groups: int = 8,
        attention: bool = True,
    ):
        super().__init__()
        in_channels, image_size = _positive_int("in_channels", in_channels), _positive_int("image_size", image_size)
        latent_channels, factor = _positive_int("latent_channels", latent_channels), _positive_int("factor", factor)
        channels, groups = _positive_int("channels", channels), _positive_int("groups", groups)
        num_res_blocks = _positive_int("num_res_blocks", num_res_blocks)
        if factor & (factor - 1):
            raise ValueError(f"factor must be a power of 2 (1, 2, 4, 8, ...), got {factor}")
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be a multiple of the downsampling factor {factor}")
        levels = int(math.log2(factor)) + 1
        channel_mult = [1] + [2] * (levels - 1) if channel_mult is None else list(channel_mult)
        if len(channel_mult) != levels:
            raise ValueError(
                f"channel_mult needs log2(factor) + 1 = {levels} entries (one per level) for factor {factor}, "
                f"got {len(channel_mult)}: {channel_mult}"
            )
        channel_mult = [_positive_int("every channel_mult entry", m) for m in channel_mult]
        self.factor = factor
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            latent_channels=latent_channels,
            factor=factor,
            channels=channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            groups=groups,
            attention=bool(attention),
        )
        widths = [channels * m for m in channel_mult]

        # Encoder
        enc, c = [nn.Conv2d(in_channels, widths[0], 3, padding=1)], widths[0]
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(_ResBlock(c, w, groups))
                c = w
            if level < levels - 1:
                enc.append(_Down(c))
        enc += [
            _Middle(c, groups, attention),
            _norm(c, groups),
            nn.SiLU(),
            nn.Conv2d(c, 2 * latent_channels, 3, padding=1),
        ]
        self.encoder = nn.Sequential(*enc)

        # Decoder
        c = widths[-1]
        dec = [nn.Conv2d(latent_channels, c, 3, padding=1), _Middle(c, groups, attention)]
        for level in reversed(range(levels)):
            for _ in range(num_res_blocks + 1):
                dec.append(_ResBlock(c, widths[level], groups))
                c = widths[level]
            if level > 0:
                dec.append(_Up(c))
        dec += [_norm(c, groups), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(latent_channels, image_size / factor, image_size / factor): the shape of z at the training size."""
        s = self.config["image_size"] // self.factor
        return (self.config["latent_channels"], s, s)

    def _check(self, x: Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels or x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"{what} must be (B, {channels}, H, W) with H and W multiples of {multiple}, got {tuple(x.shape)}"
            )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x): its mean and log-variance, each (B, latent_channels, H / f, W / f). The log-variance is
        clamped to [LOGVAR_MIN, LOGVAR_MAX] = [-30, 20], as in the paper's code."""
        self._check(x, self.config["in_channels"], "x", self.factor)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: Tensor) -> Tensor:
        """The reconstruction D(z), (B, in_channels, h f, w f) for z of shape (B, latent_channels, h, w)."""
        self._check(z, self.config["latent_channels"], "z", 1)
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(recon, mean, logvar): recon = D(z) for one draw z = mean + exp(logvar / 2) n of q(z | x), the noise n
        drawn from ``generator`` (on the model's device), so the loss's gradient reaches the encoder."""
        mean, logvar = self.encode(x)
        n = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + torch.exp(0.5 * logvar) * n), mean, logvar

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LinearAutoencoder(nn.Module):
    """A linear autoencoder: z = P^T (x - mu), x = P z + mu, P (D, r) with orthonormal columns, mu (D,).

    decode(encode(x)) = P P^T (x - mu) + mu is the orthogonal projection onto the affine subspace mu + span(P).
    With P the r leading principal directions (``pca``) it is the best rank-r linear reconstruction in mean
    squared error (Eckart & Young 1936). A Gaussian mixture on x maps to the mixture
    ``mixture.affine(P^T, -P^T mu)`` on z: the closed-form case of latent diffusion (Rombach et al. 2022, Sec. 3).

    Args:
        basis: P, (D, r) with orthonormal columns (to 8 D eps of its dtype).
        mean: mu, D numbers (any shape).
        shape: the event shape of x, default (D,); e.g. (C, H, W).
        latent_shape: the event shape of z, default (r,); e.g. (c, h, w) for a latent image.
    Computations run in the input's dtype; ``basis`` and ``mean`` are buffers (saved in the ``state_dict``).
    """

    def __init__(self, basis, mean, shape=None, latent_shape=None):
        super().__init__()
        P = torch.as_tensor(basis)
        P = P if P.is_floating_point() else P.to(torch.float64)
        if P.ndim != 2 or P.shape[1] > P.shape[0] or P.shape[1] < 1:
            raise ValueError(f"basis must be a (D, r) matrix with 1 <= r <= D, got shape {tuple(P.shape)}")
        D, r = P.shape
        err = float((P.T @ P - torch.eye(r, dtype=P.dtype, device=P.device)).abs().max())
        if err > 8 * D * torch.finfo(P.dtype).eps:  # a computed orthonormal basis is orthonormal to ~D eps
            raise ValueError(f"basis must have orthonormal columns: max |P^T P - I| = {err:.2e}")
        mu = torch.as_tensor(mean, dtype=P.dtype, device=P.device).flatten()
        if mu.numel() != D:
            raise ValueError(f"mean must hold D = {D} numbers (basis rows), got {mu.numel()}")
        self.shape = tuple(shape) if shape is not None else (D,)
        self._latent_shape = tuple(latent_shape) if latent_shape is not None else (r,)
        if math.prod(self.shape) != D:
            raise ValueError(f"shape {self.shape} does not hold D = {D} numbers")
        if math.prod(self._latent_shape) != r:
            raise ValueError(f"latent_shape {self._latent_shape} does not hold r = {r} numbers")
        self.register_buffer("basis", P.clone())
        self.register_buffer("mean", mu.clone())

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._latent_shape

    @classmethod
    def pca(cls, data: Tensor, r: int, *, latent_shape=None) -> LinearAutoencoder:
        """The rank-r PCA autoencoder of ``data`` (N, *shape): mu the sample mean, P the r leading right singular
        vectors of the centred data (Pearson 1901; the eigenvectors of the sample covariance, here from an SVD of
        the data in float64, which avoids squaring its condition number). Each column's sign is fixed so that its
        largest-magnitude entry is positive, so the result does not depend on the SVD routine's sign choice."""
        X = torch.as_tensor(data).to(torch.float64)
        if X.ndim < 2:
            raise ValueError(f"data must be (N, *shape) with N examples, got shape {tuple(X.shape)}")
        N, shape = X.shape[0], tuple(X.shape[1:])
        X = X.reshape(N, -1)
        r = _positive_int("r", r)
        if r > min(N - 1, X.shape[1]):
            raise ValueError(
                f"r must be at most min(N - 1, D) = {min(N - 1, X.shape[1])} (the rank of {N} centred examples in "
                f"D = {X.shape[1]}), got {r}"
            )
        mu = X.mean(0)
        _, _, Vh = torch.linalg.svd(X - mu, full_matrices=False)
        return cls(_fix_signs(Vh[:r].T), mu, shape, latent_shape)

    @classmethod
    def from_covariance(cls, mean, covariance, r: int, *, shape=None, latent_shape=None) -> LinearAutoencoder:
        """The rank-r PCA autoencoder of a distribution with this mean (D,) and covariance (D, D): P the
        eigenvectors of its r largest eigenvalues (float64 ``eigh``), signs fixed as in ``pca``."""
        C = torch.as_tensor(covariance, dtype=torch.float64)
        if C.ndim != 2 or C.shape[0] != C.shape[1]:
            raise ValueError(f"covariance must be a square (D, D) matrix, got shape {tuple(C.shape)}")
        r = _positive_int("r", r)
        if r > C.shape[0]:
            raise ValueError(f"r must be at most D = {C.shape[0]}, got {r}")
        _, Q = torch.linalg.eigh((C + C.T) / 2)  # ascending eigenvalues
        return cls(_fix_signs(Q[:, -r:].flip(1)), mean, shape, latent_shape)

    def encode(self, x: Tensor) -> Tensor:
        """z = P^T (x - mu), (B, *latent_shape) for x (B, *shape)."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must be (B, *{self.shape}), got {tuple(x.shape)}")
        P, mu = self.basis.to(x.dtype), self.mean.to(x.dtype)
        return ((x.reshape(x.shape[0], -1) - mu) @ P).reshape(x.shape[0], *self.latent_shape)

    def decode(self, z: Tensor) -> Tensor:
        """x = P z + mu, (B, *shape) for z (B, *latent_shape)."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"z must be (B, *{self.latent_shape}), got {tuple(z.shape)}")
        P, mu = self.basis.to(z.dtype), self.mean.to(z.dtype)
        return (z.reshape(z.shape[0], -1) @ P.T + mu).reshape(z.shape[0], *self.shape)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction P P^T (x - mu) + mu: x's orthogonal projection onto mu + span(P)."""
        return self.decode(self.encode(x))


def _fix_signs(P: Tensor) -> Tensor:
    """P with each column multiplied by the sign of its largest-magnitude entry (a deterministic sign choice)."""
    idx = P.abs().argmax(0)
    s = torch.sign(P[idx, torch.arange(P.shape[1])])
    return P * torch.where(s == 0, 1.0, s).to(P.dtype)
