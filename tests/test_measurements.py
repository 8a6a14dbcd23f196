"""The linear operators of inverse problems (core/measurements.py) against their closed forms.

Each operator is checked for: the exact adjoint (<A x, y> = <x, A^T y>), ``matrix()`` agreeing with the map,
the SVD reconstructing the matrix with orthonormal factors, the closed-form singular values (a 0/1 mask: 1
on the kept entries; average pooling by f: 1/f, since A A^T = I / f^2; colorization with weights w: |w|,
since A A^T = |w|^2 I), the Moore-Penrose identities of ``pinv``, and clear errors. Float64 on the CPU.

Tolerances are rounding bounds: an inner product or matrix-vector product of length n errs by at most
n eps |a| |b| (Higham 2002, Sec. 3.1), so a check through k such products gets k n eps times the norms.
"""

import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import Blur, Colorize, Dense, Downsample, Mask, Measurement, Outpaint
from torchdiffusion.core.measurements import SVD, LinearOperator

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _ops():
    g = gen(1)
    rank_deficient = torch.randn(4, 2, generator=g, dtype=F64) @ torch.randn(2, 6, generator=g, dtype=F64)
    return {
        "mask": Mask(torch.rand(2, 4, 5, generator=g) < 0.6),
        "mask-broadcast": Mask(torch.tensor([[1, 0, 1], [0, 1, 1]]), shape=(3, 2, 3)),
        "outpaint": Outpaint((1, 6, 6), (2, 4)),
        "colorize": Colorize(shape=(3, 4, 5)),
        "colorize-luma": Colorize(shape=(3, 3, 2), weights=(0.2989, 0.5870, 0.1140)),
        "downsample2": Downsample(2, shape=(2, 4, 6)),
        "downsample3": Downsample(3, shape=(1, 6, 3)),
        "blur": Blur(0.8, 5, shape=(2, 6, 7)),
        "blur-wide": Blur(1.5, shape=(1, 5, 5)),
        "dense": Dense(torch.randn(3, 5, generator=g, dtype=F64)),
        "dense-rank2": Dense(rank_deficient, shape=(2, 3)),
    }


OPS = _ops()
CLOSED_FORM_SVD = ["mask", "mask-broadcast", "outpaint", "colorize", "colorize-luma", "downsample2", "downsample3"]


@pytest.fixture(params=list(OPS), ids=list(OPS))
def op(request):
    return OPS[request.param]


def _norm2(A: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(A, ord=2))


def test_adjoint_is_exact(op):
    """<A x, y> = <x, A^T y> for random x, y: the adjoint of every operator is its exact transpose."""
    g = gen(2)
    x = torch.randn(5, *op.in_shape, generator=g, dtype=F64)
    y = torch.randn(5, *op.out_shape, generator=g, dtype=F64)
    lhs = (op(x) * y).flatten(1).sum(1)
    rhs = (x * op.adjoint(y)).flatten(1).sum(1)
    # two products through A (length <= D per entry) and two inner products (lengths M and D)
    n = 2 * (op.in_dim + op.out_dim)
    tol = n * EPS * x.flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1) * _norm2(op.matrix())
    assert ((lhs - rhs).abs() <= tol).all(), (lhs - rhs).abs().max()
    assert (lhs.abs() > 10 * tol).any()  # the check has something to compare


def test_matrix_agrees_with_the_map(op):
    """A x = x_flat M^T and A^T y = y_flat M, with M = op.matrix() of shape (M, D)."""
    g = gen(3)
    M = op.matrix()
    assert M.shape == (op.out_dim, op.in_dim) and M.dtype == F64
    x = torch.randn(4, *op.in_shape, generator=g, dtype=F64)
    y = torch.randn(4, *op.out_shape, generator=g, dtype=F64)
    n, A = op.in_dim + op.out_dim, _norm2(M)
    torch.testing.assert_close(op(x).flatten(1), x.flatten(1) @ M.T, rtol=0, atol=n * EPS * A * float(x.norm()))
    torch.testing.assert_close(op.adjoint(y).flatten(1), y.flatten(1) @ M, rtol=0, atol=n * EPS * A * float(y.norm()))


