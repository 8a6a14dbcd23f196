"""End to end: a short training run learns the data distribution.

The noise floor is the sliced Wasserstein distance between independent exact sample sets of
the same size; a perfect model scores it on average. Both sides are means over several
reference sets, because one distance between finite samples varies by about 2x between seeds.
"""

import torch

from torchdiffusion import grid_t, sample_ddpm
from torchdiffusion.data import make_2d
from torchdiffusion.evaluation.metrics import noise_floor, sw_against
from torchdiffusion.training.checkpoint import load_denoiser
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train


def test_two_moons_training_reaches_twice_the_noise_floor(tmp_path):
    """DDPM (Ho et al. 2020, Algorithms 1 and 2) on two moons, VP process, eps target."""
    cfg = TrainConfig(
        data="moons", steps=1500, batch_size=256, net={"name": "mlp", "width": 128, "depth": 3}, checkpoint_every=10**6
    )
    train(cfg, tmp_path / "run", progress=False)
    denoiser, process, _ = load_denoiser(tmp_path / "run")
    gen = torch.Generator().manual_seed(123)  # not the training seed: held-out data
    refs = [make_2d("moons", 2000, generator=gen) for _ in range(5)]
    with torch.no_grad():
        x = sample_ddpm(
            denoiser, process, process.prior_sample((2000, 2), generator=gen), grid_t(process, 100), generator=gen
        )
    floor = noise_floor(refs)
    assert sw_against(x, refs) < 2 * floor
