"""The data's bounding box and the clipped denoiser (support.py; issue #10, item 3).

Closed forms: the ideal denoiser of a point set is a convex combination of its points, so it lies
in their box, and projection onto a box (a convex set holding it) never moves a prediction away
from it. A denoiser that extrapolates wrongly in the prior's tail carries deterministic samples
off the data; clipped, every sampler that ends with a denoise returns samples inside the box.
"""

import json
import math

import numpy as np
import pytest
import torch

from conftest import gen
from torchdiffusion import VP, GaussianMixture, grid_lam, grid_t
from torchdiffusion.core.support import ClippedDenoiser, clip_denoiser, data_box
from torchdiffusion.names import INFO, SAMPLERS
from torchdiffusion.training.checkpoint import CheckpointError, load_denoiser
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train

F64 = torch.float64
EPS = torch.finfo(F64).eps


def points(n=40, d=3, seed=0):
    return torch.randn(n, d, generator=gen(seed), dtype=F64) * torch.tensor([1.0, 0.3, 2.0], dtype=F64)[:d] + 0.5


def test_data_box_is_per_coordinate_for_points_and_one_interval_for_images():
    x = points()
    low, high = data_box(x)
    assert low == x.amin(0).tolist() and high == x.amax(0).tolist()
    images = torch.rand(5, 1, 4, 4, generator=gen(1)) * 2 - 1
    assert data_box(images) == ([float(images.min())], [float(images.max())])


def test_ideal_denoiser_of_a_point_set_lies_in_its_box_so_clipping_leaves_it_unchanged(continuous_process):
    pts = points()
    truth = GaussianMixture(torch.ones(len(pts)), pts, 0.0)  # point masses: E[x0 | x_t] is a convex combination
    low, high = (torch.tensor(v, dtype=F64) for v in data_box(pts))
    x = 4 * torch.randn(256, 3, generator=gen(2), dtype=F64)  # far into the tails too
    t = continuous_process.t_min + (continuous_process.t_max - continuous_process.t_min) * torch.rand(
        256, generator=gen(3), dtype=F64
    )
    ideal = truth.denoiser(continuous_process)(x, t)
    # A convex combination computed in float64 exceeds the hull by at most a few roundings of |pts|.
    slack = 8 * len(pts) * EPS * float(pts.abs().max())
    assert bool((ideal >= low - slack).all() and (ideal <= high + slack).all())
    clipped = clip_denoiser(truth.denoiser(continuous_process), low, high)(x, t)
    assert torch.allclose(clipped, ideal, rtol=0, atol=slack)


def test_clipping_never_moves_a_prediction_away_from_any_point_of_the_box():
    """Non-expansiveness of the projection onto a convex set: |P(a) - b| <= |a - b| for b in the box."""
    pts = points()
    low, high = (torch.tensor(v, dtype=F64) for v in data_box(pts))
    b = low + (high - low) * torch.rand(1000, 3, generator=gen(4), dtype=F64)  # points of the box
    a = b + 3 * torch.randn(1000, 3, generator=gen(5), dtype=F64)  # predictions with errors
    clipped = ClippedDenoiser(lambda x, t: x, low, high)(a, torch.zeros(1000))
    before, after = (a - b).norm(dim=1), (clipped - b).norm(dim=1)
    assert bool((after <= before + 4 * EPS * before).all())
    assert bool((after < before).any())  # it does something: predictions outside the box move


