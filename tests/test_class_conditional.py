"""Class-conditional 2-D runs and classifier-free guidance on trained models (issue #12, item 1).

* The labeled built-in sets (``data.LABELED_TOY_DATASETS``) return each point's component as its label, from the
  draw the points are built from: the same points with or without labels, label frequencies equal to the component
  weights, and labels that mean what the docstrings say (closed-form conditional moments).
* Label dropout (Ho & Salimans 2022, Algorithm 1): the network sees the null label K with probability p, only the
  labels change (the drops are drawn after times and noise), and 2 DDP ranks still equal one process.
* ``Pipeline.guided(w)`` is null + w (cond - null) of the trained denoiser, and ``sample --guidance`` is the same
  in the command line.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import torchdiffusion as td
from conftest import Z, gen
from torchdiffusion.app.cli import main
from torchdiffusion.data import (
    LABELED_TOY_DATASETS,
    TOY_DATASETS,
    eight_gaussians_mixture_params,
    load_dataset,
    make_2d,
    toy,
)
from torchdiffusion.objectives import denoising as losses
from torchdiffusion.training import loop as loop_mod
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train
from torchdiffusion.training.resolve import load_training_data, resolve_config

pytestmark = pytest.mark.usefixtures("single_thread")

LABELED = sorted(LABELED_TOY_DATASETS)
N_STAT = 20_000
NET = {"name": "mlp", "width": 16, "depth": 1, "emb_dim": 8}
F32_EPS = torch.finfo(torch.float32).eps


def tiny(**kw) -> TrainConfig:
    base = dict(data="8gaussians", class_conditional=True, n_data=256, net=NET, steps=5, batch_size=64, warmup=2)
    return TrainConfig(**{**base, **kw})


# -- labeled 2-D sets ----------------------------------------------------------------------------------------------


def test_the_table_names_the_sets_drawn_as_mixtures():
    assert set(LABELED_TOY_DATASETS) <= set(TOY_DATASETS)
    assert LABELED_TOY_DATASETS == {"8gaussians": 8, "moons": 2, "circles": 2, "pinwheel": 5}


@pytest.mark.parametrize("name", LABELED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_labels_leave_the_points_and_the_stream_unchanged(name, dtype):
    """The same points, bit for bit, and the generator left in the same state (no extra random numbers)."""
    g1, g2 = gen(5), gen(5)
    plain = make_2d(name, 500, generator=g1, dtype=dtype)
    x, labels = make_2d(name, 500, generator=g2, dtype=dtype, return_labels=True)
    assert torch.equal(x, plain) and x.dtype == dtype
    assert torch.equal(g1.get_state(), g2.get_state())
    assert labels.dtype == torch.int64 and labels.shape == (500,)
    assert int(labels.min()) >= 0 and int(labels.max()) < LABELED_TOY_DATASETS[name]
    x0, l0 = make_2d(name, 0, return_labels=True)
    assert x0.shape == (0, 2) and l0.shape == (0,)


@pytest.mark.parametrize("name", LABELED)
def test_label_frequencies_are_the_component_weights(name):
    """Every component has weight 1/K: each class's frequency within Z binomial standard errors of 1/K."""
    K = LABELED_TOY_DATASETS[name]
    _, labels = make_2d(name, N_STAT, generator=gen(11), return_labels=True)
    freq = torch.bincount(labels, minlength=K).double() / N_STAT
    se = math.sqrt((1 / K) * (1 - 1 / K) / N_STAT)
    assert len(freq) == K and ((freq - 1 / K).abs() < Z * se).all(), freq


