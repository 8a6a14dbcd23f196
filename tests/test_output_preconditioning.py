"""Output preconditioning (issue #10, item 4): closed-form tests of ``output_scalings`` and what uses it.

Karras et al. 2022, Eq. 7 and Table 1: x0_hat = c_skip x + c_out F(c_in x, c_noise) with, for alpha = 1,
c_skip = sigma_data^2 / (sigma^2 + sigma_data^2) and c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2);
for alpha != 1 the same applied to x / alpha = x0 + (sigma / alpha) eps (their Eq. 4). The other targets
keep their skip (their conversion to x0) and are scaled by their standard deviation, so that F's target
has unit variance (Sec. 5). The loss weight lambda = 1 / c_out^2 (Eq. 8) is unit weight on F. Checked here
against the formulas written out independently, the exact Gaussian-mixture denoiser (if F outputs its exact
target, the wrapped network is the exact denoiser), and the checkpoint round trip (a checkpoint without
``precondition_output`` keeps its old meaning). Float64 on the CPU.
"""

import inspect
import json
import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import EDM, VE, VP, Cosine, Discrete, Flow, GaussianMixture, SubVP
from torchdiffusion.core.denoiser import Preconditioned, as_denoiser
from torchdiffusion.core.predictions import ALL_PREDICTIONS, EPS, FLOW, SCORE, X0, V
from torchdiffusion.core.processes import beta_linear
from torchdiffusion.names import PREDICTIONS, WEIGHTINGS, build_net
from torchdiffusion.nets import MLP
from torchdiffusion.objectives import SIMPLE, denoising_loss
from torchdiffusion.training.checkpoint import load_denoiser, save_checkpoint
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
PROCESSES = [VP(), SubVP(), VE(), Cosine(), EDM(), Flow(), Discrete.from_schedule(beta_linear, 50)]
IDS = [type(p).__name__ for p in PROCESSES]
GM = GaussianMixture(weights=[0.3, 0.7], means=[[-1.0, 0.5], [0.8, -0.4]], variances=[[0.2, 0.05], [0.1, 0.3]])


def _times(process) -> torch.Tensor:
    """t_min, interior times and t_max where alpha(t_max) > 0 (Flow's alpha(1) = 0 is checked apart)."""
    lo, hi = process.t_min, process.t_max
    ts = [lo + u * (hi - lo) for u in (0.0, 0.002, 0.05, 0.3, 0.7, 0.97)]
    if float(process.alpha(torch.tensor(hi, dtype=F64))) > 0:
        ts.append(hi)
    return torch.tensor(ts, dtype=F64)


def _derivative(fn, t):
    u = t.clone().requires_grad_(True)
    y = fn(u)
    return torch.autograd.grad(y.sum(), u)[0] if y.requires_grad else torch.zeros_like(t)


def _expected(predicts, process, t, sigma_data):
    """(c_skip, c_out) per example, written out from the papers (x0: EDM's alpha = 1 table on x / alpha)."""
    a, s = process.alpha(t), process.sigma(t)
    if predicts is X0:
        r = s / a  # the noise level of x / alpha
        return sigma_data**2 / (r**2 + sigma_data**2) / a, r * sigma_data / torch.sqrt(r**2 + sigma_data**2)
    zero = torch.zeros_like(t)
    if predicts is EPS:
        return zero, torch.ones_like(t)
    if predicts is SCORE:
        return zero, 1 / s
    if predicts is V:
        return zero, torch.sqrt(a**2 + s**2 * sigma_data**2)
    da, ds = _derivative(process.alpha, t), _derivative(process.sigma, t)
    return zero, torch.sqrt(da**2 * sigma_data**2 + ds**2)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
def test_scalings_match_the_papers(process, predicts):
    """output_scalings against the closed forms above, for sigma_data 1 and 0.5: a few float64 roundings
    of O(1) numbers (1 / sigma at SubVP's t_min is 1e4, still a relative error)."""
    t = _times(process)
    x = torch.zeros(len(t), 3, dtype=F64)
    for sd in (1.0, 0.5):
        c_skip, c_out = predicts.output_scalings(process, t, x, sd)
        assert c_skip.shape == c_out.shape == (len(t), 1)
        skip, out = _expected(predicts, process, t, sd)
        torch.testing.assert_close(c_skip[:, 0], skip, rtol=1e-13, atol=0)
        torch.testing.assert_close(c_out[:, 0], out, rtol=1e-12, atol=0)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
