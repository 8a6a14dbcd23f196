"""diffusers interop (interop/diffusers.py, app/export.py): folders in, folders out, without diffusers at run time.

What is checked, and against what:
- a tiny random ``UNet2DModel`` saved by diffusers loads with ``td.load`` and gives diffusers' own forward (every
  supported setting: additive and FiLM embeddings, both sinusoid orders and shifts, the learned table, one head or
  several), at integer and fractional steps;
- our DDIM on it equals diffusers' ``DDIMPipeline`` from the same noise (float64 on both sides, so the tolerance is
  float64 rounding, not float32's);
- a U-Net trained here and exported opens in ``DDPMPipeline.from_pretrained`` and gives the same eps; read back
  with ``td.load`` it is the same denoiser (the round trip is the identity);
- settings our U-Net cannot represent are refused by name.

Tolerances are worst-case rounding bounds (Higham 2002, Sec. 3.1: an inner product of n terms in precision u errs
by at most n u sum |a_i b_i|), taken through the network as (number of layers) x (largest fan-in) x u times the
output's scale: ``rounding_bound``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchdiffusion as td
from torchdiffusion.interop.diffusers import (
    DiffusersFormatError,
    load_diffusers,
    read_scheduler,
    read_unet_config,
    scheduler_grid,
    unet_state_from_diffusers,
    unet_state_to_diffusers,
    unet_to_diffusers,
    write_diffusers_folder,
)
from torchdiffusion.names import build_net

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8)  # fmt: skip
SETTINGS = {
    "default": {},
    "scale_shift": {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8},
    "ho_et_al_embedding": {"flip_sin_to_cos": False, "freq_shift": 1},
    "learned_embedding": {"time_embedding_type": "learned", "num_train_timesteps": 1000},
    "one_head": {"attention_head_dim": None},
}


def rounding_bound(net: nn.Module, u: float, scale: float) -> float:
    """Worst-case rounding of a forward pass: layers x largest fan-in x u x the output's scale (module docstring)."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm))]
    fan_in = max(m.weight[0].numel() if not isinstance(m, nn.GroupNorm) else m.num_channels for m in layers)
    return len(layers) * fan_in * u * scale


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight random, also those our U-Net starts at zero, so that every layer shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return net


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def save_diffusers_unet(diffusers, folder, seed=0, scheduler=None, **settings):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**{**TINY, **settings}).eval()
    unet.save_pretrained(folder / "unet")
    (scheduler or diffusers.DDPMScheduler(clip_sample=False)).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return unet


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_diffusers_unet_loads_and_gives_diffusers_forward(diffusers, tmp_path, name):
    unet = save_diffusers_unet(diffusers, tmp_path, **SETTINGS[name])
    pipe = td.load(tmp_path)
    model = pipe.denoiser.model  # DiffusersNet: eps of (x_t, t)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = [0.0, 10.0, 500.0, 999.0] if name == "learned_embedding" else [0.0, 10.5, 500.25, 999.0]
    k = torch.tensor(steps)
    kd = k.long() if name == "learned_embedding" else k  # diffusers' table takes integer steps
    with torch.no_grad():
        theirs, ours = unet(x, kd).sample, model(x, k.double() + 1)
        tol = rounding_bound(unet, torch.finfo(torch.float32).eps, theirs.abs().max().item())
        assert (ours - theirs).abs().max().item() <= tol
        if name != "learned_embedding":
            # the embedding: diffusers computes it in float32 whatever the model's dtype; ours agrees to the
            # rounding of its argument k omega (|omega| <= 1) and of sin / cos
            u32 = torch.finfo(torch.float32).eps
            emb_error = (unet.time_proj(k) - model.unet.time[0](k)).abs().max().item()
            assert emb_error <= 2 * u32 * (k.max().item() + 1)
            unet.time_proj = model.unet.time[0]  # the same float64 features on both sides from here on
        # in float64 the two computations agree to float64 rounding: the map itself is exact
        kd = kd if name == "learned_embedding" else k.double()
        theirs64, ours64 = unet.double()(x.double(), kd).sample, model.double()(x.double(), k.double() + 1)
        tol64 = rounding_bound(unet, torch.finfo(torch.float64).eps, theirs64.abs().max().item())
        assert (ours64 - theirs64).abs().max().item() <= tol64
    assert pipe.shape == (1, 8, 8) and pipe.target == "eps" and pipe.sigma_data == 1.0