def test_eight_gaussians_label_is_the_nearest_mean():
    """Label k is the Gaussian at row k of ``eight_gaussians_mixture_params``'s means.

    Not every point is nearest to its own mean: the Voronoi cell of mean k is the wedge of half-angle pi/8 around
    it, whose two edges lie at distance R sin(pi/8) from the mean (R = 2/s the radius); a point leaves the cell only
    if its Gaussian offset (std sigma = 0.2/s) exceeds that along an edge's normal. So a point is misassigned with
    probability q <= 2 Phi_bar(R sin(pi/8) / sigma) = 2 Phi_bar(10 sin(pi/8)) = 2 Phi_bar(3.83) ~= 1.3e-4 (s
    cancels): the modes are well separated, but among 20,000 points a few cross over (all of n points stay home
    with probability (1 - q)^n, only ~0.97 at n = 200). The count is Binomial(n, q): at most n q + Z sqrt(n q),
    ~12 here, where a wrong labelling (e.g. shifted by one) gives ~n."""
    _, means, variances = eight_gaussians_mixture_params()
    x, labels = make_2d("8gaussians", N_STAT, generator=gen(12), dtype=torch.float64, return_labels=True)
    nearest = torch.cdist(x, means).argmin(1)
    d = float(means[0].norm() * math.sin(math.pi / 8) / variances[0, 0].sqrt())
    q = math.erfc(d / math.sqrt(2))  # 2 Phi_bar(d)
    wrong = int((nearest != labels).sum())
    assert wrong <= N_STAT * q + Z * math.sqrt(N_STAT * q), (wrong, N_STAT * q)


def test_moons_label_0_is_the_upper_moon():
    """Raw upper moon (cos t, sin t), lower (1 - cos t, 1/2 - sin t), t ~ U[0, pi]: class means (0, 2/pi) and
    (1, 1/2 - 2/pi), standardised like the points; within Z standard errors (sample std / sqrt(n_k))."""
    x, labels = make_2d("moons", N_STAT, generator=gen(13), dtype=torch.float64, return_labels=True)
    mu, s = torch.tensor(toy._MOONS_MU, dtype=torch.float64), toy._MOONS_SCALE
    raw = {0: (0.0, 2 / math.pi), 1: (1.0, 0.5 - 2 / math.pi)}
    for k, m in raw.items():
        xk = x[labels == k]
        expected = (torch.tensor(m, dtype=torch.float64) - mu) / s
        se = xk.std(0) / math.sqrt(len(xk))
        assert ((xk.mean(0) - expected).abs() < Z * se).all(), (k, xk.mean(0), expected)


def test_circles_label_0_is_the_outer_circle():
    """E||x_raw||^2 = r^2 + 2 noise^2 on the circle of radius r (r = 1 for label 0, 0.5 for label 1), over s^2."""
    x, labels = make_2d("circles", N_STAT, generator=gen(14), dtype=torch.float64, return_labels=True)
    for k, r in enumerate(toy._CI_RADII):
        sq = (x[labels == k] ** 2).sum(1)
        expected = (r**2 + 2 * toy._CI_NOISE**2) / toy._CI_SCALE**2
        assert abs(sq.mean().item() - expected) < Z * sq.std().item() / math.sqrt(len(sq)), (k, sq.mean(), expected)


def test_pinwheel_label_is_the_arm():
    """Arm k is arm 0 turned by -2 pi k / 5: turned back by +2 pi k / 5, every class has the mean of class 0
    (two-sample test, Z standard errors); a label off by one arm would be off by 72 degrees."""
    x, labels = make_2d("pinwheel", N_STAT, generator=gen(15), dtype=torch.float64, return_labels=True)
    ref = x[labels == 0]
    for k in range(1, 5):
        a = 2 * math.pi * k / 5
        rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
        back = x[labels == k] @ rot.T
        se = (back.var(0) / len(back) + ref.var(0) / len(ref)).sqrt()
        assert ((back.mean(0) - ref.mean(0)).abs() < Z * se).all(), (k, back.mean(0), ref.mean(0))


@pytest.mark.parametrize("name", ["swiss_roll", "checkerboard"])
def test_sets_without_labels_say_which_have(name):
    with pytest.raises(ValueError, match=f"'{name}' has no class labels") as info:
        make_2d(name, 10, return_labels=True)
    assert all(f"{k} ({v} classes)" in str(info.value) for k, v in LABELED_TOY_DATASETS.items())