def test_the_raw_target_has_unit_variance(process, predicts):
    """F's target (target - c_skip x_t) / c_out has variance 1 for x0 ~ N(0, sigma_data^2) and eps ~ N(0, 1)
    (Karras et al. 2022, Sec. 5), within Z s.e. sqrt(2 / (n - 1)) of the sample variance."""
    sd, n = 0.6, 20_000
    g = gen(1)
    for t in _times(process).tolist():
        tt = torch.full((n,), t, dtype=F64)
        x0 = sd * torch.randn(n, 1, generator=g, dtype=F64)
        eps = torch.randn(n, 1, generator=g, dtype=F64)
        x = process.perturb(x0, tt, eps)
        c_skip, c_out = predicts.output_scalings(process, tt, x, sd)
        raw = (predicts.from_x0(process, x, tt, x0, eps) - c_skip * x) / c_out
        assert abs(float(raw.var()) - 1) < Z * math.sqrt(2 / (n - 1)), (t, float(raw.var()))


def test_x0_raw_target_closed_form_and_limits():
    """x0: F's target = (sigma x0 - alpha sigma_data^2 eps) / (sigma_data sqrt(alpha^2 sigma_data^2 + sigma^2)),
    -v on VP with sigma_data = 1 (Salimans & Ho 2022); sigma -> 0: c_skip -> 1 / alpha, c_out -> sigma / alpha
    (an eps-network); alpha = 0 (Flow at t = 1): c_skip = 0, c_out = sigma_data (the target is x0 / sigma_data)."""
    p, sd = VP(), 0.7
    t = _times(p)
    x0, eps = torch.randn(len(t), 2, generator=gen(2), dtype=F64), torch.randn(len(t), 2, generator=gen(3), dtype=F64)
    x = p.perturb(x0, t, eps)
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    c_skip, c_out = X0.output_scalings(p, t, x, sd)
    closed = (s * x0 - a * sd**2 * eps) / (sd * torch.sqrt(a**2 * sd**2 + s**2))
    # x0 - c_skip x cancels to about sigma relative to |x|: rounding 1e-16 |x| / c_out
    atol = 1e-15 * float(x.abs().max() + 1) / float(c_out.min())
    torch.testing.assert_close((x0 - c_skip * x) / c_out, closed, rtol=0, atol=atol)
    c_skip1, c_out1 = X0.output_scalings(p, t, x, 1.0)
    torch.testing.assert_close((x0 - c_skip1 * x) / c_out1, -V.from_x0(p, x, t, x0, eps), rtol=0, atol=atol)
    one, tiny = torch.tensor([1.0], dtype=F64), torch.tensor([1e-9], dtype=F64)
    c_skip, c_out = X0.output_scalings(EDM(), tiny, tiny, sd)
    assert float(c_skip) == pytest.approx(1.0, rel=1e-15) and float(c_out) == pytest.approx(1e-9, rel=1e-15)
    c_skip, c_out = X0.output_scalings(Flow(), one, one, sd)
    assert float(c_skip) == 0.0 and float(c_out) == pytest.approx(sd, rel=1e-15)