@pytest.mark.parametrize(
    "spacing, offset, alpha_one", [("leading", 0, True), ("leading", 1, False), ("trailing", 0, True)]
)
def test_our_ddim_equals_diffusers_ddim_pipeline(diffusers, tmp_path, spacing, offset, alpha_one):
    scheduler = diffusers.DDIMScheduler(
        clip_sample=False, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one
    )
    unet = save_diffusers_unet(diffusers, tmp_path, scheduler=scheduler, **SETTINGS["scale_shift"]).double()
    steps, shape = 10, (3, 1, 8, 8)
    # diffusers' DDIM in float64: its alpha_bar table (float32 values, as trained) promoted, so both sides round
    # alike
    pipe_d = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(scheduler.config))
    pipe_d.scheduler.alphas_cumprod = pipe_d.scheduler.alphas_cumprod.double()
    pipe_d.scheduler.final_alpha_cumprod = pipe_d.scheduler.final_alpha_cumprod.double()
    captured = {}
    real_step = pipe_d.scheduler.step

    def step(model_output, timestep, sample, *a, **kw):
        captured.setdefault("x_T", sample.clone())
        out = real_step(model_output, timestep, sample, *a, **kw)
        captured["x_0"] = out.prev_sample
        return out

    pipe_d.scheduler.step = step
    ours = td.load(tmp_path)
    den = ours.denoiser.double()
    # diffusers' sinusoids are float32 whatever the model's dtype (their agreement with ours is checked above):
    # the same float64 features on both sides
    unet.time_proj = den.model.unet.time[0]
    pipe_d(batch_size=shape[0], generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="np")
    ts = scheduler_grid(dict(scheduler.config), steps)
    x0 = td.sample_ddim(den, ours.process, captured["x_T"], ts, final_denoise=False)
    ab = ours.process.alpha(ts[:-1]) ** 2
    # rounding of each step, carried to the end at most with the gain 1 / sqrt(alpha_bar) of x / alpha's ODE
    tol = steps * rounding_bound(unet, torch.finfo(torch.float64).eps, captured["x_0"].abs().max().item())
    tol /= float(ab.min().sqrt())
    assert (x0 - captured["x_0"]).abs().max().item() <= tol


def test_scheduler_grid_is_ddims_timesteps(diffusers):
    for spacing, offset, steps in [("leading", 1, 50), ("trailing", 0, 20), ("leading", 0, 7)]:
        s = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        s.set_timesteps(steps)
        ts = scheduler_grid(dict(s.config), steps)
        assert ts[:-1].tolist() == (s.timesteps.double() + 1).tolist() and ts[-1] == 0


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_the_process_is_the_schedulers_alpha_bar(diffusers, schedule):
    s = diffusers.DDPMScheduler(beta_schedule=schedule)
    process, target, clipping = read_scheduler(dict(s.config))
    k = torch.arange(1000)
    ab = process.alpha(k.double() + 1) ** 2  # our t = k + 1
    assert torch.allclose(ab, s.alphas_cumprod.double(), rtol=64 * 1000 * torch.finfo(torch.float64).eps, atol=0)
    assert target is td.EPS and clipping == {"box": 1.0}