def test_svd_reconstructs_the_matrix(op):
    """A = U diag(s) V^T with U^T U = I, V^T V = I, s > 0, and s = the nonzero singular values of the dense
    matrix (rank included)."""
    M = op.matrix()
    svd = op.svd()
    U, s, V = svd.dense()
    R, D, Mo = svd.rank, op.in_dim, op.out_dim
    assert U.shape == (Mo, R) and V.shape == (D, R) and s.shape == (R,) and bool((s > 0).all())
    tol = 4 * (D + Mo) * EPS
    torch.testing.assert_close(U.T @ U, torch.eye(R, dtype=F64), rtol=0, atol=tol)
    torch.testing.assert_close(V.T @ V, torch.eye(R, dtype=F64), rtol=0, atol=tol)
    torch.testing.assert_close(U @ torch.diag(s) @ V.T, M, rtol=0, atol=tol * _norm2(M))
    ref = torch.linalg.svdvals(M)
    ref = ref[ref > max(M.shape) * EPS * ref[0]]
    assert len(ref) == R
    torch.testing.assert_close(s.sort(descending=True).values, ref, rtol=0, atol=tol * float(ref[0]))


@pytest.mark.parametrize("name", CLOSED_FORM_SVD)
def test_closed_form_singular_values(name):
    """A 0/1 mask: s = 1 on the kept entries; f x f average pooling: s = 1/f at every output pixel (A A^T =
    I / f^2); colorization with weights w: s = |w| at every pixel (A A^T = |w|^2 I)."""
    op = OPS[name]
    M = op.matrix()
    s = op.svd().s
    if isinstance(op, Mask):
        assert torch.equal(M, torch.diag(op.mask.flatten()))
        assert len(s) == int(op.mask.sum()) and bool((s == 1).all())
    elif isinstance(op, Downsample):
        f = op.factor
        torch.testing.assert_close(M @ M.T, torch.eye(op.out_dim, dtype=F64) / f**2, rtol=0, atol=f**2 * EPS)
        assert len(s) == op.out_dim and bool((s == 1 / f).all())
    else:
        w = op.weights
        torch.testing.assert_close(M @ M.T, float(w @ w) * torch.eye(op.out_dim, dtype=F64), rtol=0, atol=3 * EPS)
        assert len(s) == op.out_dim and bool((s == w.norm()).all())


def test_outpaint_keeps_only_the_centre_box():
    op = Outpaint((2, 7, 8), (3, 4))
    expect = torch.zeros(7, 8, dtype=F64)
    expect[2:5, 2:6] = 1  # rows (7 - 3) // 2 = 2 .. 5, columns (8 - 4) // 2 = 2 .. 6
    assert torch.equal(op.mask, expect.expand(2, 7, 8))
    x = torch.randn(1, 2, 7, 8, generator=gen(4), dtype=F64)
    assert torch.equal(op(x), x * expect)


def test_blur_matrix_is_the_gaussian_kernel():
    """Blur's entries are g(dr) g(dc), g(i) = exp(-i^2 / (2 sigma^2)) / sum_|j|<=h, zero beyond the kernel
    (zero padding), and the matrix is symmetric, so A^T = A."""
    sigma, size, H, W = 0.9, 5, 6, 7
    op = Blur(sigma, size, shape=(1, H, W))
    M = op.matrix()
    h = size // 2
    norm = sum(math.exp(-(i**2) / (2 * sigma**2)) for i in range(-h, h + 1))
    r, c = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    dr = (r.flatten()[:, None] - r.flatten()[None, :]).to(F64)
    dc = (c.flatten()[:, None] - c.flatten()[None, :]).to(F64)
    inside = (dr.abs() <= h) & (dc.abs() <= h)
    expect = torch.exp(-(dr**2 + dc**2) / (2 * sigma**2)) / norm**2 * inside
    torch.testing.assert_close(M, expect, rtol=0, atol=4 * size * EPS)
    assert torch.equal(M, M.T)