# -- training data -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LABELED)
def test_conditional_runs_train_on_the_points_of_unconditional_runs(name):
    """The labels come with the same points: a class-conditional run's data are an unconditional run's, bit for bit
    (and those are still ``load_dataset``'s); the net gets K classes from the table."""
    plain, none = load_training_data(TrainConfig(data=name, n_data=300), generator=gen(3))
    x, labels = load_training_data(TrainConfig(data=name, n_data=300, class_conditional=True), generator=gen(3))
    assert none is None and torch.equal(x, plain) and torch.equal(plain, load_dataset(name, 300, generator=gen(3)))
    assert torch.equal(labels, make_2d(name, 300, generator=gen(3), return_labels=True)[1])
    cfg = resolve_config(TrainConfig(data=name, n_data=300, class_conditional=True, net=NET), x, labels)
    assert cfg.net["num_classes"] == LABELED_TOY_DATASETS[name]


def test_a_small_draw_still_gets_every_class():
    """Four points of 8gaussians miss some of the 8 components; the net still gets 8 classes (null label 8)."""
    cfg = TrainConfig(data="8gaussians", n_data=4, class_conditional=True, net=NET)
    x, labels = load_training_data(cfg, generator=gen(0))
    assert len(labels.unique()) < 8 and resolve_config(cfg, x, labels).net["num_classes"] == 8


def test_a_conditional_run_on_data_without_labels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="class_conditional needs labels") as info:
        train(tiny(data="swiss_roll"), tmp_path / "run", progress=False)
    assert all(name in str(info.value) for name in LABELED_TOY_DATASETS)
    assert not (tmp_path / "run").exists()


# -- label dropout -------------------------------------------------------------------------------------------------


def _record(monkeypatch) -> tuple[list[dict], dict]:
    """Record what every loss call gets (x0, t, noise, class_labels) and the run's (data, labels)."""
    calls, data = [], {}
    real_loss, real_load = losses.denoising_loss, loop_mod.load_training_data

    def loss(model, process, x0, **kw):
        calls.append({"x0": x0.clone(), "t": kw["t"].clone(), "noise": kw["noise"].clone(),
                      "labels": kw["class_labels"].clone()})  # fmt: skip
        return real_loss(model, process, x0, **kw)

    def load(config, generator=None):
        data["x"], data["labels"] = real_load(config, generator=generator)
        return data["x"], data["labels"]

    monkeypatch.setattr(losses, "denoising_loss", loss)
    monkeypatch.setattr(loop_mod, "load_training_data", load)
    return calls, data


def _weights(result) -> list[torch.Tensor]:
    return [t.clone() for t in result.net.state_dict().values()]


def test_label_dropout_replaces_labels_by_the_null_class_and_changes_nothing_else(tmp_path, monkeypatch):
    """p = 0: every label is the point's component (never the null label 8), and the run is the run without the
    field, weight for weight. p = 0.5: the same examples (indices come from their own generator), the same times and
    noise in step 1 (the drops are drawn after them), labels equal where not dropped, and the share of null labels
    within Z binomial standard errors of 0.5 over all 5 x 128 labels (Z se = 0.12)."""
    B, steps = 128, 5
    runs = {}
    for p in (0.0, 0.5):
        calls, data = _record(monkeypatch)
        result = train(tiny(label_dropout=p, batch_size=B, steps=steps), tmp_path / f"p{p}", progress=False)
        runs[p] = calls, data, _weights(result)
        monkeypatch.undo()
    omitted = train(tiny(batch_size=B, steps=steps), tmp_path / "omitted", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(runs[0.0][2], _weights(omitted), strict=True))

    (calls0, data0, _), (calls5, data5, _) = runs[0.0], runs[0.5]
    assert len(calls0) == len(calls5) == steps
    assert torch.equal(data0["x"], data5["x"]) and torch.equal(data0["labels"], data5["labels"])
    for call in calls0:  # each point's own component, found by its row in the training data
        rows = (call["x0"][:, None, :] == data0["x"][None]).all(-1).float().argmax(1)
        assert torch.equal(data0["x"][rows], call["x0"])
        assert torch.equal(call["labels"], data0["labels"][rows])
    assert torch.equal(calls0[0]["t"], calls5[0]["t"]) and torch.equal(calls0[0]["noise"], calls5[0]["noise"])
    null = 8
    dropped = []
    for a, b in zip(calls0, calls5, strict=True):
        assert torch.equal(a["x0"], b["x0"])
        drop = b["labels"] == null
        assert torch.equal(b["labels"][~drop], a["labels"][~drop])
        dropped.append(drop)
    share, n = torch.cat(dropped).double().mean().item(), steps * B
    assert abs(share - 0.5) < Z * math.sqrt(0.25 / n), share