def test_prediction_types_and_clipping_are_read():
    base = {"_class_name": "DDIMScheduler", "num_train_timesteps": 100}
    assert read_scheduler({**base, "prediction_type": "v_prediction"})[1] is td.V
    assert read_scheduler({**base, "prediction_type": "sample", "clip_sample": False})[1:] == (td.X0, {})
    assert read_scheduler({**base, "thresholding": True, "sample_max_value": 2.0})[2] == {"threshold": (0.995, 2.0)}
    with pytest.raises(DiffusersFormatError, match="prediction_type='flow'"):
        read_scheduler({**base, "prediction_type": "flow"})
    with pytest.raises(DiffusersFormatError, match="rescale_betas_zero_snr"):
        read_scheduler({**base, "rescale_betas_zero_snr": True})
    with pytest.raises(DiffusersFormatError, match="beta_schedule='exp'"):
        read_scheduler({**base, "beta_schedule": "exp"})


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")}, "CrossAttnDownBlock2D"),
        ({"act_fn": "gelu"}, "act_fn='gelu'"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
        ({"num_class_embeds": 10}, "num_class_embeds=10"),
        ({"resnet_time_scale_shift": "scale_shift"}, "attn_norm_num_groups"),
        ({"norm_eps": 1e-6}, "norm_eps"),
        ({"up_block_types": ("UpBlock2D", "AttnUpBlock2D")}, "different levels"),
    ],
)
def test_settings_our_unet_cannot_represent_are_named(setting, message):
    config = {**TINY, **setting}
    with pytest.raises(DiffusersFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_unet_config(config)


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    net = build_net({"name": "unet", **read_unet_config(TINY)})
    state = unet_state_to_diffusers(net)
    assert unet_state_from_diffusers(net, state).keys() == net.state_dict().keys()
    with pytest.raises(DiffusersFormatError, match="lack 'conv_in.weight'"):
        unet_state_from_diffusers(net, {k: v for k, v in state.items() if k != "conv_in.weight"})
    with pytest.raises(DiffusersFormatError, match="hold 1 tensors"):
        unet_state_from_diffusers(net, {**state, "extra.weight": torch.zeros(1)})
    bad = {**state, "conv_in.weight": torch.zeros(3, 3)}
    with pytest.raises(DiffusersFormatError, match="conv_in.weight|inp.weight"):
        unet_state_from_diffusers(net, bad)


def test_a_missing_scheduler_or_weights_file_is_named(tmp_path):
    net = randomize(build_net({"name": "unet", **read_unet_config(TINY)}))
    cfg = {"_class_name": "UNet2DModel", **TINY}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DiffusersFormatError, match="no weights file"):
        td.load(tmp_path)
    from safetensors.torch import save_file

    save_file(unet_state_to_diffusers(net), tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DiffusersFormatError, match="no scheduler config"):
        td.load(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000})
    )
    pipe = td.load(tmp_path)  # a bare UNet2DModel folder with its scheduler config beside it
    assert pipe.process.n_steps == 1000 and pipe.data_box == ([-1.0], [1.0])  # DDPMScheduler clips by default


def tiny_run(tmp_path, **kw):
    from torchdiffusion.training.config import TrainConfig
    from torchdiffusion.training.loop import train

    net = {"name": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
           "dropout": 0.0, "groups": 8, "head_channels": 16}  # fmt: skip
    base = dict(data="digits", net=net, steps=2, batch_size=8, warmup=1, log_every=1, checkpoint_every=2,
                process={"name": "ddpm", "T": 1000}, sigma_data=1.0, target="eps")  # fmt: skip
    train(TrainConfig(**{**base, **kw}), tmp_path / "run", progress=False)
    # random weights everywhere (two steps leave the zero-initialised layers near zero)
    from safetensors.torch import load_file, save_file

    for name in ("ema.safetensors", "model.safetensors"):
        path = tmp_path / "run" / "checkpoint" / name
        state = load_file(path)
        g = torch.Generator().manual_seed(3)
        save_file({k: torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5 for k, v in state.items()}, path)
    return tmp_path / "run"


