"""The glue of benchmarks/bench_latent.py (pixel, latent and cascaded diffusion at equal training time).

- Training in chunks: ``train_until`` stops a run with a callback (``_OutOfTime``, a KeyboardInterrupt, on which the
  loop saves a checkpoint) and resumes it. With a constant lr after the warm-up, the step's update does not depend on
  the total number of steps, so a run stopped and resumed twice must end with the weights, bit for bit, of one
  uninterrupted run of the same number of steps (the loop's resume is deterministic).
- ``reach`` / ``_at`` read a piecewise-linear curve: on points of a line, the crossing and the value are the line's,
  exact up to float rounding of a few operations (1e-12 is far above that and far below any wrong segment).
- ``psnr`` of x = ref + c (a constant offset, float64) is 10 log10(4 / c^2) up to rounding (1e-9 dB is far above it).
- ``linear_inverse`` recovers every 16 x 16 digit from its 2 x 2 pools (the SR comparison's exact answer).
- ``targets``: a curve that reaches the pixel level before half the pixel time holds; one that never does, not.
"""

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # its siblings import each other
B = importlib.import_module("bench_latent")


def _curve(points):
    return [{"seconds": s, "fid": f} for s, f in points]


def test_reach_and_at_follow_the_line_between_points():
    curve = _curve([(10.0, 40.0), (20.0, 20.0), (40.0, 10.0)])
    t, bound = B.reach(curve, 30.0)  # on the first segment: fid = 40 - 2 (s - 10)
    assert abs(t - 15.0) < 1e-12 and not bound
    t, _ = B.reach(curve, 15.0)  # on the second: fid = 20 - (s - 20) / 2
    assert abs(t - 30.0) < 1e-12
    assert B.reach(curve, 50.0) == (10.0, True)  # already below at the first point: an upper bound
    assert B.reach(curve, 5.0) == (None, False)
    assert abs(B._at(curve, 30.0) - 15.0) < 1e-12
    assert B._at(curve, 5.0) is None and B._at(curve, 40.0) == 10.0


def test_psnr_of_a_constant_offset():
    # float64, away from the clamp at +-1: x - ref is c up to one rounding (1e-17), so PSNR to ~1e-14 dB
    ref = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    for c in (0.01, 0.1, 0.3):
        assert abs(B.psnr(ref + c, ref) - 10 * math.log10(4 / c**2)) < 1e-9


def test_targets_hold_or_miss():
    pixel = _curve([(50.0, 30.0), (100.0, 12.0)])
    fast = _curve([(20.0, 20.0), (40.0, 10.0), (100.0, 8.0)])  # reaches 12 at 36 s: 0.36 of the pixel time
    slow = _curve([(50.0, 25.0), (100.0, 15.0)])
    res = {"contenders": {name: {"curve": c, "final": c[-1]} for name, c in
                          (("pixel", pixel), ("latent", fast), ("cascade", slow))}}  # fmt: skip
    got = {t["contender"]: t for t in B.targets(res)}
    assert got["latent"]["ok"] and abs(got["latent"]["ratio"] - 0.36) < 1e-12
    assert not got["cascade"]["ok"] and got["cascade"]["reach_seconds"] is None
    assert "latent" in B.verdict(list(got.values())) and "holds" in B.verdict(list(got.values()))


def test_split_is_a_partition():
    from torchdiffusion.data import load_images

    train, held = B.split_digits()
    assert len(train) == B.TRAIN_N

    def rows(x):
        return sorted(map(tuple, x.flatten(1).tolist()))

    assert rows(torch.cat([train, held])) == rows(load_images("digits16")[0])  # every digit once, as a multiset


def test_chunked_training_equals_one_run(tmp_path):
    from torchdiffusion.training.checkpoint import load_checkpoint
    from torchdiffusion.training.config import TrainConfig
    from torchdiffusion.training.loop import train

    base = dict(B.TRAIN, data="moons", n_data=512, net={"name": "mlp", "width": 32, "depth": 2}, warmup=5)
    cfg = TrainConfig.from_dict({**base, "batch_size": 32})
    state = {"seconds": 0.0, "step": 0}
    for secs in (0.3, 0.6, 0.9):  # three chunks, each stopped by the clock at some step
        B.train_until("pixel", cfg, tmp_path / "chunked", state, secs)
    steps = load_checkpoint(tmp_path / "chunked" / "checkpoint").step
    assert steps == state["step"] > 0
    one = TrainConfig.from_dict({**cfg.to_dict(), "steps": steps})
    train(one, tmp_path / "one", progress=False)
    a = load_checkpoint(tmp_path / "chunked" / "checkpoint")
    b = load_checkpoint(tmp_path / "one" / "checkpoint")
    for (k, v), (_, w) in zip(a.ema_net.state_dict().items(), b.ema_net.state_dict().items()):
        assert torch.equal(v, w), k
    for (k, v), (_, w) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(v, w), k


def test_linear_inverse_recovers_the_digits_from_their_pools():
    import torch.nn.functional as F

    from torchdiffusion.data import load_images

    # x = U x8 in float32, inverted in float64: the error is float32 rounding of x (6e-8 on [-1, 1]) times the
    # conditioning of P U per axis (its smallest singular value is >= 3/4 - 2 / 8 = 1/2, so <= 2 per axis, 4 in all)
    x = load_images("digits16")[0]
    assert float((B.linear_inverse(F.avg_pool2d(x, 2)) - x).abs().max()) < 16 * 6e-8
