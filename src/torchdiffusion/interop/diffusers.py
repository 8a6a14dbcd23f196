"""diffusers folders without diffusers: a ``UNet2DModel`` and its scheduler as a torchdiffusion denoiser and process.

A diffusers ``UNet2DModel`` built from ``DownBlock2D`` / ``AttnDownBlock2D`` / ``UpBlock2D`` / ``AttnUpBlock2D`` and
``UNetMidBlock2D`` is the U-Net of Ho et al. 2020 (App. B) and ADM (Dhariwal & Nichol 2021), which is our
``nets.UNet``: the same layers in the same order, so the weights map one to one by name (``unet_state_from_diffusers``
and back), and loading a folder needs neither diffusers nor its code. Where the two differ only in form, the map
converts: diffusers' separate ``to_q``, ``to_k``, ``to_v`` are the rows of our fused ``qkv``; its ``Timesteps``
embedding is our ``SinusoidalEmbedding`` with its frequency shift and sin/cos order; its "learned" embedding is
our ``TableEmbedding``. What our U-Net cannot represent (another block type, an activation, a class embedding,
a norm epsilon) is refused with the setting's name.

The process. A discrete diffusers scheduler (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...) is its betas: DDPM's
``Discrete(betas)``. diffusers' timestep k (0..T-1) is the step whose alpha_bar_k = prod_{i <= k} (1 - beta_i),
our integer time t = k + 1 (t = 0 is the data), so the network is called as ``unet(x_t, t - 1)`` on x_t itself
(``DiffusersNet``: no input scaling, ``center_input_sample`` honoured). ``prediction_type`` is the target;
``clip_sample`` is our box clamp of x0_hat, ``thresholding`` the dynamic thresholding of Saharia et al. 2022
(``core.support``). Every sampler, likelihood and guidance method of the library then runs on the model.

Export goes the other way (``unet_to_diffusers``): our U-Net, trained on ``Discrete`` with sigma_data = 1 (so
that c_in = 1 / sqrt(alpha^2 + sigma^2) = 1 for every t, and the network sees x_t as a diffusers U-Net does) and
an output diffusers can name (eps, or v with c_out = 1), becomes a ``UNet2DModel`` whose "learned" time
embedding tabulates our embedding of c_noise(t) = -lam(t)/4 at t = k + 1. diffusers' samplers call it only at
integer k, where the table is exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.denoiser import as_denoiser, network_inputs
from ..core.predictions import EPS, X0, Prediction, V
from ..core.processes import Discrete, beta_cosine
from ..core.support import ThresholdedDenoiser, clip_denoiser
from ..nets.embeddings import SinusoidalEmbedding, TableEmbedding
from ..nets.unet import UNet

__all__ = [
    "DiffusersFormatError",
    "DiffusersNet",
    "is_diffusers_folder",
    "read_unet_config",
    "read_scheduler",
    "unet_state_from_diffusers",
    "unet_state_to_diffusers",
    "load_diffusers",
    "unet_to_diffusers",
    "write_diffusers_folder",
    "scheduler_grid",
    "scheduler_config",
    "load_unet",
]

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PREDICTION_TYPES = {"epsilon": EPS, "v_prediction": V, "sample": X0}
_SUPPORTED_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True, "UpBlock2D": False, "AttnUpBlock2D": True}
_CLIP_DEFAULT = {"DDPMScheduler": True, "DDIMScheduler": True}  # the classes whose clip_sample defaults to True
FORMAT_VERSION = "0.42.1"  # the diffusers version whose layout the export follows (and is tested against)


class DiffusersFormatError(ValueError):
    """A diffusers folder is missing a file, or holds a setting torchdiffusion cannot represent (named)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffusersFormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffusersFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DiffusersFormatError(f"{path}: expected a JSON object")
    return data


def _unet_dir(path: Path) -> Path | None:
    for d in (path / "unet", path):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                if json.loads(cfg.read_text()).get("_class_name") == "UNet2DModel":
                    return d
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return None
    return None


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """True for a diffusers pipeline folder (``model_index.json``) or a bare ``UNet2DModel`` folder."""
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or _unet_dir(path) is not None)


# -- the U-Net ------------------------------------------------------------------------------------------------


def _need(config: dict, key: str, allowed, default, why: str) -> None:
    value = config.get(key, default)
    if value not in allowed:
        raise DiffusersFormatError(f"UNet2DModel {key}={value!r} cannot be represented ({why}); supported: {allowed}")


