"""benchmarks/bench_family.py: target (i-fixed)'s rule applied per random mixture, and one mixture scored end to end.

The rule: ours at most 0.7x that mixture's best anchor (the lowest finite SW2 of the anchors), or inside the noise
band. Checked on hand-made rows whose verdicts are known, including an anchor that failed (NaN) and the two ways
of holding; then one small mixture runs through every sampler of the benchmark (compare extra only): the
anchors' rows are there, and ours is the library's default (sample_optimized on the stored grid, exactly 5 calls;
also UniPC-3 on that grid, never counted as an anchor) scored against the same exact reference, the
same arithmetic as a direct call.
"""

import importlib
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # its siblings import each other
B = importlib.import_module("bench_family")


def _rows():
    nan = math.nan
    return [
        # "unipc-3" is ours too (UniPC-3 on the default's grid): never an anchor, though it is the lowest on #0 and #2
        {"dim": 2, "band": 0.05, 5: {"ours": 0.06, "unipc-3": 0.04, "lib/a": 0.10, "lib/b": 0.20}},  # <= 0.7 x 0.10
        {"dim": 4, "band": 0.095, 5: {"ours": 0.09, "unipc-3": 0.2, "lib/a": 0.10, "lib/b": 0.095}},  # in band only
        {"dim": 8, "band": 0.10, 5: {"ours": 0.20, "unipc-3": 0.05, "lib/a": 0.10, "lib/b": nan}},  # neither: a miss
    ]


def test_verdicts_apply_the_rule_per_mixture():
    v = B.verdicts(_rows(), 5)
    assert (v["holds"], v["ratio_ok"], v["band_ok"]) == (2, 1, 1)
    assert len(v["misses"]) == 1 and v["misses"][0].startswith("#2 (8-D)")
    assert v["means"]["lib/a"] == pytest.approx(0.10) and v["means"]["lib/b"] == pytest.approx((0.20 + 0.095) / 2)
    assert v["best_anchor_on_average"] == "lib/a"  # the NaN is left out of b's mean, not counted as 0
    assert v["worst_ratio"] == pytest.approx(2.0)  # 0.20 against a's 0.10: the failed b is not the best
    u = B.verdicts(_rows(), 5, "unipc-3")  # the same rule for UniPC-3: #0 and #2 hold both ways
    assert (u["holds"], u["ratio_ok"], u["band_ok"]) == (2, 2, 2) and u["misses"][0].startswith("#1 (4-D)")


def test_report_counts_every_family():
    text = B.report({99: {"budgets": [5], "mixtures": _rows()}}, 100, 1.0)
    assert "| seed 99 (3) | 5 | 2 / 3 (2) | 1 | 1 |" in text
    assert "#2 (8-D): 0.200 against 0.100" in text


def test_one_mixture_end_to_end():
    pytest.importorskip("diffusers")
    pytest.importorskip("torchsde")
    from torchdiffusion import GaussianMixture

    gm = GaussianMixture([0.6, 0.4], [[-0.8, 0.2], [0.7, -0.5]], [[0.04, 0.09], [0.09, 0.04]])
    row = B.score_mixture(gm, 0, 200, [5])
    assert row["dim"] == 2 and row["band"] > 0
    assert {"diffusers/DPMSolverMultistepScheduler", "k-diffusion/sample_dpmpp_2m"} <= set(row[5])
    # ours: the default (sample_optimized) on the stored grid, 5 calls, and UniPC-3 on that grid
    from torchdiffusion import VP, grid_optimized
    from torchdiffusion.samplers import count_nfe, sample_optimized, sample_unipc

    vp, scale = VP(), float(gm.covariance().diagonal().mean().sqrt())
    x = vp.prior_sample((200, 2), generator=torch.Generator().manual_seed(7))
    for key, sampler in (("ours", sample_optimized), ("unipc-3", partial(sample_unipc, order=3))):
        den = count_nfe(gm.denoiser(vp))
        y = sampler(den, vp, x, grid_optimized(vp, 5).float(), final_denoise=False)
        assert den.nfe == 5
        assert row[5][key] == pytest.approx(B.Reference(gm, 200, 5)(y.double())["sw2"] / scale, rel=1e-12)