class _ExactF(torch.nn.Module):
    """The raw network of the exact denoiser: F = (target(D*(x)) - c_skip x) / c_out, from the input it gets
    (c_in x, c_noise), with c_skip, c_out as written out in ``_expected``."""

    def __init__(self, process, sigma_data, predicts, t):
        super().__init__()
        self.process, self.sigma_data, self.predicts, self.t = process, sigma_data, predicts, t
        self.exact = GM.denoiser(process)

    def forward(self, x_in, c_noise):
        t, p = self.t, self.process
        a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
        torch.testing.assert_close(c_noise, -p.lam(t) / 4, rtol=1e-12, atol=1e-12)
        x = x_in * torch.sqrt(a**2 * self.sigma_data**2 + s**2)  # undo c_in
        skip, out = (c[:, None] for c in _expected(self.predicts, p, t, self.sigma_data))
        return (self.predicts.from_x0(p, x, t, self.exact(x, t)) - skip * x) / out


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
def test_exact_raw_output_gives_the_exact_denoiser(process, predicts):
    """If F outputs its exact target, as_denoiser(Preconditioned(F, predicts=...)) is the exact denoiser E[x0 | x_t]
    of the Gaussian mixture. Tolerance: the conversions' rounding (1e-16 |x|) amplified by |d x0 / d out| c_out and
    by 1 / alpha (x / alpha at t_max)."""
    sd = 0.8
    t = _times(process)
    g = gen(4)
    x0 = GM.sample(len(t), generator=g)
    x = process.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    f = _ExactF(process, sd, predicts, t)
    den = as_denoiser(Preconditioned(f, process, sd, predicts), process, predicts)
    amp = float((1 / process.alpha(t)).max()) * float(x.abs().max() + 1)
    torch.testing.assert_close(den(x, t), GM.denoiser(process)(x, t), rtol=1e-9, atol=1e-13 * amp)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_weights_the_raw_output(process, predicts, weighting):
    """Karras et al. 2022, Eq. 8: with output preconditioning, "simple" is lambda = 1 / c_out^2 on
    |out - target|^2, i.e. |F - F_target|^2: unit weight on the raw output. Every other weighting is defined in
    x0 units and does not change (the wrapper changes the network, not the bound)."""
    sd = 0.9
    t = _times(process)
    B, D = len(t), 2
    g = gen(5)
    x0, noise, e = (torch.randn(B, D, generator=g, dtype=F64) for _ in range(3))
    x = process.perturb(x0, t, noise)
    skip, out = (c[:, None] for c in _expected(predicts, process, t, sd))
    f_target = (predicts.from_x0(process, x, t, x0, noise) - skip * x) / out

    def raw(x_in, c_noise):  # F = its target + e, so |F - F_target|^2 = e^2
        return f_target + e

    model = Preconditioned(raw, process, sd, predicts)
    loss = denoising_loss(
        model, process, x0, target=predicts, weighting=WEIGHTINGS[weighting], t=t, noise=noise, sigma_data=sd
    )
    w = WEIGHTINGS[weighting](process, t, predicts, sigma_data=sd)
    if weighting == "simple":
        torch.testing.assert_close(w, out[:, 0] ** -2, rtol=1e-12, atol=0)
        # out - target = c_out e up to the rounding delta of its terms (a few ulps of |c_skip x| + |target| +
        # |c_out F|), which the weight 1 / c_out^2 turns into an error 2 |e| delta / c_out in the loss
        goal = predicts.from_x0(process, x, t, x0, noise)
        size = (skip * x).abs() + goal.abs() + (out * (f_target + e)).abs()
        bound = (2 * e.abs() * 8 * torch.finfo(F64).eps * size / out).amax(1)
        assert ((loss - (e**2).mean(1)).abs() <= bound).all()
    else:
        assert torch.equal(w, WEIGHTINGS[weighting](process, t, predicts))
        torch.testing.assert_close(loss, w * (out**2 * e**2).mean(1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_eps_is_unchanged_bit_for_bit(process):
    """eps has unit variance already (c_skip = 0, c_out = 1): preconditioning its output changes nothing, so eps
    runs and checkpoints are what they were; likewise its "simple" weight."""
    torch.manual_seed(0)
    net = MLP(dim=2, width=16, depth=1, emb_dim=8).double()
    for q in net.parameters():
        torch.nn.init.normal_(q, std=0.3)
    t = _times(process)
    x = torch.randn(len(t), 2, generator=gen(6), dtype=F64)
    assert torch.equal(Preconditioned(net, process, 0.7, EPS)(x, t), Preconditioned(net, process, 0.7)(x, t))
    assert torch.equal(SIMPLE(process, t, EPS, sigma_data=0.7), torch.ones_like(t))


@pytest.mark.parametrize("predicts", [X0, V, FLOW], ids=repr)
def test_flow_noise_end_gives_a_finite_denoiser(predicts):
    """Flow at t = 1: alpha = 0, lam = -inf. The network's time input c_noise = -lam / 4 is capped (at 10, beyond
    anything training draws), so targets whose conversion to x0 is finite there (x0, v, flow) give a finite x0_hat;
    at t < 1 the cap changes nothing."""
    p = Flow()
    torch.manual_seed(1)
    net = MLP(dim=2, width=16, depth=1, emb_dim=8).double()
    for q in net.parameters():
        torch.nn.init.normal_(q, std=0.3)
    x = torch.randn(4, 2, generator=gen(7), dtype=F64)
    seen = []
    pre = Preconditioned(lambda xi, c: seen.append(c) or net(xi, c), p, 0.8, predicts)
    x0_hat = as_denoiser(pre, p, predicts)(x, torch.ones(4, dtype=F64))
    assert torch.isfinite(x0_hat).all() and torch.equal(seen[0], torch.full((4,), 10.0, dtype=F64))
    t = torch.tensor([0.5, 0.9, 0.999, 1 - 1e-12], dtype=F64)
    pre(x, t)
    torch.testing.assert_close(seen[-1], -p.lam(t) / 4, rtol=1e-12, atol=0)


def test_preconditioned_output_and_conversion_must_agree():
    """A wrapper preconditioned for one target read as another would give a wrong x0_hat: a clear error."""
    pre = Preconditioned(lambda x, c: x, VP(), 1.0, V)
    with pytest.raises(ValueError, match="preconditioned for 'v', not 'x0'"):
        as_denoiser(pre, VP(), X0)
    with pytest.raises(TypeError, match="must be a Prediction"):  # names become objects only at the edge
        Preconditioned(lambda x, c: x, VP(), 1.0, "noise")


# -- the config key and the checkpoint -------------------------------------------------------------------------

NET = {"name": "mlp", "width": 16, "depth": 1, "emb_dim": 8, "dim": 2}
TINY = dict(data="moons", n_data=64, net={"name": "mlp", "width": 8, "depth": 1, "emb_dim": 8}, steps=2,
            batch_size=16, warmup=1, checkpoint_every=1, log_every=1)  # fmt: skip


def _load(path):
    clip = {"clip": False} if "clip" in inspect.signature(load_denoiser).parameters else {}
    return load_denoiser(path, **clip)


def test_train_config_preconditions_the_output_but_for_eps():
    """New runs precondition the output of every target but eps (where it changes nothing and is recorded false)."""
    assert all(TrainConfig(target=k).precondition_output is (k != "eps") for k in PREDICTIONS)
    assert TrainConfig(target="x0", precondition_output=False).precondition_output is False
    with pytest.raises(ValueError, match="precondition_output"):
        TrainConfig(precondition_output="yes")


@pytest.mark.parametrize("predicts", ALL_PREDICTIONS, ids=repr)
@pytest.mark.parametrize("stored", [None, False, True])
def test_checkpoints_load_as_they_were_written(tmp_path, predicts, stored):
    """A checkpoint written before precondition_output existed (no key) or with it false is the raw network it
    was; true gives the output-preconditioned wrapper: load_denoiser equals the matching wrapper bit for bit."""
    torch.manual_seed(0)
    net, ema = build_net(NET), build_net(NET)
    for q in ema.parameters():
        torch.nn.init.normal_(q)
    config = {"process": {"name": "vp"}, "net": NET, "target": predicts.name, "sigma_data": 0.7}
    if stored is not None:
        config["precondition_output"] = stored
    save_checkpoint(tmp_path, net=net, ema_net=ema, config=config, state={"step": 1})
    den, process, _ = _load(tmp_path)
    x, t = torch.randn(5, 2), torch.rand(5) * 0.9 + 0.05
    expected = as_denoiser(Preconditioned(ema, process, 0.7, predicts if stored else None), process, predicts)(x, t)
    assert torch.equal(den(x, t), expected)


def test_resuming_a_run_from_before_output_preconditioning_is_refused(tmp_path):
    """A resumed run must not switch a network to the preconditioned output under its old weights: a checkpoint
    without the key differs from a new x0 config in precondition_output (named in the error); with
    precondition_output=False it resumes as it was."""
    train(TrainConfig(**TINY, target="x0", precondition_output=False), tmp_path, progress=False)
    path = tmp_path / "checkpoint" / "config.json"
    stored = json.loads(path.read_text())
    assert stored["precondition_output"] is False
    del stored["precondition_output"]  # as written before the key existed
    path.write_text(json.dumps(stored))
    more = {**TINY, "steps": 3, "target": "x0"}
    with pytest.raises(ValueError, match="precondition_output"):
        train(TrainConfig(**more), tmp_path, resume=True, progress=False)
    result = train(TrainConfig(**more, precondition_output=False), tmp_path, resume=True, progress=False)
    assert result.history[-1]["step"] == 3


@pytest.mark.parametrize("predicts", [X0, SCORE], ids=repr)
def test_a_new_run_records_the_key_and_loads_as_it_trained(tmp_path, predicts):
    """train writes precondition_output: true, and load_denoiser then wraps the EMA net as training did."""
    result = train(TrainConfig(**{**TINY, "target": predicts.name}), tmp_path, progress=False)
    assert result.config["precondition_output"] is True
    den = _load(tmp_path)[0]
    x, t = torch.randn(5, 2), torch.rand(5) * 0.9 + 0.05
    sd, p = result.config["sigma_data"], result.process
    assert torch.equal(den(x, t), as_denoiser(Preconditioned(result.ema_net, p, sd, predicts), p, predicts)(x, t))
