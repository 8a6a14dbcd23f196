"""A noise-conditional classifier the library trains, used for classifier guidance (Dhariwal & Nichol 2021).

On the 8-Gaussians mixture the components are the classes and everything is known: the exact denoiser is the
unconditional model, the exact responsibilities are the ideal classifier. A classifier trained on noised samples
must (i) agree with the ideal one where the classes are resolvable, and (ii) steer the exact unconditional
denoiser's samples into the chosen component. Both checks are statistical, with standard errors.
"""

import math

import pytest
import torch

from conftest import Z, gen
from torchdiffusion import VP, GaussianMixture, grid_lam, sample_dpm_solver_pp
from torchdiffusion.data import eight_gaussians_mixture_params
from torchdiffusion.guidance import NoiseConditionalClassifier, classifier_guidance, mixture_classifier
from torchdiffusion.nets import MLP
from torchdiffusion.training.classifier import load_classifier, save_classifier, train_classifier

GM = GaussianMixture(*eight_gaussians_mixture_params())
K = 8


@pytest.fixture(scope="module")
def trained():
    """A small MLP classifier, 400 steps on 8-Gaussians samples with their component labels (a few seconds)."""
    torch.manual_seed(0)
    x, c = GM.sample(20_000, generator=gen(0), return_labels=True)
    net = MLP(dim=2, width=64, depth=2, emb_dim=32, out_dim=K)
    return train_classifier(net, VP(), x.float(), c, steps=400, batch_size=256, generator=gen(1))


def test_the_trained_classifier_agrees_with_the_exact_one_at_low_noise(trained):
    """At t = 0.05 (sigma 0.2 / s-units smaller than the modes' spacing) the exact posterior p_t(c | x) is nearly
    one-hot. The learned argmax must match the exact argmax on all but a small share of points: the mismatch rate
    is below 5% plus Z binomial standard errors. The untrained (zero-init) classifier, uniform logits, would match
    1/8 of them by chance, so the check has power."""
    p = VP()
    x0 = GM.sample(2000, generator=gen(2))
    t = torch.full((2000,), 0.05, dtype=torch.float64)
    xt = p.perturb(x0, t, torch.randn(x0.shape, generator=gen(3), dtype=torch.float64))
    exact = GM.responsibilities(xt, p, t).argmax(1)
    learned = trained(xt.float(), t.float()).argmax(1)
    miss = float((exact != learned).double().mean())
    assert miss < 0.05 + Z * math.sqrt(0.05 * 0.95 / 2000), miss


def test_guidance_with_the_trained_classifier_moves_samples_into_the_chosen_component(trained):
    """Without guidance the exact denoiser puts 1/8 of the samples in each component; with the trained classifier
    at scale 2 the share of samples nearest to component c rises far above 1/8: more than Z binomial standard
    errors above it. (With the exact classifier at scale 1 it is the whole sample, test_guidance.py.)"""
    p, c, n = VP(), 5, 1000
    den = classifier_guidance(GM.denoiser(p), p, trained.log_prob, scale=2.0)
    x = p.prior_sample((n, 2), generator=gen(4), dtype=torch.float32)
    out = sample_dpm_solver_pp(den, p, x, grid_lam(p, 40), class_labels=torch.full((n,), c))
    nearest = torch.cdist(out.double(), GM.means).argmin(1)
    share = float((nearest == c).double().mean())
    assert share > 1 / K + Z * math.sqrt((1 / K) * (1 - 1 / K) / n), share
    exact = classifier_guidance(GM.denoiser(p), p, mixture_classifier(GM, p), scale=1.0)
    out = sample_dpm_solver_pp(exact, p, x.double(), grid_lam(p, 40), class_labels=torch.full((n,), c))
    assert float((torch.cdist(out, GM.means).argmin(1) == c).double().mean()) > share - Z * math.sqrt(0.25 / n)


def test_save_and_load_round_trip(trained, tmp_path):
    config = {"process": {"name": "vp"}, "net": {"name": "mlp", "dim": 2, "width": 64, "depth": 2, "emb_dim": 32,
              "out_dim": K}, "num_classes": K, "steps": 400}  # fmt: skip
    save_classifier(tmp_path, trained, config)
    back = load_classifier(tmp_path)
    x, t = torch.randn(16, 2, generator=gen(5)), torch.rand(16, generator=gen(6))
    assert torch.equal(back(x, t), trained(x, t)) and back.sigma_data == trained.sigma_data
    assert not any(q.requires_grad for q in back.parameters())
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "nothing")


def test_classifier_inputs_are_those_of_the_denoiser():
    """The classifier's network sees c_in x and c_noise = -lam / 4, the same inputs as Preconditioned's."""
    seen = {}

    def net(x_in, c_noise):
        seen["x"], seen["c"] = x_in, c_noise
        return torch.zeros(len(x_in), K, dtype=x_in.dtype)

    p, sd = VP(), 0.7
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    NoiseConditionalClassifier(net, p, sd)(x, t)
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    torch.testing.assert_close(seen["x"], x / torch.sqrt(a**2 * sd**2 + s**2))
    torch.testing.assert_close(seen["c"], -p.lam(t) / 4)


def test_bad_input_is_refused():
    net = MLP(dim=2, width=8, depth=1, emb_dim=8, out_dim=K)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(net, VP(), torch.zeros(10, 2), torch.zeros(9, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_classifier(net, VP(), torch.zeros(10, 2), torch.zeros(10, dtype=torch.long), steps=0)


def test_command_line_trains_a_classifier_and_guides_with_it(tmp_path):
    """`train-classifier` writes a run that `sample --classifier` loads; errors name the fix."""
    import numpy as np
    from click.testing import CliRunner

    from torchdiffusion.app.cli import main
    from torchdiffusion.training import TrainConfig, train

    runner = CliRunner()
    clf = tmp_path / "clf"
    r = runner.invoke(main, ["train-classifier", "--steps", "20", "--width", "16", "--depth", "1", "--n", "500",
                             "--out", str(clf), "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "8-class classifier" in r.output and (clf / "classifier.json").is_file()
    net = {"name": "mlp", "width": 16, "depth": 1, "emb_dim": 8}
    train(TrainConfig(data="8gaussians", n_data=256, net=net, steps=2, batch_size=32, warmup=1), tmp_path / "m",
          progress=False)  # fmt: skip
    out = tmp_path / "s.npy"
    args = ["sample", "--checkpoint", str(tmp_path / "m"), "--classifier", str(clf), "--class", "3", "--n", "8",
            "--steps", "4", "--out", str(out), "--no-progress"]  # fmt: skip
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert np.load(out).shape == (8, 2) and np.isfinite(np.load(out)).all()
    r = runner.invoke(main, [*args, "--guidance", "2"])
    assert r.exit_code != 0 and "choose one" in r.output
    r = runner.invoke(main, ["train-classifier", "--data", "swiss_roll", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "no class labels" in r.output
