"""Distillation and consistency runs through the training loop (issue #13): checkpoints record what the model is,
runs resume bit for bit, the loaded student samples with its own sampler, and bad requests get clear errors.

Small CPU runs (an MLP of width 32 on a few hundred points); the closed-form proofs of the objectives are in
test_distillation.py and test_consistency.py.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import gen
from torchdiffusion.app.cli import main
from torchdiffusion.app.pipeline import load
from torchdiffusion.core.consistency import ConsistencyModel
from torchdiffusion.core.mixture import GaussianMixture
from torchdiffusion.core.processes import EDM, Flow
from torchdiffusion.samplers import sample_ddim
from torchdiffusion.training.checkpoint import CONFIG, find_checkpoint, load_checkpoint
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.distill import distill, teacher_pairs
from torchdiffusion.training.loop import train

NET = {"name": "mlp", "width": 32, "depth": 2, "emb_dim": 16}


def tiny(**kw) -> TrainConfig:
    base = dict(
        data="8gaussians", n_data=256, net=NET, steps=30, batch_size=32, warmup=5, lr=2e-3, checkpoint_every=10,
        log_every=5, ema_decay=0.9, process={"name": "edm"}, target="x0",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def weights(result) -> list[torch.Tensor]:
    return [p.detach().clone() for net in (result.net, result.ema_net) for p in net.state_dict().values()]


class Stop(Exception):
    pass


def stop_at(step):
    def callback(s, info):
        if s == step:
            raise Stop

    return callback


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(tiny(steps=40), out, progress=False)
    return out


def mixture_teacher():
    """The exact denoiser of a 2-D mixture on EDM: a teacher with no training."""
    mix = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [[0.05, 0.05], [0.05, 0.05]])
    return mix, mix.denoiser(EDM())


OBJECTIVES = {
    "ct-ict": dict(objective="consistency", distill={"recipe": "ict"}),
    "ct-cm": dict(objective="consistency", distill={"recipe": "cm"}),
    "cd-heun": dict(objective="consistency_distillation", distill={"recipe": "ict", "solver": "heun"}, teacher="x"),
    "progressive": dict(objective="progressive", distill={"steps": 2}, teacher="x"),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_an_interrupted_distillation_resumes_bit_exactly(tmp_path, name):
    """The extra uniforms that pick each example's pair of times come from the run's generator, and the EMA target
    of the cm recipe is checkpointed: a run stopped at step 17 and resumed equals an uninterrupted one."""
    _, teacher = mixture_teacher()
    cfg = tiny(**OBJECTIVES[name])
    t = teacher if cfg.teacher is not None else None
    full = train(cfg, tmp_path / "full", progress=False, teacher=t)
    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", progress=False, teacher=t, callback=stop_at(17))
    assert load_checkpoint(tmp_path / "cut").step == 10
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False, teacher=t)
    for a, b in zip(weights(resumed), weights(full), strict=True):
        assert torch.equal(a, b)


def test_the_checkpoint_says_what_the_model_is_and_load_samples_it_with_its_own_sampler(tmp_path):
    train(tiny(objective="consistency", distill={"recipe": "ict", "t_min": 0.01}), tmp_path / "ct", progress=False)
    config = json.loads((find_checkpoint(tmp_path / "ct") / CONFIG).read_text())
    assert config["objective"] == "consistency" and config["distill"] == {"recipe": "ict", "t_min": 0.01}
    pipe = load(tmp_path / "ct")
    model = pipe.denoiser.denoiser if hasattr(pipe.denoiser, "denoiser") else pipe.denoiser
    assert isinstance(model, ConsistencyModel) and model.t_min == 0.01
    for k in (1, 2, 4):
        nfes = []
        x = pipe.sample(50, steps=k, generator=gen(0), callback=lambda info, nfes=nfes: nfes.append(info["nfe"]))
        assert x.shape == (50, 2) and nfes[-1] == k  # one evaluation per step
    with pytest.raises(ValueError, match="its own sampler"):
        pipe.sample(10, sampler="ddim")


def test_progressive_rounds_halve_the_steps_each_taught_by_the_last(tmp_path, teacher_run):
    distill("progressive", teacher_run, tmp_path / "p", steps=12, start_steps=8, student_steps=1, progress=False)
    rounds = {n: tmp_path / "p" / "rounds" / f"{n:04d}-steps" for n in (4, 2)}
    teachers = {4: str(teacher_run), 2: str(rounds[4]), 1: str(rounds[2])}
    for n, run in {**rounds, 1: tmp_path / "p"}.items():
        cfg = load_checkpoint(run).config
        assert cfg["objective"] == "progressive" and cfg["distill"] == {"steps": n}
        assert cfg["teacher"] == teachers[n] and cfg["init"] == teachers[n]
    pipe = load(tmp_path / "p")
    ts = []
    pipe.sample(20, generator=gen(0), callback=lambda info: ts.append(info["t"]))
    assert len(ts) == 1  # one DDIM step, landing on the data
    with pytest.raises(ValueError, match="distilled to sample in 1 DDIM step"):
        pipe.sample(20, steps=2)
    # Resuming a finished distillation trains nothing more and keeps every round.
    before = load_checkpoint(tmp_path / "p").step
    distill("progressive", teacher_run, tmp_path / "p", steps=12, start_steps=8, progress=False, resume=True)
    assert load_checkpoint(tmp_path / "p").step == before


def test_a_progressive_student_at_its_own_steps_is_ddim_on_its_grid(tmp_path, teacher_run):
    distill("progressive", teacher_run, tmp_path / "p", steps=5, start_steps=4, student_steps=2, progress=False)
    pipe = load(tmp_path / "p")
    x_t = pipe.process.prior_sample((16, 2), generator=gen(3))
    sampler, ts, steps = pipe.own_sampler()
    assert sampler is sample_ddim and steps == 2 and len(ts) == 3 and float(ts[-1]) == 0.0
    direct = sample_ddim(pipe.denoiser, pipe.process, x_t, ts)
    again = pipe.sample(16, generator=gen(3))  # the same prior draw: the first thing the generator gives
    assert torch.allclose(again, direct, rtol=0, atol=1e-6)


def test_reflow_pairs_are_the_teachers_ode_from_the_recorded_noise(tmp_path):
    """Each stored sample is the teacher's ODE solution started from sigma(t_max) z with the stored z."""
    mix, teacher = mixture_teacher()
    x, z = teacher_pairs(teacher, EDM(), (2,), 64, steps=30, seed=4)
    again, _ = teacher_pairs(teacher, EDM(), (2,), 64, steps=30, seed=4)
    assert torch.equal(x, again) and z.shape == (64, 2)
    base = tiny(data="8gaussians")
    out = distill("reflow", None, tmp_path / "r", base=base, teacher_model=teacher, steps=10, pairs=64, progress=False)
    cfg = out.config
    assert cfg["objective"] == "reflow" and cfg["process"] == {"name": "flow"} and cfg["target"] == "flow"
    stored_x = np.load(cfg["data"])
    stored_z = np.load(cfg["distill"]["noise"])
    assert stored_x.shape == stored_z.shape == (64, 2)
    x, z = teacher_pairs(teacher, EDM(), (2,), 64, steps=50, seed=0)  # distill's defaults
    assert np.array_equal(stored_z, z.numpy().astype(np.float32))
    assert np.allclose(stored_x, x.numpy(), rtol=0, atol=1e-6)
    assert isinstance(load(tmp_path / "r").process, Flow)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(objective="distillation"), "objectives: denoising, consistency"),
        (dict(objective="progressive"), "needs distill.steps"),
        (dict(objective="progressive", distill={"steps": 3}), "power of 2"),
        (dict(objective="consistency", distill={"recipe": "lcm"}), "choose one of \\['cm', 'ict'\\]"),
        (dict(objective="consistency", distill={"solver": "heun"}), "do not apply to objective 'consistency'"),
        (dict(objective="consistency_distillation", distill={"solver": "rk4"}), "choose one of \\['ddim', 'heun'\\]"),
        (dict(objective="reflow"), "needs distill.noise"),
    ],
)
def test_bad_distillation_configs_name_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_a_distillation_without_or_with_a_mismatched_teacher_is_refused(tmp_path, teacher_run):
    with pytest.raises(ValueError, match="needs a teacher"):
        train(tiny(objective="progressive", distill={"steps": 2}), tmp_path / "a", progress=False)
    cfg = tiny(objective="progressive", distill={"steps": 2}, teacher=str(teacher_run), process={"name": "vp"})
    with pytest.raises(ValueError, match="must share the process"):
        train(cfg, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="unknown distillation method"):
        distill("lcm", teacher_run, tmp_path / "c")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_command_line_distill_then_sample_in_one_and_two_steps(tmp_path, teacher_run):
    out = tmp_path / "cd"
    r = cli("distill", "--method", "consistency", "--teacher", teacher_run, "--out", out, "--steps", 8, "--no-progress")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out).config["objective"] == "consistency_distillation"
    for k in (1, 2):
        r = cli(
            "sample", "--checkpoint", out, "--steps", k, "--n", 20, "--out", tmp_path / f"s{k}.npy", "--no-progress"
        )
        assert r.exit_code == 0, r.output
        assert np.load(tmp_path / f"s{k}.npy").shape == (20, 2)
    r = cli("sample", "--checkpoint", out, "--sampler", "ddim", "--n", 5, "--out", tmp_path / "x.npy", "--no-progress")
    assert r.exit_code != 0 and "own sampler" in r.output
    r = cli("distill", "--method", "consistency", "--teacher", teacher_run, "--out", out, "--steps", 8, "--no-progress")
    assert r.exit_code != 0 and "not empty" in r.output