def test_pinv_satisfies_the_penrose_identities(op):
    """A A^+ A = A and A^+ A A^+ = A^+ (Penrose 1955), with A^+ applied through ``pinv`` to the identity's
    columns, and A^+ = the dense pseudo-inverse. A triple product of matrices of norms a, b, c errs by
    about n eps a b c, with |A| = s_max and |A^+| = 1 / s_min: the bounds grow with the condition number."""
    M = op.matrix()
    eye = torch.eye(op.out_dim, dtype=F64).reshape(op.out_dim, *op.out_shape)
    P = op.pinv(eye).reshape(op.out_dim, op.in_dim).T  # (D, M): column j is A^+ e_j
    s = op.svd().s
    a, p = float(s.max()), 1 / float(s.min())
    n = 8 * (op.in_dim + op.out_dim) * EPS
    torch.testing.assert_close(M @ P @ M, M, rtol=0, atol=n * a * a * p)
    torch.testing.assert_close(P @ M @ P, P, rtol=0, atol=n * p * a * p)
    torch.testing.assert_close(P, torch.linalg.pinv(M), rtol=0, atol=n * p * a * p)


@pytest.mark.parametrize("name", ["mask", "outpaint", "colorize", "downsample2"])
def test_pinv_closed_forms(name):
    """A^+ of a 0/1 mask is the mask; of f x f pooling f^2 A^T (copy to the block); of colorization
    A^T / |w|^2."""
    op = OPS[name]
    y = torch.randn(3, *op.out_shape, generator=gen(5), dtype=F64)
    if isinstance(op, Mask):
        expect = op(y)
    elif isinstance(op, Downsample):
        expect = op.adjoint(y) * op.factor**2
        torch.testing.assert_close(expect, y.repeat_interleave(2, -2).repeat_interleave(2, -1))
    else:
        expect = op.adjoint(y) / float(op.weights @ op.weights)
    torch.testing.assert_close(op.pinv(y), expect, rtol=0, atol=8 * op.in_dim * EPS * float(y.abs().max()))


def test_null_space_projection():
    """x - V V^T x is annihilated by A (the null-space part DDRM and DDNM update), and A^+ A x = V V^T x."""
    for name in ("outpaint", "colorize", "downsample2", "dense-rank2", "blur"):
        op = OPS[name]
        svd = op.svd()
        x = torch.randn(3, *op.in_shape, generator=gen(6), dtype=F64)
        xf = x.flatten(1)
        null = (xf - svd.V(svd.Vt(xf))).reshape(x.shape)
        tol = 8 * op.in_dim * EPS * float(x.norm()) * float(svd.s.max())
        assert float(op(null).abs().max()) <= tol, name
        torch.testing.assert_close(op.pinv(op(x)).flatten(1), svd.V(svd.Vt(xf)), rtol=0, atol=tol / float(svd.s.min()))


def test_operators_keep_float32():
    """Operators compute in the input's dtype: float32 in, float32 out, equal to float64 to float32 rounding."""
    for name, op in OPS.items():
        x = torch.randn(2, *op.in_shape, generator=gen(7), dtype=F64)
        y32 = op(x.float())
        assert y32.dtype == torch.float32, name
        tol = 2 * op.in_dim * torch.finfo(torch.float32).eps * float(x.abs().max()) * float(op.matrix().abs().max())
        torch.testing.assert_close(y32.double(), op(x), rtol=0, atol=tol)
        assert op.adjoint(y32).dtype == torch.float32 and op.pinv(y32).dtype == torch.float32


def test_svd_of_matrix_drops_rounding_level_singular_values():
    A = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], dtype=F64)  # rank 1
    svd = SVD.of_matrix(A)
    assert svd.rank == 1
    torch.testing.assert_close(svd.s, torch.tensor([A.norm()], dtype=F64), rtol=0, atol=8 * EPS * float(A.norm()))


# -- measurements -----------------------------------------------------------------------------------


def test_measurement_batches_y():
    op = OPS["colorize"]
    y = torch.zeros(*op.out_shape, dtype=F64)
    m = Measurement(op, y, 0.1)
    assert m.y.shape == (1, *op.out_shape) and m.batch == 1 and m.sigma_y == 0.1
    assert Measurement(op, torch.zeros(4, *op.out_shape), 0).batch == 4


