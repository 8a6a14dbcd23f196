"""Tests of the networks (nets/) and of the Preconditioned wrapper (parameterization.py).

Closed forms: the transformer sinusoidal embedding (Vaswani et al. 2017; Ho et al. 2020, Sec. 4),
random Fourier features (Tancik et al. 2020), EDM's input scaling c_in = 1/sqrt(alpha^2 sigma_data^2
+ sigma^2) (Karras et al. 2022, Eq. 7 / Table 1) and the zero-initialised output layer (an untrained
eps-network predicts the prior mean 0). Float64 on the CPU.
"""

import math

import pytest
import torch
from torch import nn

from conftest import Z, gen
from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, SubVP
from torchdiffusion.core.denoiser import Preconditioned, as_denoiser
from torchdiffusion.core.predictions import ALL_PREDICTIONS
from torchdiffusion.core.processes import beta_linear
from torchdiffusion.names import EMBEDDINGS, NETS, build_net
from torchdiffusion.nets import MLP, FourierEmbedding, SinusoidalEmbedding

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
PROCESSES = [VP(), SubVP(), VE(), Cosine(), EDM(), Flow(), Discrete.from_schedule(beta_linear, 50)]
PROCESS_IDS = [type(p).__name__ for p in PROCESSES]


def _mlp(seed: int = 0, **kw) -> MLP:
    torch.manual_seed(seed)
    kw = {"width": 32, "depth": 2, "emb_dim": 16, **kw}
    return MLP(**kw).double()


def _perturb_last_layer(net: MLP, seed: int = 1) -> None:
    g = gen(seed)
    last = net.out[-1]
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=g, dtype=F64) * 0.3)
        last.bias.copy_(torch.randn(last.bias.shape, generator=g, dtype=F64) * 0.3)


def _inputs(B: int, D: int, seed: int = 2):
    g = gen(seed)
    return torch.randn(B, D, generator=g, dtype=F64), torch.rand(B, generator=g, dtype=F64) * 4 - 2


def _times(process, B: int) -> torch.Tensor:
    """B times spread over [t_min, t_max) (integers on a discrete process)."""
    u = torch.linspace(0.0, 0.97, B, dtype=F64)
    t = process.t_min + u * (process.t_max - process.t_min)
    return t.round() if process.n_steps is not None else t


# --- MLP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("time_embedding", sorted(EMBEDDINGS))
@pytest.mark.parametrize("D", [1, 2, 5])
def test_mlp_output_shape_and_zero_init(D, time_embedding):
    """MLP: (x (B, D), c_noise (B,)) -> (B, D). The last layer starts at zero, so the output at
    initialisation is exactly 0 (an untrained eps-net predicts the prior mean), for any input."""
    net = _mlp(dim=D, time_embedding=EMBEDDINGS[time_embedding])
    x, c = _inputs(7, D)
    out = net(x, c)
    assert out.shape == (7, D) and out.dtype == F64
    assert torch.equal(out, torch.zeros_like(out))
    _perturb_last_layer(net)
    out = net(x, c)
    assert out.shape == (7, D) and bool((out != 0).any())
    assert NETS["mlp"] is MLP


def test_mlp_class_conditional_labels():
    """num_classes = K adds an embedding of K + 1 rows; label K is "unconditional" and is what
    class_labels=None means (classifier-free guidance, Ho & Salimans 2022). Different labels
    give different outputs once the last layer is non-zero."""
    K = 3
    net = _mlp(num_classes=K)
    assert net.label.num_embeddings == K + 1
    x, c = _inputs(6, 2)
    labels = torch.tensor([0, 1, 2, 3, 0, 3])
    assert torch.equal(net(x, c, class_labels=labels), torch.zeros(6, 2, dtype=F64))
    _perturb_last_layer(net)
    uncond = net(x, c)
    torch.testing.assert_close(uncond, net(x, c, class_labels=torch.full((6,), K)), rtol=0, atol=0)
    per_label = [net(x, c, class_labels=torch.full((6,), k)) for k in range(K + 1)]
    for i in range(K + 1):
        for j in range(i + 1, K + 1):
            assert not torch.allclose(per_label[i], per_label[j])
    # row b of a mixed batch is the output for its own label
    mixed = net(x, c, class_labels=labels)
    for b, k in enumerate(labels.tolist()):
        torch.testing.assert_close(mixed[b], per_label[k][b], rtol=1e-12, atol=1e-14)


def test_mlp_unknown_time_embedding_and_odd_dim_raise():
    """Configuration errors are ValueErrors: an unknown embedding (listing the choices) and an odd
    embedding size (sin/cos come in pairs)."""
    with pytest.raises(ValueError, match="unknown time_embedding") as info:  # a name, at the edge
        build_net({"name": "mlp", "time_embedding": "learned"})
    assert all(repr(k) in str(info.value) for k in EMBEDDINGS)
    with pytest.raises(TypeError, match="time_embedding"):  # inside the library a name is not an embedding
        MLP(time_embedding="learned")
    with pytest.raises(ValueError, match="even"):
        MLP(emb_dim=7)
    for cls in (SinusoidalEmbedding, FourierEmbedding):
        with pytest.raises(ValueError, match="even"):
            cls(5)