def test_command_line_progressive_student_answers_the_steps_of_its_rounds(tmp_path, teacher_run):
    out = tmp_path / "p"
    r = cli("distill", "--method", "progressive", "--teacher", teacher_run, "--out", out, "--steps", 4,
            "--start-steps", 4, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    for k in (1, 2):  # 1: the student; 2: its first round
        r = cli("sample", "--checkpoint", out, "--steps", k, "--n", 8, "--out", tmp_path / f"p{k}.npy", "--no-progress")
        assert r.exit_code == 0, r.output
    r = cli("sample", "--checkpoint", out, "--steps", 8, "--n", 8, "--out", tmp_path / "p8.npy", "--no-progress")
    assert r.exit_code != 0 and "distilled to sample in 1 DDIM step" in r.output


def test_command_line_consistency_training_and_its_recipe(tmp_path):
    out = tmp_path / "ct"
    r = cli("train", "--data", "8gaussians", "--objective", "consistency", "--recipe", "cm", "--steps", 6,
            "--width", 16, "--depth", 1, "--out", out, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    cfg = load_checkpoint(out).config
    assert cfg["objective"] == "consistency" and cfg["distill"] == {"recipe": "cm"}
    r = cli("train", "--data", "8gaussians", "--recipe", "cm", "--steps", 6, "--out", tmp_path / "x", "--no-progress")
    assert r.exit_code != 0 and "--objective consistency" in r.output


def test_consistency_distillation_on_flow_with_the_default_heun_teacher(tmp_path):
    """Flow's top level is t = 1, where Heun's step in s is infinite: that pair takes the DDIM step."""
    mix = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [[0.05, 0.05], [0.05, 0.05]])
    cfg = tiny(process={"name": "flow"}, target="flow", objective="consistency_distillation",
               distill={"recipe": "ict", "solver": "heun"}, teacher="exact", steps=12)  # fmt: skip
    result = train(cfg, tmp_path / "cd", progress=False, teacher=mix.denoiser(Flow()))
    assert all(torch.isfinite(p).all() for p in result.net.parameters())


def test_progressive_from_a_python_teacher_and_the_students_target(tmp_path):
    mix, teacher = mixture_teacher()
    base = tiny(target="eps")
    out = distill("progressive", None, tmp_path / "p", base=base, teacher_model=teacher, steps=4, start_steps=4,
                  student_steps=1, progress=False)  # fmt: skip
    assert out.config["target"] == "v"  # Salimans & Ho 2022, Sec. 4: not eps
    assert load_checkpoint(tmp_path / "p" / "rounds" / "0002-steps").config["teacher"] == "python:function"
    with pytest.raises(ValueError, match="x0, v or flow"):
        tiny(objective="progressive", distill={"steps": 2}, target="eps")


def test_consistency_distillation_with_cm_keeps_song_et_al_eighteen_levels():
    from torchdiffusion.training.objective import CD_LEVELS, TrainingObjective

    _, teacher = mixture_teacher()
    cfg = tiny(objective="consistency_distillation", distill={"recipe": "cm"}, teacher="x", sigma_data=0.5)
    net = torch.nn.Linear(2, 2)
    obj = TrainingObjective(cfg, EDM(), teacher, net=net)
    assert obj.target_decay(0) == 0.95  # Song et al. 2023, Appendix C
    assert CD_LEVELS == 18 and len(obj._pairs(0)[0]) == 18 == len(obj._pairs(cfg.steps - 1)[0])
    ct = TrainingObjective(tiny(objective="consistency", distill={"recipe": "cm"}, sigma_data=0.5), EDM(), None, net)
    assert ct.target_decay(0) == pytest.approx(0.9)  # mu(0) = exp(s0 log mu0 / N(0)) with N(0) = s0 = 2: mu0
    assert len(ct._pairs(0)[0]) < len(ct._pairs(cfg.steps)[0])  # training's curriculum grows N


def test_a_consistency_model_is_not_a_denoiser(tmp_path, teacher_run):
    train(tiny(objective="consistency", distill={"t_min": 0.01}), tmp_path / "ct", progress=False)
    pipe = load(tmp_path / "ct")
    with pytest.raises(ValueError, match="needs a denoiser"):
        pipe.guided(2.0)
    with pytest.raises(ValueError, match="takes no options"):
        pipe.sample(4, eta=0.5)
    sampler, _, _ = pipe.own_sampler(2)
    assert sampler.keywords == {"t_min": 0.01}  # the boundary reaches the sampler past the data-box wrapper
    cfg = tiny(objective="progressive", distill={"steps": 2}, teacher=str(tmp_path / "ct"))
    with pytest.raises(ValueError, match="needs a denoiser"):
        train(cfg, tmp_path / "p", progress=False)
    r = cli("likelihood", "--checkpoint", tmp_path / "ct", "--data", "8gaussians", "--n", 10)
    assert r.exit_code != 0 and "no probability-flow ODE" in r.output


def test_distillations_refuse_what_they_cannot_do(tmp_path, teacher_run):
    with pytest.raises(ValueError, match="discrete-time model was never trained"):
        train(tiny(objective="consistency", process={"name": "ddpm", "T": 50}), tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="must lie in"):
        train(tiny(objective="consistency", distill={"t_min": 100.0}), tmp_path / "t", progress=False)
    base = tiny(class_conditional=True)
    _, teacher = mixture_teacher()
    with pytest.raises(ValueError, match="class-conditional"):
        distill("reflow", None, tmp_path / "r", base=base, teacher_model=teacher, progress=False)


def test_a_reflow_model_takes_k_euler_steps_by_default_and_any_sampler_when_asked(tmp_path):
    _, teacher = mixture_teacher()
    distill("reflow", None, tmp_path / "r", base=tiny(), teacher_model=teacher, steps=6, pairs=64, progress=False)
    pipe = load(tmp_path / "r")
    for k in (1, 2, 4):
        nfes = []
        pipe.sample(8, steps=k, generator=gen(0), callback=lambda info, nfes=nfes: nfes.append(info["nfe"]))
        assert nfes[-1] == k  # Euler's last step lands on t = 0: no extra denoising call
    assert pipe.sample(8, sampler="heun", steps=3, generator=gen(0)).shape == (8, 2)


def test_the_command_lines_choices_are_the_librarys_tables():
    from torchdiffusion.app.cli.distill import distill as distill_cmd
    from torchdiffusion.app.cli.train import train as train_cmd
    from torchdiffusion.objectives.consistency import RECIPES
    from torchdiffusion.objectives.teacher import SOLVERS
    from torchdiffusion.training.distill import METHODS

    opts = {p.name: p for p in distill_cmd.params}
    assert set(opts["method"].type.choices) == set(METHODS)
    assert set(opts["recipe"].type.choices) == set(RECIPES)
    assert set(opts["solver"].type.choices) == set(SOLVERS)
    train_opts = {p.name: p for p in train_cmd.params}
    assert set(train_opts["recipe"].type.choices) == set(RECIPES)