def test_measurement_observe_adds_the_noise():
    """y - A x0 = sigma_y n: its entries have mean 0 and variance sigma_y^2, within Z standard errors."""
    op, sigma = OPS["downsample2"], 0.3
    x0 = torch.randn(200, *op.in_shape, generator=gen(8), dtype=F64)
    m = Measurement.observe(op, x0, sigma, generator=gen(9))
    n = (m.y - op(x0)).flatten() / sigma
    N = n.numel()
    assert abs(float(n.mean())) < Z / math.sqrt(N)
    assert abs(float(n.var()) - 1) < Z * math.sqrt(2 / (N - 1))
    assert torch.equal(Measurement.observe(op, x0, 0.0).y, op(x0))


def test_measurement_log_likelihood():
    """log p(y | x0) = -|y - A x0|^2 / (2 sigma_y^2) - M/2 log(2 pi sigma_y^2); refused at sigma_y = 0."""
    op, sigma = OPS["dense"], 0.4
    g = gen(10)
    x0 = torch.randn(3, *op.in_shape, generator=g, dtype=F64)
    y = torch.randn(op.out_dim, generator=g, dtype=F64)
    A = op.matrix()
    r = y - x0 @ A.T
    expect = -0.5 * (r**2).sum(1) / sigma**2 - 0.5 * op.out_dim * math.log(2 * math.pi * sigma**2)
    torch.testing.assert_close(Measurement(op, y, sigma).log_likelihood(x0), expect)
    with pytest.raises(ValueError, match="point mass"):
        Measurement(op, y, 0.0).log_likelihood(x0)


# -- clear errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Mask(torch.tensor([0.0, 0.5, 1.0])), "only 0 and 1"),
        (lambda: Mask(torch.ones(2, 3), shape=(3, 3, 2)), "does not broadcast"),
        (lambda: Outpaint((1, 4, 4), (5, 2)), "must fit"),
        (lambda: Outpaint((4,), 2), "two spatial axes"),
        (lambda: Colorize(shape=(1, 4, 4)), r"\(3, H, W\)"),
        (lambda: Colorize(shape=(3, 4, 4), weights=(1.0, 2.0)), "3 numbers"),
        (lambda: Downsample(3, shape=(1, 4, 6)), "divisible by 3"),
        (lambda: Downsample(0, shape=(1, 4, 4)), "positive int"),
        (lambda: Blur(0.0, 3, shape=(1, 4, 4)), "sigma must be a positive"),
        (lambda: Blur(1.0, 4, shape=(1, 4, 4)), "odd"),
        (lambda: Blur(1.0, 3, shape=(4,)), "two spatial axes"),
        (lambda: Dense(torch.ones(3)), "2-d"),
        (lambda: Dense(torch.ones(2, 6), shape=(2, 2)), "D = 6"),
        (lambda: Dense(torch.ones(2, 6), shape=(0, 6)), "positive ints"),
        (lambda: Measurement(OPS["dense"], torch.zeros(3), -0.1), "sigma_y must be"),
        (lambda: Measurement(OPS["dense"], torch.zeros(3), float("nan")), "sigma_y must be"),
        (lambda: Measurement(OPS["dense"], torch.zeros(4), 0.1), r"output shape \(3,\)"),
        (lambda: Measurement(OPS["dense"], torch.zeros(2, 2, 3), 0.1), r"output shape \(3,\)"),
    ],
)
def test_bad_input_is_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_shapes_and_types_are_refused():
    op = OPS["colorize"]
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 4, 5\), got \(3, 4, 5\)"):
        op(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"y must have shape \(B, 1, 4, 5\)"):
        op.adjoint(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"y must have shape"):
        op.pinv(torch.zeros(2, 3, 4, 5))
    with pytest.raises(TypeError, match="must be a tensor"):
        op([1.0, 2.0])
    with pytest.raises(TypeError, match="must be a LinearOperator"):
        Measurement(torch.eye(3), torch.zeros(3), 0.1)
    assert isinstance(op, LinearOperator) and "Colorize" in repr(op)