def test_label_dropout_needs_a_class_conditional_run():
    with pytest.raises(ValueError, match="class_conditional=True"):
        TrainConfig(data="8gaussians", label_dropout=0.1)
    for p in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="label_dropout"):
            TrainConfig(data="8gaussians", class_conditional=True, label_dropout=p)


def test_two_ranks_equal_one_process_with_label_dropout(tmp_path):
    """tests/test_ddp.py's check with label dropout and 2 micro-batches per rank: every rank draws the drops of the
    whole global batch and takes its slice, so 2 ranks x 8 x 2 micro-batches end with the weights of one process x
    32 (to the order of float32 sums, < 1e-5 after 5 Adam steps)."""
    from test_ddp import max_diff, spawn

    kw = dict(label_dropout=0.5, lr=2e-3, net={"name": "mlp", "width": 32, "depth": 2, "emb_dim": 16})
    single = train(tiny(batch_size=32, **kw), tmp_path / "single", progress=False)
    ranks = spawn(tiny(batch_size=8, grad_accum=2, **kw), tmp_path / "ddp", tmp_path / "ranks")
    diff = max_diff(ranks[0]["weights"], single.net.state_dict())
    print(f"max |w_ddp - w_single| = {diff:.3g}")
    assert diff < 1e-5
    assert max_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0.0


# -- Pipeline.guided -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny 8gaussians runs: class-conditional with label dropout 0.2 and without, and an unconditional one."""
    root = tmp_path_factory.mktemp("cc")
    configs = {
        "cfg": tiny(label_dropout=0.2),
        "no_dropout": tiny(),
        "unconditional": tiny(class_conditional=False),
    }
    for name, cfg in configs.items():
        train(cfg, root / name, progress=False)
    return {name: root / name for name in configs}


def _doubled(pipe, n=64, seed=0):
    """(x, t, c) and the conditional and null x0_hat of the trained denoiser, evaluated as classifier_free does (one
    batch of 2n: the same rows, so the guided output can be compared to float32 rounding of its own formula)."""
    g = gen(seed)
    p = pipe.process
    x = torch.randn(n, 2, generator=g)
    t = p.t_min + (p.t_max - p.t_min) * torch.rand(n, generator=g)
    c = torch.arange(n) % pipe.num_classes
    null = torch.full_like(c, pipe.num_classes)
    with torch.no_grad():
        both = pipe.denoiser(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([c, null]))
    return x, t, c, both[:n], both[n:]


def test_guided_at_1_is_the_conditional_and_at_0_the_null_denoiser(runs):
    """D_w = null + w (cond - null) (Ho & Salimans 2022, Eq. 6): w = 0 gives null exactly (0 times a finite number
    is 0); w = 1 rounds twice, |D_1 - cond| <= eps32 (|cond - null| + |cond|) per coordinate."""
    pipe = td.load(runs["cfg"])
    x, t, c, cond, null = _doubled(pipe)
    assert not torch.equal(cond, null)  # the labels reach the network
    with torch.no_grad():
        d1 = pipe.guided(1.0).denoiser(x, t, class_labels=c)
        d0 = pipe.guided(0.0).denoiser(x, t, class_labels=c)
        d3 = pipe.guided(3.0).denoiser(x, t, class_labels=c)
    bound = F32_EPS * ((cond - null).abs() + cond.abs())
    assert ((d1 - cond).abs() <= bound).all(), ((d1 - cond).abs() / bound).max()
    assert torch.equal(d0, null)
    # w = 3: null + 3 (cond - null), the same two roundings plus the product's
    expected = null + 3 * (cond - null)
    assert ((d3 - expected).abs() <= 2 * F32_EPS * (3 * (cond - null).abs() + expected.abs())).all()


