"""The training loop: denoising score matching with AdamW, EMA weights and resumable checkpoints.

``train(TrainConfig(...), run_dir)`` fits a network to predict ``target`` (eps, x0, v, ...) under the
denoising loss of ``losses.py`` (Ho et al. 2020, Algorithm 1), through ``Preconditioned`` so its
inputs have unit scale whatever the process (Karras et al. 2022). Ingredients:

* AdamW, decoupled weight decay (Loshchilov & Hutter 2019); global grad-norm clipping.
* Linear learning-rate warm-up (Goyal et al. 2017), then cosine decay to 0 (Loshchilov & Hutter
  2017) or a constant rate; see ``lr_at`` for the exact formula.
* An exponential moving average of the weights, the ones to sample with (Song & Ermon 2020,
  Sec. 3.5; Ho et al. 2020, Sec. 4).
* Determinism: data, initialisation, batch order and diffusion noise each come from their own
  seeded generator, and the caller's global RNG is left untouched (``fork_rng``). A run stopped
  and resumed from a checkpoint ends with weights bit-for-bit equal to an uninterrupted run.

``run_dir`` receives ``log.csv`` (step, loss, lr, grad_norm, steps_per_s: loss and grad_norm are
means over the rows' window) and ``checkpoint/`` (see ``checkpoint.py``).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import losses
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .data import load_dataset
from .parameterization import PREDICTIONS, Preconditioned
from .specs import build_net, build_process

__all__ = ["TrainConfig", "TrainResult", "train", "lr_at", "ema_update", "LOG_COLUMNS"]

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "steps_per_s")
SCHEDULES = ("cosine", "constant")
_META_KEYS = ("step", "format_version")  # added to config.json by checkpoints, not config fields


def _spec(**kw) -> Any:
    return field(default_factory=lambda: dict(kw))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; JSON-able via ``to_dict`` / ``from_dict``."""

    data: str = "moons"  # built-in 2-D set name, or a .npy / .csv path
    n_data: int = 20000  # points drawn for a built-in set (files: all rows)
    process: dict = _spec(name="vp")  # noise-process spec for specs.build_process
    target: str = "eps"  # network output: eps, x0, v, score or flow
    weighting: str = "simple"  # loss weighting, one of losses.WEIGHTINGS
    net: dict = _spec(name="mlp", width=256, depth=4)  # network spec; "dim" is filled in from the data
    steps: int = 4000  # total optimizer steps
    batch_size: int = 512  # examples per step, drawn epoch by epoch
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup: int = 200  # linear LR warm-up steps (Goyal et al. 2017)
    lr_schedule: str = "cosine"  # after warm-up: "cosine" (to 0) or "constant"
    grad_clip: float | None = 1.0  # max global grad norm; None or 0: no clipping
    ema_decay: float = 0.999  # EMA decay per step; 0: EMA equals the net
    seed: int = 0  # seeds data, init, batch order and noise
    checkpoint_every: int = 1000  # steps between checkpoints (one more at the end)
    log_every: int = 50  # steps between rows of log.csv
    sigma_data: float | None = None  # data std for preconditioning; None: estimated
    device: str = "cpu"  # torch device to train on

    def __post_init__(self):
        if isinstance(self.process, str):  # convenience: "vp" means {"name": "vp"}
            object.__setattr__(self, "process", {"name": self.process})
        if isinstance(self.data, os.PathLike):  # keep the config JSON-able
            object.__setattr__(self, "data", os.fspath(self.data))
        checks = {
            "process": isinstance(self.process, dict) and "name" in self.process,
            "net": isinstance(self.net, dict) and "name" in self.net,
            "target": self.target in PREDICTIONS,
            "weighting": self.weighting in losses.WEIGHTINGS,
            "lr_schedule": self.lr_schedule in SCHEDULES,
            "n_data": self.n_data >= 2,
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup": self.warmup >= 0,
            "grad_clip": self.grad_clip is None or self.grad_clip >= 0,
            "ema_decay": 0 <= self.ema_decay <= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "log_every": self.log_every >= 1,
            "sigma_data": self.sigma_data is None or self.sigma_data > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid TrainConfig value(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; also accepts a checkpoint's config.json (ignores step, format_version)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - set(_META_KEYS))
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    net: nn.Module  # raw network (wrap in Preconditioned, or use checkpoint.load_denoiser)
    ema_net: nn.Module  # EMA of its weights
    process: Any
    config: dict[str, Any]  # the resolved config (net "dim" and sigma_data filled in)
    history: list[dict[str, float]]  # the rows of log.csv
    run_dir: Path


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based: the update that completes step + 1).

    Warm-up: lr (step + 1) / warmup for step < warmup, so the first update already moves.
    Then "constant": lr; "cosine": lr (1 + cos(pi p)) / 2 with p = (step - warmup) / (steps - warmup).
    """
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "constant":
        return config.lr
    p = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay at 0-based step k: min(decay, (1 + k) / (10 + k)).

    The warm-up keeps a short run's EMA from being mostly the random initialisation (with
    decay 0.999, after 800 steps 0.999^800 = 45% of the EMA would still be the init); it is the
    num_updates rule of TensorFlow's ExponentialMovingAverage, also used by diffusers' EMAModel.
    """
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema_net: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) param, in place (lerp); buffers are copied as they are."""
    for e, p in zip(ema_net.parameters(), net.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)  # lerp with weight 1 returns p exactly: decay 0 gives ema == net
    for e, b in zip(ema_net.buffers(), net.buffers(), strict=True):
        e.copy_(b)


class _Batches:
    """Indices of minibatches: a fresh random permutation per epoch, from a dedicated generator."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.gen = n, batch_size, generator
        self.perm, self.pos = torch.empty(0, dtype=torch.long), 0

    def next(self) -> Tensor:
        parts, need = [], self.batch_size
        while need:
            if self.pos == len(self.perm):
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            part = self.perm[self.pos : self.pos + need]
            parts.append(part)
            self.pos, need = self.pos + len(part), need - len(part)
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        # perm is replaced, never modified in place, so a reference is a valid snapshot.
        return {"perm": self.perm, "pos": self.pos, "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])
        self.gen.set_state(state["generator"])


def _resolve(config: TrainConfig, data: Tensor) -> TrainConfig:
    """Fill in what the data decide: the network's input dim and, if unset, sigma_data = std(data)."""
    dim = data.shape[1]
    if config.net.get("dim", dim) != dim:
        raise ValueError(f"net spec has dim={config.net['dim']} but the data {config.data!r} have dim {dim}")
    sigma_data = config.sigma_data if config.sigma_data is not None else data.double().std().item()
    d = config.to_dict()
    d.update(net={**config.net, "dim": dim}, sigma_data=float(sigma_data))
    return TrainConfig.from_dict(d)


def _read_log(path: Path, upto: int) -> list[dict[str, float]]:
    """Rows of ``path`` with step <= upto; the file is rewritten (atomically) to hold just those."""
    rows = []
    if path.exists():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                try:  # a row cut short by a crash has missing cells: drop it
                    parsed = {k: float(row[k]) for k in LOG_COLUMNS}
                except (TypeError, ValueError, KeyError):
                    continue
                if parsed["step"] <= upto:
                    rows.append({**parsed, "step": int(parsed["step"])})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return rows


def _config_diff(stored: dict, given: dict) -> list[str]:
    keys = (set(stored) | set(given)) - {"steps", *_META_KEYS}
    return sorted(k for k in keys if stored.get(k) != given.get(k))


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a denoiser as ``config`` says, writing log.csv and checkpoints into ``run_dir``.

    Args:
        config: the run's ``TrainConfig``.
        run_dir: output directory. Without ``resume`` it must not hold a previous run.
        resume: continue from ``run_dir``'s checkpoint (if any) up to ``config.steps``. The config
            must equal the stored one except for ``steps``.
        progress: show a tqdm bar (smoothed loss, steps/s).
        callback: ``callback(step, {"loss", "lr", "grad_norm"})`` after each step and its
            log row / checkpoint; it may raise to stop. KeyboardInterrupt (from it or from Ctrl-C)
            saves a checkpoint of the last completed step before it propagates.
    Raises:
        FileExistsError: ``run_dir`` holds a run and ``resume`` is False.
        ValueError: resuming with a different config; CheckpointError for a bad checkpoint.
        FloatingPointError: non-finite loss or gradient; the weights are not updated with it and
            no checkpoint is written of that step.
    """
    run_dir, log_path = Path(run_dir), Path(run_dir) / "log.csv"
    existing = find_checkpoint(run_dir)
    if not resume and (existing is not None or log_path.exists()):
        raise FileExistsError(
            f"{run_dir} already holds a training run ({existing or log_path}); pass resume=True to "
            "continue it, or choose another directory"
        )
    seeds = torch.randint(0, 2**62, (4,), generator=torch.Generator().manual_seed(config.seed)).tolist()
    data = load_dataset(config.data, config.n_data, generator=torch.Generator().manual_seed(seeds[0]))
    cfg = _resolve(config, data)
    resolved = cfg.to_dict()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    # Every random draw of the run happens inside fork_rng: the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ckpt = load_checkpoint(existing) if existing is not None and resume else None
        if ckpt is not None:
            diff = _config_diff(ckpt.config, resolved)
            if diff:
                detail = "; ".join(f"{k}: {ckpt.config.get(k)!r} -> {resolved.get(k)!r}" for k in diff)
                raise ValueError(
                    f"cannot resume {run_dir}: the config differs from the checkpoint's in {diff} ({detail}); "
                    "only 'steps' may change when resuming"
                )
            if ckpt.step > cfg.steps:
                raise ValueError(f"cannot resume {run_dir}: checkpoint is at step {ckpt.step} > steps={cfg.steps}")
            net, ema_net = ckpt.net.to(device), ckpt.ema_net.to(device)
        else:
            torch.manual_seed(seeds[1])
            net = build_net(cfg.net).to(device)
            ema_net = copy.deepcopy(net)
        return _Loop(cfg, run_dir, net, ema_net, data.to(device), seeds, ckpt).run(progress, callback)


class _Loop:
    """The state of a run between steps, and the steps themselves."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, net, ema_net, data, seeds, ckpt):
        self.cfg, self.run_dir, self.net, self.ema_net, self.data = cfg, run_dir, net, ema_net, data
        self.ema_net.requires_grad_(False)
        self.process = build_process(cfg.process)
        self.model = Preconditioned(net, self.process, cfg.sigma_data)
        self.opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator(data.device).manual_seed(seeds[3])  # diffusion times and noise
        self.batches = _Batches(len(data), cfg.batch_size, torch.Generator().manual_seed(seeds[2]))
        self.step = self.saved = 0
        self.window: list[dict[str, float]] = []  # per-step infos since the last log row
        if ckpt is not None:
            state = ckpt.state
            self.opt.load_state_dict(state["optimizer"])
            self.batches.load_state_dict(state["data_order"])
            self._set_rng(state["rng"])
            self.step = self.saved = ckpt.step
            self.window = state["log_window"]
        self.history = _read_log(run_dir / "log.csv", self.step)

    def _rng(self) -> dict[str, Any]:
        rng = {"noise": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.data.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.data.device)
        return rng

    def _set_rng(self, rng: dict[str, Any]) -> None:
        self.gen.set_state(rng["noise"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.data.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.data.device)

    def save(self) -> None:
        state = {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "rng": self._rng(),
            "data_order": self.batches.state_dict(),
            "log_window": self.window,
        }
        save_checkpoint(self.run_dir, net=self.net, ema_net=self.ema_net, config=self.cfg.to_dict(), state=state)
        self.saved = self.step

    def update(self) -> dict[str, float]:
        """One optimizer step. Raises before touching the weights if the loss or gradient is not finite."""
        self.net.train()
        lr, rng, order = lr_at(self.step, self.cfg), self._rng(), self.batches.state_dict()
        try:
            batch = self.data[self.batches.next().to(self.data.device)]
            loss = losses.denoising_loss(
                self.model,
                self.process,
                batch,
                target=self.cfg.target,
                weighting=self.cfg.weighting,
                generator=self.gen,
            ).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            clip = self.cfg.grad_clip or math.inf  # with inf, clip_grad_norm_ only measures the norm
            info = {
                "loss": loss.item(),
                "lr": lr,
                "grad_norm": nn.utils.clip_grad_norm_(self.net.parameters(), clip).item(),
            }
        except KeyboardInterrupt:  # the step was not taken: undo its random draws so a resume redoes them
            self._set_rng(rng)
            self.batches.load_state_dict(order)
            raise
        if not (math.isfinite(info["loss"]) and math.isfinite(info["grad_norm"])):
            raise FloatingPointError(
                f"non-finite loss {info['loss']} / grad norm {info['grad_norm']} at step {self.step + 1}; "
                "the weights were not updated and no checkpoint is written of them. "
                "Try a lower lr, grad_clip, or check the data"
            )
        self.updating = True  # from here to the end the weights, EMA and step change together
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        ema_update(self.ema_net, self.net, ema_decay_at(self.step, self.cfg.ema_decay))
        self.step += 1
        self.updating = False
        return info

    def _log_row(self, seconds: float) -> dict[str, float]:
        """Means of loss and grad norm over the steps since the last row; lr of the last step."""
        n = len(self.window)
        return {
            "step": self.step,
            "loss": sum(w["loss"] for w in self.window) / n,
            "lr": self.window[-1]["lr"],
            "grad_norm": sum(w["grad_norm"] for w in self.window) / n,
            "steps_per_s": n / max(seconds, 1e-9),
        }

    def run(self, progress: bool, callback) -> TrainResult:
        cfg, log_path = self.cfg, self.run_dir / "log.csv"
        t0, smooth = time.perf_counter(), None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        self.updating = False
        try:
            with open(log_path, "a", newline="") as fh:
                writer = csv.DictWriter(fh, LOG_COLUMNS)
                while self.step < cfg.steps:
                    info = self.update()
                    self.window.append(info)
                    smooth = info["loss"] if smooth is None else 0.98 * smooth + 0.02 * info["loss"]
                    bar.update()
                    bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        row = self._log_row(time.perf_counter() - t0)
                        writer.writerow(row)
                        fh.flush()
                        self.history.append(row)
                        self.window, t0 = [], time.perf_counter()
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.save()
                    if callback is not None:
                        callback(self.step, info)
        except KeyboardInterrupt:
            # Save the last completed step so the run can resume; not if the weights were half updated.
            if not self.updating and self.step != self.saved:
                self.save()
            raise
        finally:
            bar.close()
        self.net.eval()
        self.ema_net.eval()
        return TrainResult(self.net, self.ema_net, self.process, self.cfg.to_dict(), self.history, self.run_dir)
