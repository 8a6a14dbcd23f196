"""Linear measurements y = A x0 + sigma_y n of a clean example x0: the operators of inverse problems.

A ``LinearOperator`` acts on batches: ``A(x)`` maps (B, *in_shape) to (B, *out_shape), ``A.adjoint(y)``
maps back with A^T (the exact adjoint: <A x, y> = <x, A^T y>), ``A.matrix()`` is the dense (M, D)
float64 matrix on flattened examples (M = prod(out_shape), D = prod(in_shape)), ``A.svd()`` its thin
singular value decomposition (``SVD``) and ``A.pinv(y)`` the Moore-Penrose pseudo-inverse A^+ y.
Every operator knows its input shape from construction, so these are defined without an example.

The operators of the restoration papers (DDRM, Kawar et al. 2022; DDNM, Wang et al. 2023; PiGDM, Song et
al. 2023; DPS, Chung et al. 2023):

    Mask(mask)               inpainting: y = mask * x, the full shape, zeros where mask = 0 (deepinv's
                             ``Inpainting`` convention); SVD: s = 1 on the kept entries
    Outpaint(shape, box)     outpainting: a Mask keeping only a centred box (the known picture), so the
                             outside is generated
    Colorize(shape=...)      (B, 3, H, W) -> (B, 1, H, W), y = sum_c w_c x_c, by default the channel mean
                             (DDRM's and DDNM's colorization); SVD: s = |w| at every pixel
    Downsample(f, shape=...) f x f average pooling (DDRM's and DDNM's super-resolution); A A^T = I / f^2,
                             so s = 1 / f at every output pixel
    Blur(sigma, size, shape=...)  Gaussian blur with zero padding: A is symmetric, A^T = A exactly; SVD
                             and pseudo-inverse dense (no closed form with zero padding)
    Dense(matrix, shape)     any (M, D) matrix; SVD and pseudo-inverse dense

``Measurement(operator, y, sigma_y)`` holds one (or a batch of) observation(s) and its noise level.
Operators compute in the input's dtype and device; ``matrix``, ``svd`` and the stored constants are float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["SVD", "LinearOperator", "Mask", "Outpaint", "Colorize", "Downsample", "Blur", "Dense", "Measurement"]

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


def _shape(shape, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"{what} must be a tuple of positive ints, got {shape!r}") from None
    if not out or any(s <= 0 for s in out):
        raise ValueError(f"{what} must be a tuple of positive ints, got {shape!r}")
    return out


class SVD:
    """The thin singular value decomposition A = U diag(s) V^T of an operator, on flattened examples.

    ``s`` (R,) holds the positive singular values (R = rank A); U (M, R) and V (D, R) have orthonormal
    columns. U and V are given as maps on batches of row vectors, so a closed form never builds a matrix:
    ``U(z)`` = z U^T maps (B, R) -> (B, M), ``Ut(y)`` = y U maps (B, M) -> (B, R); likewise ``V`` (B, R) ->
    (B, D) and ``Vt`` (B, D) -> (B, R). ``dense()`` returns the three matrices (U, s, V).

    Only the range is kept: the null space of A is everything orthogonal to V's columns, so its component of
    x is x - V(Vt(x)). That is what DDRM's spectral update needs (Kawar et al. 2022: every coordinate with
    s_i = 0 follows the same scalar rule, so the update of the whole null space is one projection) and what
    DDNM's range-null decomposition x = A^+ A x + (I - A^+ A) x needs (Wang et al. 2023).
    """

    def __init__(
        self,
        s: Tensor,
        U: Callable[[Tensor], Tensor],
        Ut: Callable[[Tensor], Tensor],
        V: Callable[[Tensor], Tensor],
        Vt: Callable[[Tensor], Tensor],
    ):
        self.s = torch.as_tensor(s, dtype=F64)
        self.U, self.Ut, self.V, self.Vt = U, Ut, V, Vt

    @classmethod
    def from_matrices(cls, U: Tensor, s: Tensor, V: Tensor) -> SVD:
        """From dense U (M, R), s (R,), V (D, R)."""
        U, V = U.to(F64), V.to(F64)
        return cls(
            s,
            U=lambda z: z @ U.to(z).T,
            Ut=lambda y: y @ U.to(y),
            V=lambda z: z @ V.to(z).T,
            Vt=lambda x: x @ V.to(x),
        )

    @classmethod
    def of_matrix(cls, A: Tensor) -> SVD:
        """The SVD of a dense (M, D) matrix, keeping the singular values above max(M, D) * eps * s_max
        (numpy's ``matrix_rank`` rule): smaller ones are rounding noise of a rank-deficient matrix."""
        A = A.to(F64)
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        keep = s > max(A.shape) * EPS64 * (float(s[0]) if s.numel() else 0.0)
        return cls.from_matrices(U[:, keep], s[keep], Vh[keep].T)

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """(U (M, R), s (R,), V (D, R)) as float64 matrices."""
        eye = torch.eye(self.rank, dtype=F64)
        return self.U(eye).T, self.s, self.V(eye).T

    def pinv(self, y: Tensor) -> Tensor:
        """A^+ y = V diag(1/s) U^T y on flattened (B, M) -> (B, D)."""
        return self.V(self.Ut(y) / self.s.to(y))


class LinearOperator:
    """A linear map on batches: (B, *in_shape) -> (B, *out_shape).

    Subclasses set ``in_shape`` and ``out_shape`` (through ``super().__init__``) and implement ``forward``
    and ``adjoint_of`` on validated batches; they override ``svd`` where it has a closed form. The default
    ``svd`` is the dense one of ``matrix()`` (O(M D min(M, D)), cached), and ``pinv`` always goes through
    ``svd``, so it is exact and cheap where the SVD is, and a dense least-squares solve otherwise.
    """

    def __init__(self, in_shape, out_shape):
        self.in_shape = _shape(in_shape, "the input shape")
        self.out_shape = _shape(out_shape, "the output shape")
        self._svd: SVD | None = None

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    def _check(self, x: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: {what} must be a tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != shape or x.ndim != len(shape) + 1:
            want = ", ".join(map(str, shape))
            raise ValueError(f"{type(self).__name__}: {what} must have shape (B, {want}), got {tuple(x.shape)}")
        return x

    # -- the map and its adjoint ------------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        """A x: (B, *in_shape) -> (B, *out_shape)."""
        return self.forward(self._check(x, self.in_shape, "x"))

    def adjoint(self, y: Tensor) -> Tensor:
        """A^T y: (B, *out_shape) -> (B, *in_shape)."""
        return self.adjoint_of(self._check(y, self.out_shape, "y"))

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint_of(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- dense and spectral views -----------------------------------------------------------------
    def matrix(self) -> Tensor:
        """The dense (M, D) float64 matrix on flattened examples: column j is A applied to e_j."""
        eye = torch.eye(self.in_dim, dtype=F64).reshape(self.in_dim, *self.in_shape)
        return self.forward(eye).reshape(self.in_dim, self.out_dim).T.contiguous()

    def svd(self) -> SVD:
        """The thin SVD (see ``SVD``); by default that of the dense matrix, computed once."""
        if self._svd is None:
            self._svd = SVD.of_matrix(self.matrix())
        return self._svd

    def pinv(self, y: Tensor) -> Tensor:
        """A^+ y (B, *out_shape) -> (B, *in_shape): the least-squares solution of least norm."""
        y = self._check(y, self.out_shape, "y")
        return self.svd().pinv(y.reshape(y.shape[0], -1)).reshape(y.shape[0], *self.in_shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_shape={self.in_shape}, out_shape={self.out_shape})"


class Mask(LinearOperator):
    """Inpainting: y = mask * x, keeping the full shape with zeros where the mask is 0.

    This is deepinv's ``Inpainting`` convention (and DDRM's/DDNM's up to their storing only the kept
    entries): y has x's shape, so an observed image can be shown as is. A = diag(mask) is a 0/1 diagonal
    matrix: A^T = A = A^+, and its SVD is trivial: s = 1 on the R kept entries, U = V = the selection of
    those entries (``U(z)`` scatters z into a zero image, ``Ut`` gathers).

    Args:
        mask: 0/1 values (bool or numbers), of ``shape`` or broadcastable to it (e.g. (H, W) or (1, H, W)
            for (C, H, W) images).
        shape: the example shape; default the mask's own shape.
    """

    def __init__(self, mask, shape=None):
        m = torch.as_tensor(mask).to(F64)
        shape = _shape(shape if shape is not None else m.shape, "shape")
        try:
            m = torch.broadcast_to(m, shape).clone()
        except RuntimeError:
            raise ValueError(f"Mask: a mask of shape {tuple(m.shape)} does not broadcast to {shape}") from None
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("Mask: the mask must hold only 0 and 1 (or False and True)")
        super().__init__(shape, shape)
        self.mask = m
        self.kept = torch.nonzero(m.flatten()).flatten()  # the indices of the observed entries

    def forward(self, x):
        return x * self.mask.to(x)

    def adjoint_of(self, y):
        return y * self.mask.to(y)

    def svd(self) -> SVD:
        idx, D = self.kept, self.in_dim

        def scatter(z):
            return z.new_zeros(z.shape[0], D).index_copy(1, idx.to(z.device), z)

        def gather(x):
            return x[:, idx.to(x.device)]

        return SVD(torch.ones(len(idx), dtype=F64), U=scatter, Ut=gather, V=scatter, Vt=gather)

    def pinv(self, y):
        return self.forward(self._check(y, self.out_shape, "y"))  # A^+ = A for a 0/1 diagonal


class Outpaint(Mask):
    """Outpainting: observe only a centred box of the last two (spatial) axes and generate what lies outside
    it (the picture is extended beyond its borders). Hiding a centre box instead is inpainting: ``Mask``.

    Args:
        shape: the example shape, e.g. (C, H, W); the last two axes are the image.
        box: (h, w) or an int: the size of the observed centre box, rows (H - h) // 2 .. + h and columns
            (W - w) // 2 .. + w.
    """

    def __init__(self, shape, box):
        shape = _shape(shape, "shape")
        if len(shape) < 2:
            raise ValueError(f"Outpaint: shape must have two spatial axes (..., H, W), got {shape}")
        h, w = (box, box) if isinstance(box, int) else tuple(box)
        H, W = shape[-2:]
        if not (0 <= h <= H and 0 <= w <= W):
            raise ValueError(f"Outpaint: the box {(h, w)} must fit in the image {(H, W)}")
        m = torch.zeros(H, W, dtype=F64)
        top, left = (H - h) // 2, (W - w) // 2
        m[top : top + h, left : left + w] = 1
        super().__init__(m, shape)
        self.box = (h, w)


class Colorize(LinearOperator):
    """Colorization: (B, 3, H, W) -> (B, 1, H, W), y = sum_c w_c x_c.

    The default weights are (1/3, 1/3, 1/3), the channel mean of DDRM's and DDNM's colorization;
    pass ``weights=(0.2989, 0.5870, 0.1140)`` for ITU-R 601 luminance (deepinv's ``Decolorize``). At each
    pixel A is the row w, so A A^T = |w|^2 I: s = |w| at all H W pixels, U = I, V = A^T / |w|, and
    A^+ = A^T / |w|^2.
    """

    def __init__(self, *, shape, weights=None):
        shape = _shape(shape, "shape")
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"Colorize: shape must be (3, H, W), got {shape}")
        w = torch.as_tensor((1 / 3, 1 / 3, 1 / 3) if weights is None else weights, dtype=F64).flatten()
        if w.shape != (3,) or float(w.norm()) == 0:
            raise ValueError(f"Colorize: weights must be 3 numbers, not all zero, got {w.tolist()}")
        super().__init__(shape, (1, *shape[1:]))
        self.weights = w

    def forward(self, x):
        return torch.einsum("c,bchw->bhw", self.weights.to(x), x).unsqueeze(1)

    def adjoint_of(self, y):
        return self.weights.to(y)[None, :, None, None] * y

    def svd(self) -> SVD:
        norm = float(self.weights.norm())

        def V(z):  # (B, HW) -> (B, 3HW): A^T z / |w|
            return self.adjoint_of(z.reshape(z.shape[0], *self.out_shape)).reshape(z.shape[0], -1) / norm

        def Vt(x):  # (B, 3HW) -> (B, HW): A x / |w|
            return self.forward(x.reshape(x.shape[0], *self.in_shape)).reshape(x.shape[0], -1) / norm

        return SVD(torch.full((self.out_dim,), norm, dtype=F64), U=lambda z: z, Ut=lambda y: y, V=V, Vt=Vt)


class Downsample(LinearOperator):
    """Super-resolution: f x f average pooling of the last two axes, (..., H, W) -> (..., H/f, W/f).

    Each output pixel is the mean of its block, so the rows of A are orthogonal with squared norm 1/f^2:
    A A^T = I / f^2. Hence s = 1/f at every output pixel, U = I, V = f A^T, and A^+ = f^2 A^T (copy each
    pixel to its block). DDRM's and DDNM's super-resolution operator.
    """

    def __init__(self, factor: int, *, shape):
        shape = _shape(shape, "shape")
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"Downsample: factor must be a positive int, got {factor!r}")
        if len(shape) < 2 or shape[-2] % factor or shape[-1] % factor:
            raise ValueError(f"Downsample: the last two axes of shape {shape} must be divisible by {factor}")
        super().__init__(shape, (*shape[:-2], shape[-2] // factor, shape[-1] // factor))
        self.factor = factor

    def forward(self, x):
        B, f = x.shape[0], self.factor
        lead, (H, W) = self.in_shape[:-2], self.in_shape[-2:]
        return x.reshape(B, *lead, H // f, f, W // f, f).mean(dim=(-3, -1))

    def adjoint_of(self, y):
        f = self.factor
        return y.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1) / f**2

    def svd(self) -> SVD:
        f = self.factor

        def V(z):  # (B, M) -> (B, D): f A^T z
            return f * self.adjoint_of(z.reshape(z.shape[0], *self.out_shape)).reshape(z.shape[0], -1)

        def Vt(x):  # (B, D) -> (B, M): f A x
            return f * self.forward(x.reshape(x.shape[0], *self.in_shape)).reshape(x.shape[0], -1)

        return SVD(torch.full((self.out_dim,), 1 / f, dtype=F64), U=lambda z: z, Ut=lambda y: y, V=V, Vt=Vt)

    def pinv(self, y):
        return self.factor**2 * self.adjoint(y)


class Blur(LinearOperator):
    """Gaussian blur of the last two axes, same size, with zero padding.

    The kernel is g(i) g(j), g(i) = exp(-i^2 / (2 sigma^2)) / sum, for |i|, |j| <= size // 2. Zero padding
    makes A symmetric (A_pq = g(p - q) = g(q - p) for a symmetric kernel), so A^T = A exactly; reflect
    padding would not. SVD and pseudo-inverse are the dense defaults (the matrix is ill-conditioned:
    A^+ keeps the singular values above max(M, D) eps s_max).

    Args:
        sigma: the kernel's standard deviation in pixels (> 0).
        size: the kernel width, odd; default 2 ceil(3 sigma) + 1.
        shape: the example shape (..., H, W).
    """

    def __init__(self, sigma: float, size: int | None = None, *, shape):
        shape = _shape(shape, "shape")
        sigma = float(sigma)
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"Blur: sigma must be a positive number, got {sigma}")
        size = 2 * math.ceil(3 * sigma) + 1 if size is None else size
        if not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(f"Blur: size must be a positive odd int, got {size!r}")
        if len(shape) < 2:
            raise ValueError(f"Blur: shape must have two spatial axes (..., H, W), got {shape}")
        super().__init__(shape, shape)
        i = torch.arange(size, dtype=F64) - size // 2
        g = torch.exp(-(i**2) / (2 * sigma**2))
        self.kernel1d = g / g.sum()
        self.sigma, self.size = sigma, size

    def forward(self, x):
        H, W = self.in_shape[-2:]
        k = self.kernel1d.to(x)
        z = x.reshape(-1, 1, H, W)
        # separable: rows then columns; conv2d is a correlation, the same as convolution for a symmetric kernel
        z = F.conv2d(z, k.reshape(1, 1, -1, 1), padding=(self.size // 2, 0))
        z = F.conv2d(z, k.reshape(1, 1, 1, -1), padding=(0, self.size // 2))
        return z.reshape(x.shape)

    def adjoint_of(self, y):
        return self.forward(y)  # A is symmetric (see the class docstring)


class Dense(LinearOperator):
    """Any (M, D) matrix: y = A x on flattened examples, out_shape (M,).

    Args:
        matrix: (M, D).
        shape: the example shape, default (D,).
    """

    def __init__(self, matrix, shape=None):
        A = torch.as_tensor(matrix, dtype=F64)
        if A.ndim != 2:
            raise ValueError(f"Dense: matrix must be 2-d (M, D), got shape {tuple(A.shape)}")
        shape = _shape(shape if shape is not None else (A.shape[1],), "shape")
        if math.prod(shape) != A.shape[1]:
            raise ValueError(f"Dense: the matrix has D = {A.shape[1]} columns, shape {shape} holds {math.prod(shape)}")
        super().__init__(shape, (A.shape[0],))
        self.A = A

    def forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.A.to(x).T

    def adjoint_of(self, y):
        return (y @ self.A.to(y)).reshape(y.shape[0], *self.in_shape)

    def matrix(self):
        return self.A.clone()


@dataclass(frozen=True)
class Measurement:
    """An observation y = A x0 + sigma_y n, n ~ N(0, I): the operator, y and the noise level.

    ``y`` is stored batched, (B, *out_shape); an unbatched y (*out_shape) is stored as a batch of one.
    sigma_y = 0 means exact observation (conditioning on A x0 = y).
    """

    operator: LinearOperator
    y: Tensor
    sigma_y: float = 0.0

    def __post_init__(self):
        if not isinstance(self.operator, LinearOperator):
            raise TypeError(f"Measurement: operator must be a LinearOperator, got {type(self.operator).__name__}")
        sigma = float(self.sigma_y)
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"Measurement: sigma_y must be a finite number >= 0, got {self.sigma_y}")
        y = torch.as_tensor(self.y)
        out = self.operator.out_shape
        if tuple(y.shape) == out:
            y = y.unsqueeze(0)
        if y.ndim != len(out) + 1 or tuple(y.shape[1:]) != out:
            raise ValueError(
                f"Measurement: y must have the operator's output shape {out} or (B, *{out}), got {tuple(y.shape)}"
            )
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "sigma_y", sigma)

    @property
    def batch(self) -> int:
        return self.y.shape[0]

    @classmethod
    def observe(
        cls, operator: LinearOperator, x0: Tensor, sigma_y: float = 0.0, *, generator: torch.Generator | None = None
    ) -> Measurement:
        """Simulate y = A x0 + sigma_y n for a batch x0 (B, *in_shape), noise from ``generator``."""
        y = operator(x0)
        if sigma_y > 0:
            y = y + sigma_y * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        return cls(operator, y, sigma_y)

    def log_likelihood(self, x0: Tensor) -> Tensor:
        """log p(y | x0) = log N(y; A x0, sigma_y^2 I_M) (B,), for sigma_y > 0 (at sigma_y = 0 it is a delta);
        y's batch is 1 (shared) or x0's."""
        if self.sigma_y == 0:
            raise ValueError("Measurement.log_likelihood: p(y | x0) is a point mass at sigma_y = 0")
        r = (self.y.to(x0) - self.operator(x0)).reshape(x0.shape[0], -1)
        M = r.shape[1]
        return -0.5 * (r**2).sum(1) / self.sigma_y**2 - 0.5 * M * math.log(2 * math.pi * self.sigma_y**2)