def read_unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """Our ``UNet`` keyword arguments for a diffusers ``UNet2DModel`` config, or a ``DiffusersFormatError`` naming the
    first setting our U-Net cannot represent."""
    down = list(
        config.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"))
    )
    up = list(config.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    boc = [int(c) for c in config.get("block_out_channels", (224, 448, 672, 896))]
    for name in down + up:
        if name not in _SUPPORTED_BLOCKS:
            raise DiffusersFormatError(
                f"UNet2DModel block type {name!r} cannot be represented; supported: {sorted(_SUPPORTED_BLOCKS)}"
            )
    if not (len(down) == len(up) == len(boc)):
        raise DiffusersFormatError(f"UNet2DModel needs as many down and up blocks as block_out_channels, got {config}")
    attn_down = [_SUPPORTED_BLOCKS[n] for n in down]
    if attn_down != [_SUPPORTED_BLOCKS[n] for n in reversed(up)]:
        raise DiffusersFormatError(
            f"UNet2DModel with attention at different levels on the way down {down} and up {up} cannot be represented"
        )
    if any(c % boc[0] for c in boc):
        raise DiffusersFormatError(f"UNet2DModel block_out_channels {boc} must be multiples of the first one")
    _need(
        config,
        "mid_block_type",
        ("UNetMidBlock2D",),
        "UNetMidBlock2D",
        "our U-Net's middle is ResBlock-attention-ResBlock",
    )
    _need(config, "add_attention", (True,), True, "our U-Net's middle always has attention")
    _need(config, "act_fn", ("silu", "swish"), "silu", "our U-Net uses SiLU")
    _need(config, "norm_eps", (1e-5,), 1e-5, "our GroupNorms use eps = 1e-5")
    _need(config, "mid_block_scale_factor", (1, 1.0), 1, "no output rescaling in our blocks")
    _need(config, "downsample_padding", (1,), 1, "our downsampling conv pads by 1")
    _need(config, "downsample_type", ("conv",), "conv", "our U-Net resamples with convolutions here")
    _need(config, "upsample_type", ("conv",), "conv", "our U-Net resamples with convolutions here")
    _need(config, "resnet_time_scale_shift", ("default", "scale_shift"), "default", "additive or FiLM embeddings")
    _need(config, "class_embed_type", (None,), None, "class-conditional diffusers U-Nets are not read yet")
    _need(config, "num_class_embeds", (None,), None, "class-conditional diffusers U-Nets are not read yet")
    _need(config, "time_embedding_type", ("positional", "learned"), "positional", "fourier is score-SDE VE's (NCSN++)")
    groups = int(config.get("norm_num_groups", 32))
    scale_shift = config.get("resnet_time_scale_shift", "default") == "scale_shift"
    attn_groups = config.get("attn_norm_num_groups")
    if scale_shift and attn_groups is None:
        raise DiffusersFormatError(
            "UNet2DModel with resnet_time_scale_shift='scale_shift' and attn_norm_num_groups=None has a middle "
            "attention without GroupNorm, which cannot be represented; set attn_norm_num_groups"
        )
    if attn_groups is not None and int(attn_groups) != groups:
        raise DiffusersFormatError(
            f"UNet2DModel attn_norm_num_groups={attn_groups} must equal norm_num_groups={groups}"
        )
    for c in boc:
        if c % groups:
            raise DiffusersFormatError(f"UNet2DModel norm_num_groups={groups} does not divide block width {c}")
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise DiffusersFormatError(f"UNet2DModel sample_size {size}: only square images are read")
        size = size[0]
    if size is None:
        raise DiffusersFormatError("UNet2DModel config lacks sample_size")
    size = int(size)
    sizes = [size // 2**i for i in range(len(boc))]
    head_dim = config.get("attention_head_dim", 8)
    if config.get("time_embedding_type", "positional") == "learned":
        embedding, options = TableEmbedding.name, {"num": int(config["num_train_timesteps"])}
    else:
        options = {
            "scale": 1.0,
            "shift": float(config.get("freq_shift", 0)),
            "sin_first": not config.get("flip_sin_to_cos", True),
        }
        embedding = SinusoidalEmbedding.name
    in_channels = int(config.get("in_channels", 3))
    return dict(
        in_channels=in_channels,
        out_channels=int(config.get("out_channels", 3)),
        image_size=size,
        channels=boc[0],
        channel_mult=[c // boc[0] for c in boc],
        num_res_blocks=int(config.get("layers_per_block", 2)),
        attention_resolutions=[s for s, a in zip(sizes, attn_down) if a],
        num_heads=1,
        head_channels=int(head_dim) if head_dim is not None else None,
        dropout=float(config.get("dropout", 0.0)),
        time_embedding=embedding,
        time_embedding_options=options,
        emb_dim=int(config.get("time_embedding_dim") or 4 * boc[0]),
        scale_shift=scale_shift,
        groups=groups,
    )


def _module_pairs(net: UNet) -> list[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every layer with weights, kind in res / attn / plain."""
    pairs = [("time.1", "time_embedding.linear_1", "plain"), ("time.3", "time_embedding.linear_2", "plain")]
    if isinstance(net.time[0], TableEmbedding):
        pairs.append(("time.0", "time_proj", "plain"))
    pairs.append(("inp", "conv_in", "plain"))
    n_res = net.config["num_res_blocks"]
    for level, blocks in enumerate(net.down):
        for j, block in enumerate(blocks):
            if j < n_res:
                pairs.append((f"down.{level}.{j}.0", f"down_blocks.{level}.resnets.{j}", "res"))
                if len(block) > 1:
                    pairs.append((f"down.{level}.{j}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            else:
                pairs.append((f"down.{level}.{j}.0", f"down_blocks.{level}.downsamplers.0", "plain"))
    pairs += [("mid.0", "mid_block.resnets.0", "res"), ("mid.1", "mid_block.attentions.0", "attn")]
    pairs.append(("mid.2", "mid_block.resnets.1", "res"))
    for u, blocks in enumerate(net.up):
        for i, block in enumerate(blocks):
            pairs.append((f"up.{u}.{i}.0", f"up_blocks.{u}.resnets.{i}", "res"))
            k = 1
            if k < len(block) and not hasattr(block[k], "up"):
                pairs.append((f"up.{u}.{i}.{k}", f"up_blocks.{u}.attentions.{i}", "attn"))
                k += 1
            if k < len(block):
                pairs.append((f"up.{u}.{i}.{k}", f"up_blocks.{u}.upsamplers.0", "plain"))
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


_RES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "emb": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.15 names


def unet_state_from_diffusers(net: UNet, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``net.state_dict()`` from a ``UNet2DModel``'s state dict (the same layers; q, k, v fused into qkv).
    Raises ``DiffusersFormatError`` naming a missing or unexpected weight."""
    for old, new in _OLD_ATTENTION.items():  # older checkpoints name the attention projections so
        state = {k.replace(f".{old}.", f".{new}."): v for k, v in state.items()}
    out, used = {}, set()

    def take(key: str) -> Tensor:
        if key not in state:
            raise DiffusersFormatError(f"the UNet2DModel weights lack {key!r}, which its config implies")
        used.add(key)
        return state[key]

    ours = net.state_dict()
    for mine, theirs, kind in _module_pairs(net):
        for p in ("weight", "bias"):
            if kind == "res":
                for a, b in _RES.items():
                    if f"{mine}.{a}.{p}" in ours:
                        out[f"{mine}.{a}.{p}"] = take(f"{theirs}.{b}.{p}")
            elif kind == "attn":
                out[f"{mine}.norm.{p}"] = take(f"{theirs}.group_norm.{p}")
                out[f"{mine}.qkv.{p}"] = torch.cat([take(f"{theirs}.to_{q}.{p}") for q in "qkv"])
                out[f"{mine}.proj.{p}"] = take(f"{theirs}.to_out.0.{p}")
            elif f"{mine}.{p}" in ours or f"{mine}.conv.{p}" in ours:
                key = f"{mine}.conv.{p}" if f"{mine}.conv.{p}" in ours else f"{mine}.{p}"
                out[key] = take(f"{theirs}.conv.{p}" if key.endswith(f"conv.{p}") else f"{theirs}.{p}")
    extra = sorted(set(state) - used)
    if extra:
        raise DiffusersFormatError(
            f"the UNet2DModel weights hold {len(extra)} tensors the config does not, e.g. {extra[0]!r}"
        )
    missing = sorted(set(ours) - set(out))
    if missing:
        raise DiffusersFormatError(f"no diffusers weight maps onto {missing[0]!r}")
    for k, v in out.items():
        if v.shape != ours[k].shape:
            raise DiffusersFormatError(
                f"weight {k!r}: the file has shape {tuple(v.shape)}, the config implies {tuple(ours[k].shape)}"
            )
    return out


def unet_state_to_diffusers(net: UNet, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A ``UNet2DModel`` state dict from our U-Net's (``state``, default ``net.state_dict()``): the inverse map."""
    state = net.state_dict() if state is None else state
    out = {}
    for mine, theirs, kind in _module_pairs(net):
        for p in ("weight", "bias"):
            if kind == "res":
                for a, b in _RES.items():
                    if f"{mine}.{a}.{p}" in state:
                        out[f"{theirs}.{b}.{p}"] = state[f"{mine}.{a}.{p}"]
            elif kind == "attn":
                out[f"{theirs}.group_norm.{p}"] = state[f"{mine}.norm.{p}"]
                for q, w in zip("qkv", state[f"{mine}.qkv.{p}"].chunk(3)):
                    out[f"{theirs}.to_{q}.{p}"] = w
                out[f"{theirs}.to_out.0.{p}"] = state[f"{mine}.proj.{p}"]
            elif f"{mine}.conv.{p}" in state:
                out[f"{theirs}.conv.{p}"] = state[f"{mine}.conv.{p}"]
            elif f"{mine}.{p}" in state:
                out[f"{theirs}.{p}"] = state[f"{mine}.{p}"]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _read_weights(unet_dir: Path) -> dict[str, Tensor]:
    for name in WEIGHTS:
        path = unet_dir / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        except Exception as e:  # a corrupt or hostile file: say which and why
            raise DiffusersFormatError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from None
    if (unet_dir / f"{WEIGHTS[0]}.index.json").is_file():
        raise DiffusersFormatError(f"{unet_dir}: sharded weights are not read; save the UNet in one file")
    raise DiffusersFormatError(f"{unet_dir}: no weights file (expected one of {', '.join(WEIGHTS)})")


class DiffusersNet(nn.Module):
    """Our U-Net called as diffusers calls a ``UNet2DModel``: on x_t itself and the step k = t - 1.

    ``center_input`` is diffusers' ``center_input_sample`` (the net sees 2 x - 1); ``channels`` keeps the first
    output channels, the prediction, of a U-Net that also outputs learned variances (Nichol & Dhariwal 2021).
    """

    def __init__(self, unet: UNet, *, center_input: bool = False, channels: int | None = None):
        super().__init__()
        self.unet, self.center_input, self.channels = unet, center_input, channels

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        out = self.unet(2 * x - 1 if self.center_input else x, t.reshape(-1).expand(len(x)) - 1, **cond)
        return out if self.channels is None else out[:, : self.channels]


# -- the scheduler ---------------------------------------------------------------------------------------------


def _betas(config: dict[str, Any]) -> Tensor:
    """The scheduler's betas, computed in float32 as diffusers computes them (its models were trained on these)."""
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.as_tensor(config["trained_betas"], dtype=torch.float32)
    lo, hi = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        return torch.linspace(lo, hi, T, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(lo**0.5, hi**0.5, T, dtype=torch.float32) ** 2
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T)) * (hi - lo) + lo
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, Eq. 17, capped at 0.999: our beta_cosine
        return beta_cosine(T).float()
    raise DiffusersFormatError(
        f"scheduler beta_schedule={schedule!r} cannot be read; supported: linear, scaled_linear, sigmoid, "
        "squaredcos_cap_v2, or trained_betas"
    )


def read_scheduler(config: dict[str, Any]) -> tuple[Discrete, Prediction, dict[str, Any]]:
    """``(process, target, clipping)`` of a discrete diffusers scheduler config.

    ``clipping`` is ``{"box": r}`` for ``clip_sample`` (x0_hat clamped to [-r, r]), ``{"threshold": (ratio,
    max_value)}`` for ``thresholding`` (which diffusers applies instead of ``clip_sample`` when both are set), or
    ``{}``.
    """
    name = config.get("_class_name", "a scheduler")
    if "num_train_timesteps" not in config and "trained_betas" not in config:
        raise DiffusersFormatError(f"{name} config has no num_train_timesteps: not a discrete (DDPM-family) scheduler")
    if config.get("rescale_betas_zero_snr"):
        raise DiffusersFormatError(
            f"{name} rescale_betas_zero_snr=True sets beta_T = 1 (alpha_bar_T = 0), which Discrete cannot represent"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise DiffusersFormatError(f"{name} prediction_type={prediction!r}; supported: {sorted(PREDICTION_TYPES)}")
    betas = _betas(config)
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise DiffusersFormatError(f"{name}: every beta must lie in (0, 1)")
    # diffusers' alpha_bar is the float32 cumprod of its float32 (1 - beta), and its models were trained on
    # exactly those values: our betas are the float64 ratios alpha_bar_k / alpha_bar_{k-1} of that table, so that
    # Discrete's alpha_bar equals it to float64 rounding.
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).double()
    betas = 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    clipping: dict[str, Any] = {}
    if config.get("thresholding", False):
        clipping["threshold"] = (
            float(config.get("dynamic_thresholding_ratio", 0.995)),
            float(config.get("sample_max_value", 1.0)),
        )
    elif config.get("clip_sample", _CLIP_DEFAULT.get(name, False)):
        clipping["box"] = float(config.get("clip_sample_range", 1.0))
    return Discrete(betas), PREDICTION_TYPES[prediction], clipping


def scheduler_grid(config: dict[str, Any], steps: int) -> Tensor:
    """Our time grid for the timesteps diffusers' ``DDIMScheduler.set_timesteps(steps)`` visits (its
    ``timestep_spacing`` and ``steps_offset``), ending where its last step lands: t = 0 (alpha_bar = 1) with
    ``set_alpha_to_one``, else t = 1. DDIM steps from k to k - T // steps; a spacing whose timesteps are not that
    far apart (``linspace`` for most step counts) is refused."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing, offset = config.get("timestep_spacing", "leading"), int(config.get("steps_offset", 0))
    if spacing == "leading":
        ks = [i * (T // steps) + offset for i in range(steps)][::-1]
    elif spacing == "trailing":
        ks = [round(T - i * T / steps) - 1 for i in range(steps)]
    elif spacing == "linspace":
        ks = [round((T - 1) * i / (steps - 1)) if steps > 1 else 0 for i in range(steps)][::-1]
    else:
        raise DiffusersFormatError(f"timestep_spacing={spacing!r}; supported: leading, trailing, linspace")
    stride = T // steps
    if any(a - b != stride for a, b in zip(ks, ks[1:])) or ks[-1] - stride >= 0:
        raise ValueError(f"{spacing} spacing with {steps} steps does not step by T // steps = {stride}, as DDIM does")
    final = 0.0 if config.get("set_alpha_to_one", True) else 1.0
    return torch.tensor([k + 1.0 for k in ks] + [final], dtype=torch.float64)


# -- loading and writing folders ------------------------------------------------------------------------------


def scheduler_config(path: Path, unet_dir: Path, scheduler) -> dict[str, Any]:
    if isinstance(scheduler, dict):
        return scheduler
    if scheduler is not None:
        return _read_json(Path(scheduler))
    for candidate in (path / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json",
                      unet_dir.parent / "scheduler" / "scheduler_config.json"):  # fmt: skip
        if candidate.is_file():
            return _read_json(candidate)
    raise DiffusersFormatError(
        f"{path}: no scheduler config (looked for scheduler/scheduler_config.json and scheduler_config.json); "
        "pass scheduler=PATH"
    )


def load_unet(path: str | os.PathLike) -> tuple[UNet, dict[str, Any], Path]:
    """Our ``UNet`` holding a diffusers folder's ``UNet2DModel`` weights, its diffusers config, and its folder."""
    path = Path(path)
    unet_dir = _unet_dir(path)
    if unet_dir is None:
        index = path / "model_index.json"
        if index.is_file():
            what = _read_json(index).get("unet")
            raise DiffusersFormatError(f"{index}: its unet is {what!r}; only UNet2DModel pipelines are read")
        raise DiffusersFormatError(f"{path}: no UNet2DModel (expected unet/config.json or config.json)")
    config = _read_json(unet_dir / "config.json")
    kwargs = read_unet_config(config)
    from ..names import build_net

    net = build_net({"name": "unet", **kwargs})
    net.load_state_dict(unet_state_from_diffusers(net, _read_weights(unet_dir)))
    return net, config, unet_dir


def load_diffusers(path: str | os.PathLike, *, device="cpu", clip: bool = True, scheduler=None):
    """``(denoiser, process, config)`` of a diffusers folder, as ``training.checkpoint.load_denoiser`` gives for a
    run: frozen, in eval mode, x0_hat clipped or thresholded as the scheduler says (``clip=False``: neither).

    ``path``: a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a bare ``UNet2DModel`` folder
    (``config.json`` and weights) with ``scheduler_config.json`` beside it, in ``../scheduler/``, or given as
    ``scheduler`` (a path or a dict). ``config`` is a run config describing the model (process, target, net,
    sigma_data = 1: the network sees x_t itself), with the diffusers configs under "diffusers".
    """
    path = Path(path)
    net, unet_config, unet_dir = load_unet(path)
    sched = scheduler_config(path, unet_dir, scheduler)
    process, target, clipping = read_scheduler(sched)
    in_ch, out_ch = net.config["in_channels"], net.config["out_channels"]
    variance = str(sched.get("variance_type", ""))
    if out_ch != in_ch and not (out_ch == 2 * in_ch and variance.startswith("learned")):
        raise DiffusersFormatError(
            f"UNet2DModel has {in_ch} input but {out_ch} output channels (learned variances need variance_type "
            f"'learned' or 'learned_range', got {variance!r})"
        )
    net.requires_grad_(False)
    model = DiffusersNet(
        net, center_input=bool(unet_config.get("center_input_sample")), channels=in_ch if out_ch != in_ch else None
    )
    denoiser = as_denoiser(model, process, target)
    box = None
    if clip and "threshold" in clipping:
        denoiser = ThresholdedDenoiser(denoiser, *clipping["threshold"])
    elif clip and "box" in clipping:
        box = [[-clipping["box"]], [clipping["box"]]]
        denoiser = clip_denoiser(denoiser, *box)
    config = {
        "format": "diffusers",
        "path": str(path),
        "process": {"name": "ddpm", "betas": process.betas.tolist()},
        "net": {"name": "unet", **net.config},
        "target": target.name,
        "sigma_data": 1.0,
        "data_box": box,
        "step": 0,
        "objective": "denoising",
        "diffusers": {"unet": unet_config, "scheduler": sched},
    }
    return denoiser.to(device).eval(), process, config


def unet_to_diffusers(
    net: UNet, process: Discrete, target: Prediction, sigma_data: float, *, preconditioned: bool = True,
    precondition_output: bool = True,
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:  # fmt: skip
    """``(unet_config, weights, scheduler_config)`` of a ``UNet2DModel`` that computes what ``net`` does.

    ``preconditioned``: ``net`` was trained inside ``Preconditioned`` (our runs); then it must see x_t unscaled
    (c_in = 1: a variance-preserving ``Discrete`` process with sigma_data = 1) and its output must be the target
    itself (c_skip = 0, c_out = 1: eps, or v with sigma_data = 1), and its embedding of c_noise(t) = -lam(t)/4 is
    tabulated at t = k + 1 into diffusers' "learned" embedding. Else (a U-Net read from diffusers) it is written
    back as it was read. Raises ``ValueError`` naming what cannot be exported.
    """
    if not isinstance(net, UNet):
        raise ValueError(f"only U-Net models export to diffusers' UNet2DModel, got {type(net).__name__}")
    if not isinstance(process, Discrete):
        raise ValueError(
            f"diffusers' DDPM schedulers need a Discrete (DDPM) process, got {process!r}: train with --process ddpm"
        )
    cfg = net.config
    if cfg.get("num_classes"):
        raise ValueError("a class-conditional U-Net does not export: DDPMPipeline samples unconditional models")
    if cfg.get("cond_channels"):
        raise ValueError("a super-resolution U-Net (cond_channels > 0) does not export: DDPMPipeline has no low_res")
    if cfg.get("resblock_updown"):
        raise ValueError("resblock_updown=True does not export (diffusers resamples inside ResnetBlock2D differently)")
    names = {v: k for k, v in PREDICTION_TYPES.items()}
    if target not in names:
        raise ValueError(f"target {target.name!r} has no diffusers prediction_type; export eps, v or x0 models")
    T = process.n_steps
    t = torch.arange(1, T + 1, dtype=torch.float64)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if preconditioned:
        alpha, sigma = process.alpha(t), process.sigma(t)
        c_in, c_noise = network_inputs(alpha, sigma, sigma_data)
        tol = 64 * torch.finfo(torch.float64).eps
        if float((c_in - 1).abs().max()) > tol:
            raise ValueError(
                f"the network sees c_in x_t with c_in = 1/sqrt(alpha^2 sigma_data^2 + sigma^2) != 1 (sigma_data = "
                f"{sigma_data:.4g}); a diffusers U-Net sees x_t itself: train with --set sigma_data=1 to export"
            )
        if precondition_output and target is not EPS:
            c_skip, c_out = target.output_scalings(process, t, t, sigma_data, (alpha, sigma))
            if float(c_skip.abs().max()) > tol or float((c_out - 1).abs().max()) > tol:
                raise ValueError(
                    f"the network's output is scaled for {target.name!r} (c_skip x + c_out F with c_out != 1 or "
                    "c_skip != 0), which a diffusers U-Net cannot compute: export eps models, or v with sigma_data=1"
                )
        with torch.no_grad():
            table = net.time[0](c_noise.to(torch.float32))
        state["time.0.weight"] = table
        cfg = {**cfg, "time_embedding": TableEmbedding.name, "time_embedding_options": {"num": T}}
    emb, opts = cfg["time_embedding"], cfg.get("time_embedding_options") or {}
    if emb == TableEmbedding.name:
        time = {"time_embedding_type": "learned", "num_train_timesteps": int(opts.get("num", T))}
    elif emb == SinusoidalEmbedding.name and opts.get("scale") == 1.0 and opts.get("max_period", 10_000.0) == 10_000.0:
        time = {
            "time_embedding_type": "positional",
            "freq_shift": opts.get("shift", 0.0),
            "flip_sin_to_cos": not opts.get("sin_first", False),
        }
    else:
        raise ValueError(f"time embedding {emb!r} with {opts} has no diffusers equivalent")
    heads = _head_dims(net)
    if len(heads) != 1:
        raise ValueError(f"diffusers uses one attention head width for every block; this U-Net has {sorted(heads)}")
    from ..names import build_net

    shadow = build_net({"name": "unet", **cfg})  # the module tree diffusers' weights map onto (table or not)
    sizes = [cfg["image_size"] >> i for i in range(len(cfg["channel_mult"]))]
    attn = [s in cfg["attention_resolutions"] for s in sizes]
    for m in shadow.modules():
        if isinstance(m, nn.GroupNorm) and m.num_groups != cfg["groups"]:
            raise ValueError(f"groups={cfg['groups']} does not divide {m.num_channels} channels; diffusers needs it to")
    unet_config = {
        "_class_name": "UNet2DModel",
        "_diffusers_version": FORMAT_VERSION,
        "sample_size": cfg["image_size"],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "center_input_sample": False,
        **time,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [cfg["channels"] * m for m in cfg["channel_mult"]],
        "layers_per_block": cfg["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg["dropout"],
        "act_fn": "silu",
        "attention_head_dim": heads.pop(),
        "norm_num_groups": cfg["groups"],
        "attn_norm_num_groups": cfg["groups"],
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if cfg["scale_shift"] else "default",
        "add_attention": True,
        "time_embedding_dim": cfg["emb_dim"],
    }
    weights = unet_state_to_diffusers(shadow, state)
    scheduler = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": FORMAT_VERSION,
        "num_train_timesteps": T,
        "trained_betas": process.betas.tolist(),
        "beta_schedule": "linear",  # ignored where trained_betas is given
        "prediction_type": names[target],
        "variance_type": "fixed_small",
        "clip_sample": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    return unet_config, weights, scheduler


def _head_dims(net: UNet) -> set[int]:
    from ..nets.unet import Attention

    return {m.qkv.in_features // m.heads for m in net.modules() if isinstance(m, Attention)}


def write_diffusers_folder(
    out: str | os.PathLike, unet_config: dict, weights: dict[str, Tensor], scheduler: dict
) -> Path:
    """Write a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``) atomically: into a temporary
    folder beside ``out``, renamed to ``out`` when complete. ``out`` must not exist yet."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder for the export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private (0700); the export is an ordinary folder
    try:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": FORMAT_VERSION,
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "unet": ["diffusers", "UNet2DModel"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "unet" / WEIGHTS[0], metadata={"format": "pt"})
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