def test_guided_keeps_the_conditional_model_outside_its_interval(runs):
    pipe = td.load(runs["cfg"])
    x, t, c, cond, _ = _doubled(pipe, seed=1)
    lo, hi = 0.3, 0.6
    with torch.no_grad():
        limited = pipe.guided(4.0, interval=(lo, hi)).denoiser(x, t, class_labels=c)
        full = pipe.guided(4.0).denoiser(x, t, class_labels=c)
    inside = (t >= lo) & (t <= hi)
    assert inside.any() and (~inside).any()
    assert torch.equal(limited[~inside], cond[~inside]) and torch.equal(limited[inside], full[inside])


def test_guided_pipeline_samples(runs):
    """A guided pipeline is a pipeline: same fields, guided denoiser; its samples have the shape and are finite."""
    pipe = td.load(runs["cfg"])
    guided = pipe.guided(3.0)
    assert guided.process is pipe.process and guided.num_classes == 8 and guided.shape == (2,)
    x0 = guided.sample(100, labels=2, steps=5, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (100, 2) and bool(x0.isfinite().all()) and x0.grad_fn is None


@pytest.mark.parametrize(
    "run, words", [("no_dropout", "label_dropout=0.1"), ("unconditional", "class_conditional=True")]
)
def test_guided_needs_a_conditional_run_with_label_dropout(runs, run, words):
    with pytest.raises(ValueError, match=words):
        td.load(runs[run]).guided(2.0)


# -- torchdiffusion sample --guidance ------------------------------------------------------------------------------


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("interval", [None, (0.2, 0.8)], ids=["everywhere", "interval"])
def test_sample_guidance_is_the_guided_pipeline(runs, tmp_path, interval):
    """The command line's samples are ``load(run).guided(2, interval=...).sample(...)``'s, bit for bit."""
    out = tmp_path / "s.npy"
    extra = [] if interval is None else ["--guidance-interval", ",".join(map(str, interval))]
    r = cli("sample", "--checkpoint", runs["cfg"], "--class", 3, "--guidance", 2, "--n", 16, "--steps", 5,
            "--out", out, "--no-progress", *extra)  # fmt: skip
    assert r.exit_code == 0, r.output
    xs = np.load(out)
    assert xs.shape == (16, 2) and np.isfinite(xs).all() and out.with_suffix(".png").is_file()
    guided = td.load(runs["cfg"]).guided(2.0, interval=interval)
    # --steps without --sampler: the few-step default (UniPC-3 on the optimized grid), Pipeline.sample's too
    expected = guided.sample(16, steps=5, labels=3, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(xs, expected.numpy())


@pytest.mark.parametrize(
    "run, option, words",
    [
        ("cfg", ["--guidance", "2", "--guidance-interval", "bad"], ["--guidance-interval", "LO,HI"]),
        ("cfg", ["--guidance", "2", "--guidance-interval", "0.8,0.2"], ["interval", "t_lo <= t_hi"]),
        ("cfg", ["--guidance-rescale", "0.5"], ["--guidance-rescale", "--guidance W"]),
        ("cfg", ["--guidance-interval", "0.2,0.8"], ["--guidance-interval", "--guidance W"]),
        ("cfg", ["--guidance", "-1"], ["--guidance"]),
        ("cfg", ["--guidance", "2", "--guidance-rescale", "1.5"], ["--guidance-rescale"]),
        ("no_dropout", ["--guidance", "2"], ["label_dropout=0.1"]),
        ("unconditional", ["--guidance", "2"], ["class_conditional=True"]),
    ],
)
def test_bad_guidance_options_are_refused(runs, tmp_path, run, option, words):
    out = tmp_path / "s.npy"
    r = cli("sample", "--checkpoint", runs[run], "--n", 8, "--steps", 2, "--out", out, "--no-progress", *option)
    assert r.exit_code != 0
    for w in words:
        assert w in r.output, r.output
    assert not out.exists()