def test_export_round_trip_is_the_identity(tmp_path):
    run = tiny_run(tmp_path)
    out = td.export_diffusers(run, tmp_path / "exported")
    a, b = td.load(run), td.load(out)
    assert repr(a.process) == repr(b.process) or torch.allclose(
        a.process.alpha(torch.arange(1001.0)), b.process.alpha(torch.arange(1001.0)), rtol=1e-6
    )
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1.0, 400.0, 1000.0])  # integer steps, where the exported table is exact
    with torch.no_grad():
        xa, xb = a.denoiser(x, t), b.denoiser(x, t)
    eps = torch.finfo(torch.float32).eps
    # x0_hat = (x - sigma eps_hat) / alpha amplifies the network's rounding by sigma / alpha
    gain = float((a.process.sigma(t) / a.process.alpha(t)).max())
    assert (xa - xb).abs().max().item() <= gain * rounding_bound(b.denoiser.denoiser.model.unet, eps, 1.0) * 4
    again = td.export_diffusers(out, tmp_path / "again")  # diffusers -> diffusers: the same files' content
    from safetensors.torch import load_file

    w1, w2 = (load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in (out, again))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_exported_model_opens_in_diffusers_with_the_same_eps(diffusers, tmp_path):
    run = tiny_run(tmp_path)
    out = td.export_diffusers(run, tmp_path / "exported")
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    from torchdiffusion.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run)
    ours = td.Preconditioned(ckpt.ema_net, ckpt.process, 1.0)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    k = torch.tensor([0, 399, 999])
    with torch.no_grad():
        theirs, mine = pipe.unet(x, k).sample, ours(x, k.double() + 1)
    tol = rounding_bound(pipe.unet, torch.finfo(torch.float32).eps, theirs.abs().max().item())
    assert (theirs - mine).abs().max().item() <= tol
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (2, 8, 8, 1)


def test_what_cannot_export_is_named(tmp_path):
    net = randomize(build_net({"name": "unet", **read_unet_config(TINY)}))
    with pytest.raises(ValueError, match="Discrete"):
        unet_to_diffusers(net, td.VP(), td.EPS, 1.0)
    ddpm = td.Discrete.from_schedule(td.beta_linear, 1000)
    with pytest.raises(ValueError, match="sigma_data=1"):
        unet_to_diffusers(net, ddpm, td.EPS, 0.5)
    with pytest.raises(ValueError, match="'x0'"):
        unet_to_diffusers(net, ddpm, td.X0, 1.0)
    sr = randomize(build_net({"name": "unet", **read_unet_config(TINY), "cond_channels": 1}))
    with pytest.raises(ValueError, match="super-resolution"):
        unet_to_diffusers(sr, ddpm, td.EPS, 1.0)
    parts = unet_to_diffusers(net, ddpm, td.V, 1.0)  # v with sigma_data = 1: c_out = 1, exportable
    assert parts[2]["prediction_type"] == "v_prediction"
    write_diffusers_folder(tmp_path / "v", *parts)
    with pytest.raises(FileExistsError):
        write_diffusers_folder(tmp_path / "v", *parts)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_loaded_diffusers_model_runs_any_sampler_and_the_likelihood(tmp_path):
    net = randomize(build_net({"name": "unet", **read_unet_config(TINY)}))
    ddpm = td.Discrete.from_schedule(td.beta_linear, 1000)
    write_diffusers_folder(tmp_path / "m", *unet_to_diffusers(net, ddpm, td.EPS, 1.0))
    denoiser, process, config = load_diffusers(tmp_path / "m")
    pipe = td.load(tmp_path / "m")
    x = pipe.sample(2, sampler="heun", steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    nll = -td.log_likelihood(denoiser.double(), process, x.double(), exact_trace=False, rtol=1e-3, atol=1e-3,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert nll.shape == (2,) and torch.isfinite(nll).all()
    assert config["net"]["time_embedding"] == "table" and config["diffusers"]["scheduler"]["clip_sample"] is False