def test_a_box_with_low_above_high_or_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="low <= high"):
        clip_denoiser(lambda x, t: x, [1.0, 0.0], [0.0, 1.0])
    clipped = clip_denoiser(lambda x, t: x, [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 coordinates"):
        clipped(torch.zeros(4, 3), torch.zeros(4))


def runaway_denoiser(process, truth):
    """The exact denoiser, except that its eps_hat falls short of x in the prior's tail (|x| > 3), as an
    eps network's extrapolation does: eps_hat = eps_exact - 0.2 (|x| - 3)_+ x / |x|. The x0_hat that
    follows is divided by alpha(t), 1 / 0.0066 at VP's t_max."""
    exact = truth.denoiser(process)

    def denoise(x, t, **cond):
        x0 = exact(x, t)
        a, s = process.alpha(t)[:, None].to(x), process.sigma(t)[:, None].to(x)
        eps = (x - a * x0) / s
        r = x.norm(dim=1, keepdim=True)
        eps = eps - 0.2 * (r - 3).clamp(min=0) * x / r
        return (x - s * eps) / a

    return denoise


@pytest.mark.parametrize("name", [n for n, info in INFO.items() if not info.stochastic and n != "ode_adaptive"])
def test_deterministic_samplers_stay_in_the_box_from_tail_starts_when_clipped(name):
    process = VP()
    pts = points(d=2)
    truth = GaussianMixture(torch.ones(len(pts)), pts, 0.0)
    low, high = (torch.tensor(v, dtype=F64) for v in data_box(pts))
    ang = torch.linspace(0, 2 * math.pi, 9, dtype=F64)[:-1]
    x_T = 4.5 * torch.stack([ang.cos(), ang.sin()], 1)  # starts in the prior's tail
    grid = grid_t if INFO[name].grid == "t" else grid_lam
    ts = grid(process, 12)
    bad = runaway_denoiser(process, truth)
    reach = float(torch.maximum(low.abs(), high.abs()).norm())  # the box's farthest corner from 0

    def farthest(denoiser):
        seen = []
        out = SAMPLERS[name](denoiser, process, x_T, ts, callback=lambda info: seen.append(info["x0_hat"]))
        return out, float(torch.stack(seen).norm(dim=-1).max())

    _, raw_far = farthest(bad)
    assert raw_far > 10 * reach  # the runaway x0_hat that throws the samples off
    clipped, clipped_far = farthest(clip_denoiser(bad, low, high))
    assert clipped_far <= reach * (1 + 4 * EPS)
    assert bool((clipped >= low).all() and (clipped <= high).all())  # final denoise: x0_hat, clipped


NET = {"name": "mlp", "width": 16, "depth": 1, "emb_dim": 8}


def tiny(**kw) -> TrainConfig:
    base = dict(n_data=128, net=NET, steps=4, batch_size=16, warmup=1, checkpoint_every=4, log_every=2)
    return TrainConfig(**{**base, **kw})


def test_training_records_the_data_box_and_loading_clips_to_it(tmp_path):
    data = points(n=100, d=2).float()
    np.save(tmp_path / "data.npy", data.numpy())
    train(tiny(data=str(tmp_path / "data.npy")), tmp_path / "run", progress=False)
    tmp_path = tmp_path / "run"
    stored = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    low, high = stored["data_box"]
    assert low == data.amin(0).tolist() and high == data.amax(0).tolist()
    denoiser, process, config = load_denoiser(tmp_path)
    assert isinstance(denoiser, ClippedDenoiser) and config["data_box"] == [low, high]
    x, t = 50 * torch.randn(64, 2, generator=gen(6)), torch.full((64,), process.t_max)
    out = denoiser(x, t)
    assert bool((out >= torch.tensor(low)).all() and (out <= torch.tensor(high)).all())
    raw, _, _ = load_denoiser(tmp_path, clip=False)
    assert torch.equal(out, torch.clamp(raw(x, t), torch.tensor(low), torch.tensor(high)))


def test_an_old_checkpoint_without_a_box_loads_unclipped_and_resumes(tmp_path):
    train(tiny(), tmp_path, progress=False)
    path = tmp_path / "checkpoint" / "config.json"
    stored = json.loads(path.read_text())
    del stored["data_box"]
    path.write_text(json.dumps(stored))
    denoiser, _, _ = load_denoiser(tmp_path)
    assert not isinstance(denoiser, ClippedDenoiser)
    result = train(tiny(steps=6), tmp_path, resume=True, progress=False)  # the box is measured, not a change
    assert result.config["data_box"] is not None


def test_a_corrupt_box_in_a_checkpoint_is_a_checkpoint_error(tmp_path):
    train(tiny(), tmp_path, progress=False)
    path = tmp_path / "checkpoint" / "config.json"
    stored = json.loads(path.read_text())
    stored["data_box"] = [[1.0, 1.0], [0.0, 0.0]]
    path.write_text(json.dumps(stored))
    with pytest.raises(CheckpointError, match="data_box"):
        load_denoiser(tmp_path)