def test_mlp_gradients_flow():
    """Backpropagation through the zero last layer: at init only the last layer's weight and bias get
    non-zero gradients (d out / d h = W_last = 0 stops the rest), and once W_last is non-zero every
    parameter, the first layer and the class embedding included, gets a finite non-zero gradient."""
    net = _mlp(num_classes=2)
    x, c = _inputs(9, 2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    target = torch.randn(9, 2, generator=gen(3), dtype=F64)
    ((net(x, c, class_labels=labels) - target) ** 2).mean().backward()
    last = {"out.2.weight", "out.2.bias"}
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        if name in last:
            assert bool((p.grad != 0).any()), name
        else:
            assert torch.equal(p.grad, torch.zeros_like(p)), name

    net.zero_grad()
    _perturb_last_layer(net)
    ((net(x, c, class_labels=labels) - target) ** 2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert bool((p.grad != 0).any()), name
    assert bool((net.inp.weight.grad != 0).all())


def test_mlp_dropout_only_in_training():
    """Dropout (inside each block) is random in train mode and the identity in eval mode."""
    net = _mlp(dropout=0.5)
    _perturb_last_layer(net)
    x, c = _inputs(16, 2)
    net.eval()
    torch.testing.assert_close(net(x, c), net(x, c), rtol=0, atol=0)
    net.train()
    torch.manual_seed(0)
    a = net(x, c)
    b = net(x, c)
    assert not torch.equal(a, b)


# --- time embeddings ------------------------------------------------------------------------------------


def test_sinusoidal_embedding_closed_form():
    """Vaswani et al. 2017 / Ho et al. 2020: [cos(s c w_k), sin(s c w_k)] with w_k = P^(-k/half),
    k = 0..half-1 (geometric from 1 to nearly 1/P), s = scale. Shape (B, dim), values in [-1, 1],
    cos^2 + sin^2 = 1, and c = 0 gives [1, ..., 1, 0, ..., 0]."""
    dim, P, s = 16, 10_000.0, 100.0
    emb = SinusoidalEmbedding(dim, max_period=P, scale=s).double()
    c = torch.linspace(-2, 2, 11, dtype=F64)
    e = emb(c)
    assert e.shape == (11, dim)
    assert e.abs().max() <= 1
    half = dim // 2
    torch.testing.assert_close(e[:, :half] ** 2 + e[:, half:] ** 2, torch.ones(11, half, dtype=F64))
    w = P ** (-torch.arange(half, dtype=F64) / half)
    arg = s * c[:, None] * w[None]
    # the frequencies are stored in float32: |d arg| <= 200 * 2^-24 ~ 1.2e-5
    torch.testing.assert_close(e, torch.cat([torch.cos(arg), torch.sin(arg)], 1), rtol=0, atol=1e-4)
    zero = emb(torch.zeros(3, dtype=F64))
    assert torch.equal(zero, torch.cat([torch.ones(3, half), torch.zeros(3, half)], 1).to(F64))


def test_fourier_embedding_reproducible_and_saved():
    """Random Fourier features (Tancik et al. 2020): [cos(2 pi c b_k), sin(2 pi c b_k)], b ~ N(0, scale^2)
    drawn from a fixed seed, so the same seed gives the same buffer, a different seed a different one,
    and the buffer is in the state_dict (a checkpoint restores it whatever seed rebuilds the module)."""
    dim, scale = 2048, 16.0
    a, b, other = FourierEmbedding(dim, scale=scale), FourierEmbedding(dim, scale=scale), FourierEmbedding(dim, seed=1)
    assert torch.equal(a.freqs, b.freqs) and not torch.equal(a.freqs, other.freqs)
    assert "freqs" in a.state_dict()
    other.load_state_dict(a.state_dict())
    assert torch.equal(other.freqs, a.freqs)
    assert "time.0.freqs" in _mlp(time_embedding=FourierEmbedding).state_dict()

    # b_k ~ N(0, scale^2): mean within Z s.e. scale/sqrt(n), variance within Z s.e. scale^2 sqrt(2/n)
    f = a.freqs.to(F64)
    n = f.numel()
    assert f.shape == (dim // 2,)
    assert abs(float(f.mean())) < Z * scale / math.sqrt(n)
    assert abs(float(f.var()) - scale**2) < Z * scale**2 * math.sqrt(2 / (n - 1))

    emb = a.double()
    c = torch.linspace(-1, 1, 5, dtype=F64)
    e = emb(c)
    assert e.shape == (5, dim) and e.abs().max() <= 1
    arg = 2 * math.pi * c[:, None] * emb.freqs[None]
    torch.testing.assert_close(e, torch.cat([torch.cos(arg), torch.sin(arg)], 1), rtol=0, atol=1e-12)


# --- Preconditioned -------------------------------------------------------------------------------------


class _Recorder(nn.Module):
    """A dummy network that records its inputs and returns a fixed non-linear function of them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise, **cond):
        self.calls.append((x.clone(), c_noise.clone(), cond))
        return torch.tanh(x) * (1 + c_noise[:, None] ** 2) + 0.1 * c_noise[:, None]


@pytest.mark.parametrize("process", PROCESSES, ids=PROCESS_IDS)
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_preconditioned_feeds_c_in_x_and_c_noise(process, sigma_data):
    """Karras et al. 2022, Eq. 7 / Table 1: the network sees c_in x with c_in = 1/sqrt(alpha^2
    sigma_data^2 + sigma^2) and the time as c_noise = -lam(t)/4 (lam = log(alpha/sigma), the process's
    own closed form); it returns the raw output unchanged; conditioning passes through."""
    B, D = 8, 3
    t = _times(process, B)
    x = torch.randn(B, D, generator=gen(4), dtype=F64) * 3
    rec = _Recorder()
    pre = Preconditioned(rec, process, sigma_data=sigma_data)
    labels = torch.arange(B)
    out = pre(x, t, class_labels=labels)
    ((seen_x, seen_c, cond),) = rec.calls
    a, s = process.alpha(t), process.sigma(t)
    c_in = 1 / torch.sqrt(a**2 * sigma_data**2 + s**2)
    torch.testing.assert_close(seen_x, c_in[:, None] * x, rtol=1e-12, atol=0)
    torch.testing.assert_close(seen_c, -process.lam(t) / 4, rtol=1e-10, atol=1e-12)
    assert cond["class_labels"] is labels
    torch.testing.assert_close(out, rec(seen_x, seen_c), rtol=0, atol=0)


@pytest.mark.parametrize("process", PROCESSES, ids=PROCESS_IDS)
def test_preconditioned_input_has_unit_variance(process):
    """Karras et al. 2022, Sec. 5 (c_in): for x0 ~ N(0, sigma_data^2), Var[c_in x_t] = c_in^2 (alpha^2
    sigma_data^2 + sigma^2) = 1 at every t; sample variances within Z s.e. sqrt(2/(n-1))."""
    sigma_data, n = 0.5, 20_000
    rec = _Recorder()
    pre = Preconditioned(rec, process, sigma_data=sigma_data)
    g = gen(5)
    for t in _times(process, 4).tolist():
        x0 = sigma_data * torch.randn(n, 1, generator=g, dtype=F64)
        tt = torch.full((n,), t, dtype=F64)
        xt = process.perturb(x0, tt, torch.randn(n, 1, generator=g, dtype=F64))
        pre(xt, tt)
        var = float(rec.calls[-1][0].var())
        assert abs(var - 1) < Z * math.sqrt(2 / (n - 1)), (t, var)


@pytest.mark.parametrize("process", PROCESSES, ids=PROCESS_IDS)
def test_preconditioned_scalar_time_broadcasts(process):
    """A scalar t means that time for the whole batch."""
    t = float(_times(process, 3)[1])
    x = torch.randn(5, 2, generator=gen(6), dtype=F64)
    pre = Preconditioned(_Recorder(), process)
    torch.testing.assert_close(pre(x, torch.tensor(t, dtype=F64)), pre(x, torch.full((5,), t, dtype=F64)))


@pytest.mark.parametrize("process", PROCESSES, ids=PROCESS_IDS)
@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
def test_as_denoiser_of_preconditioned_is_to_x0_of_its_output(process, predicts):
    """as_denoiser(Preconditioned(net)) shares alpha, sigma between the wrapper and the conversion;
    it must equal predicts.to_x0(process, x, t, Preconditioned(net)(x, t)) computed separately."""
    B, D = 6, 2
    t = _times(process, B)
    x = torch.randn(B, D, generator=gen(7), dtype=F64)
    pre = Preconditioned(_Recorder(), process, sigma_data=0.7)
    den = as_denoiser(pre, process, predicts)
    expected = predicts.to_x0(process, x, t, pre(x, t))
    torch.testing.assert_close(den(x, t), expected, rtol=1e-12, atol=1e-12)

    # the same with a real (perturbed) MLP, conditioning included
    net = _mlp(dim=D, num_classes=2)
    _perturb_last_layer(net)
    pre = Preconditioned(net, process)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    den = as_denoiser(pre, process, predicts)
    expected = predicts.to_x0(process, x, t, pre(x, t, class_labels=labels))
    torch.testing.assert_close(den(x, t, class_labels=labels), expected, rtol=1e-12, atol=1e-12)
