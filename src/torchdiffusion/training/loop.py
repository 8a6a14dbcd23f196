"""The training loop: denoising score matching with AdamW, EMA weights and resumable checkpoints.

``train(TrainConfig(...), run_dir)`` fits a network to predict ``target`` (eps, x0, v, ...) under the
denoising loss of ``objectives.denoising`` (Ho et al. 2020, Algorithm 1), through ``Preconditioned`` so its
inputs have unit scale whatever the process (Karras et al. 2022). Ingredients:

* Data: a 2-D toy set or a .npy / .csv matrix (MLP, "dim" filled in), or images (a name of
  ``data.IMAGE_DATASETS``, a folder, .npz or IDX file; "in_channels", "image_size" filled in), with
  optional random left-right flips and class labels for a class-conditional net.
* AdamW, decoupled weight decay (Loshchilov & Hutter 2019); global grad-norm clipping.
* Linear learning-rate warm-up (Goyal et al. 2017), then cosine decay to 0 (Loshchilov & Hutter
  2017) or a constant rate; see ``lr_at`` for the exact formula.
* An exponential moving average of the weights, the ones to sample with (Song & Ermon 2020,
  Sec. 3.5; Ho et al. 2020, Sec. 4).
* Mixed precision: the network runs under ``torch.autocast`` (bf16 on CPU or CUDA; fp16 on CUDA with
  a ``GradScaler``, Micikevicius et al. 2018); weights, optimizer and loss stay float32.
* Scale: the global batch is batch_size * grad_accum * world_size examples per optimizer step, with
  gradient accumulation and data-parallel processes under torchrun (``training.distributed``); the same
  global batch gives the same update, however it is split.
* Determinism: data, initialisation, batch order and diffusion noise each come from their own
  seeded generator, and the caller's global RNG is left untouched (``fork_rng``). A run stopped
  and resumed from a checkpoint ends with weights bit-for-bit equal to an uninterrupted run.

``run_dir`` receives ``log.csv`` (step, loss, lr, grad_norm, steps_per_s: loss and grad_norm are
means over the rows' window), ``checkpoint/`` (see ``training.checkpoint``), for image data with
``sample_every`` ``samples/step_XXXXXX.png`` (EMA weights, ``training.sample_grids``), and with
``tensorboard`` the same scalars and grids in ``tensorboard/``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..names import PRECISIONS, build_net, build_process
from .checkpoint import find_checkpoint, load_checkpoint, load_denoiser, remove_stale_temp_dirs, save_checkpoint
from .config import _MAY_CHANGE_ON_RESUME, TrainConfig, config_diff
from .distributed import DistInfo, process_group, resolve_device, resolve_precision, unet_layout
from .ema import ema_decay_at, ema_update
from .logfile import read_log
from .objective import DISTILLATIONS, TrainingObjective
from .resolve import load_training_data, resolve_config
from .sample_grids import open_tensorboard, write_sample_grid
from .step import GlobalBatches, ScaledStep, lr_at

__all__ = ["TrainResult", "train", "LOG_COLUMNS"]

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "steps_per_s")


@dataclass
class TrainResult:
    net: nn.Module  # raw network (wrap in Preconditioned, or use checkpoint.load_denoiser)
    ema_net: nn.Module  # EMA of its weights
    process: Any
    config: dict[str, Any]  # the resolved config (net "dim" or image shape, and sigma_data filled in)
    history: list[dict[str, float]]  # the rows of log.csv (on rank 0; empty on the others)
    run_dir: Path


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    teacher=None,
) -> TrainResult:
    """Train a denoiser as ``config`` says, writing log.csv, checkpoints and sample grids into ``run_dir``.

    Under torchrun (WORLD_SIZE > 1 in the environment) every process calls this; they join one process
    group and train data-parallel (``training.distributed``), and only rank 0 writes files.

    Args:
        config: the run's ``TrainConfig``.
        run_dir: output directory. Without ``resume`` it must not hold a previous run.
        resume: continue from ``run_dir``'s checkpoint (if any) up to ``config.steps``. The config
            must equal the stored one except for steps, device, tensorboard, sample_every, sample_count.
        progress: show a tqdm bar (smoothed loss, steps/s, ETA) on rank 0.
        teacher: the distillations' teacher as a denoiser (e.g. a mixture's exact one), in place of loading
            ``config.teacher``, which then only labels it.
        callback: ``callback(step, {"loss", "lr", "grad_norm"})`` after each step and its
            log row / checkpoint, on every rank; it may raise to stop. KeyboardInterrupt (from it or from Ctrl-C)
            saves a checkpoint of the last completed step before it propagates.
    Raises:
        FileExistsError: ``run_dir`` holds a run and ``resume`` is False.
        ValueError: resuming with a different config; CUDA or fp16 without CUDA; CheckpointError for a bad checkpoint.
        FloatingPointError: non-finite loss (or, without fp16's GradScaler, gradient) at a named step; the
            weights are not updated with it and no checkpoint is written of that step.
    """
    with process_group(config.device) as info:
        return _train(config, Path(run_dir), info, resume, progress, callback, teacher)


def _teacher(cfg: TrainConfig, teacher, device):
    """The distillation's teacher: the given denoiser, else the EMA model of the run ``cfg.teacher``, which must
    have the student's process (reflow: any process; its samples are the data)."""
    if cfg.objective not in DISTILLATIONS or cfg.objective == "reflow":
        return None
    if teacher is not None:
        return teacher.to(device) if isinstance(teacher, nn.Module) else teacher
    if cfg.teacher is None:
        raise ValueError(f"objective {cfg.objective!r} needs a teacher: set teacher to a run directory")
    model, process, tconfig = load_denoiser(cfg.teacher, device=device)
    kind = tconfig.get("objective", "denoising")
    # A denoiser (a reflow student is one) teaches anything; a progressive student only its own next round, being
    # right on its grid alone; a consistency model returns samples, not posterior means.
    if kind not in ("denoising", "reflow") and not (kind == "progressive" and cfg.objective == "progressive"):
        raise ValueError(
            f"the teacher {cfg.teacher} is a {kind!r} model; a {cfg.objective!r} student needs a denoiser "
            "(a 'denoising' or 'reflow' run)"
        )
    if tconfig["process"] != cfg.process:
        raise ValueError(
            f"the teacher {cfg.teacher} was trained on process {tconfig['process']}, the student on {cfg.process}: "
            "a student learns its teacher's trajectories, so they must share the process"
        )
    if cfg.label_dropout > 0 and not tconfig.get("label_dropout", 0) > 0:
        raise ValueError(
            f"the student drops class labels (label_dropout={cfg.label_dropout}) but the teacher {cfg.teacher} never "
            "learned the null class: set label_dropout=0, or distil a teacher trained with label dropout"
        )
    return model


def _init_weights(cfg: TrainConfig, net: nn.Module) -> None:
    """Start ``net`` from the EMA weights of the run ``cfg.init`` (a student from its teacher)."""
    init = load_checkpoint(find_checkpoint(Path(cfg.init)) or Path(cfg.init))
    if init.config["net"] != cfg.net:
        raise ValueError(f"init: the network of {cfg.init} ({init.config['net']}) differs from this run's ({cfg.net})")
    net.load_state_dict(init.ema_net.state_dict())


def _train(
    config: TrainConfig, run_dir: Path, info: DistInfo, resume: bool, progress: bool, callback, teacher
) -> TrainResult:
    log_path, device = run_dir / "log.csv", resolve_device(config.device, info)
    if config.precision == "fp16" and device.type != "cuda":  # the loss scaling itself runs anywhere (its tests)
        raise ValueError(
            f"precision='fp16' (autocast + GradScaler) is for CUDA; device is {device}, and fp16 autocast made a "
            "digits U-Net training step about 70x slower than fp32 on the CPU (its backward): use bf16 (fast on "
            "CPUs with AMX) or fp32"
        )
    existing = find_checkpoint(run_dir)
    if not resume and (existing is not None or log_path.exists()):
        raise FileExistsError(
            f"{run_dir} already holds a training run ({existing or log_path}); pass resume=True "
            "(--resume on the command line) to continue it, or choose another directory"
        )
    seeds = torch.randint(0, 2**62, (4,), generator=torch.Generator().manual_seed(config.seed)).tolist()
    data, labels = load_training_data(config, generator=torch.Generator().manual_seed(seeds[0]))
    cfg = resolve_config(config, data, labels)
    resolved = cfg.to_dict()
    # Every random draw of the run happens inside fork_rng: the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ckpt = load_checkpoint(existing) if existing is not None and resume else None
        if cfg.precision == "auto":  # a resume keeps the precision its run resolved to, wherever it runs now
            stored = ckpt.config.get("precision") if ckpt is not None else None
            precision = stored if stored in PRECISIONS else resolve_precision("auto", device, cfg.net["name"])
            cfg = dataclasses.replace(cfg, precision=precision)
            resolved = cfg.to_dict()
        if ckpt is not None:
            diff = config_diff(ckpt.config, resolved)
            if diff:
                detail = "; ".join(f"{k}: {ckpt.config.get(k)!r} -> {resolved.get(k)!r}" for k in diff)
                raise ValueError(
                    f"cannot resume {run_dir}: the config differs from the checkpoint's in {diff} ({detail}); "
                    f"only {', '.join(_MAY_CHANGE_ON_RESUME)} may change when resuming"
                )
            if ckpt.step > cfg.steps:
                raise ValueError(f"cannot resume {run_dir}: checkpoint is at step {ckpt.step} > steps={cfg.steps}")
            net, ema_net = ckpt.net.to(device), ckpt.ema_net.to(device)
        else:
            torch.manual_seed(seeds[1])  # the same initial weights on every rank
            net = build_net(cfg.net)
            if cfg.init is not None:
                _init_weights(cfg, net)
            net = net.to(device)
            ema_net = copy.deepcopy(net)
            if info.rank > 0:  # dropout: each rank its own masks
                torch.manual_seed(seeds[1] + info.rank)
        info.barrier()  # every rank has read the checkpoint before rank 0 writes to run_dir
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_dirs(run_dir)
            if cfg.autoencoder is not None:
                _keep_autoencoder(cfg.autoencoder, run_dir)
            if progress:  # the size of what is being trained, as users expect to see it
                n_params = sum(p.numel() for p in net.parameters())
                tqdm.write(f"{type(net).__name__}: {n_params:,} parameters; {len(data):,} training examples")
        labels = labels.to(device) if labels is not None and cfg.class_conditional else None
        teacher = _teacher(cfg, teacher, device)
        loop = _Loop(cfg, run_dir, info, net, ema_net, data.to(device), labels, seeds, ckpt, teacher)
        return loop.run(progress, callback)


def _keep_autoencoder(source: str, run_dir: Path) -> None:
    """A copy of a latent model's autoencoder checkpoint in ``run_dir/autoencoder``, so the run samples (decodes) on
    its own, wherever it is moved; written once (atomically), before the first step."""
    dest = run_dir / "autoencoder" / "checkpoint"
    if dest.is_dir():
        return
    found = find_checkpoint(source)
    if found is None:
        raise FileNotFoundError(f"autoencoder {source!r} holds no checkpoint")
    tmp = run_dir / "autoencoder" / f".copy-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(found, tmp)
    os.replace(tmp, dest)


class _Loop:
    """The state of a run between steps, and the steps themselves."""

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, info: DistInfo, net, ema_net, data, labels, seeds, ckpt, teacher
    ):
        self.cfg, self.run_dir, self.info, self.net, self.ema_net = cfg, run_dir, info, net, ema_net
        self.data, self.labels, self.seeds, self.device = data, labels, seeds, data.device
        self.ema_net.requires_grad_(False)
        self.process = build_process(cfg.process)
        layout = unet_layout(cfg.precision, self.device) if hasattr(net, "memory_format") else None
        if layout is not None:  # the U-Net's activations follow its weights' layout (bf16 on the CPU: NCHW)
            net.to(memory_format=layout)
            ema_net.to(memory_format=layout)
        # fused: one kernel for all parameters instead of a dozen per-tensor passes (CPU and CUDA; 2.6 of ~115 ms
        # per step on the digits U-Net); the same update up to rounding (~1 ulp from the foreach version)
        fused = self.device.type in ("cpu", "cuda") or None
        self.opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        dtype = PRECISIONS[cfg.precision]
        self.null_label = cfg.net.get("num_classes")  # the nets' unconditional label (label dropout)
        self.objective = TrainingObjective(cfg, self.process, teacher, net, len(data))
        sr = (cfg.super_resolution, cfg.low_res_noise) if cfg.super_resolution else None
        self.scaled = ScaledStep(
            net, self.opt, self.objective, dtype=dtype, info=info, device=self.device, super_resolution=sr
        )
        self.gen = torch.Generator(self.device).manual_seed(seeds[3])  # diffusion times, noise and flips
        order = torch.Generator().manual_seed(seeds[2])
        self.batches = GlobalBatches(len(data), cfg.batch_size, cfg.grad_accum, info, order, self.gen)
        self.step = self.saved = 0
        self.window: list[dict[str, float]] = []  # per-step infos since the last log row
        if ckpt is not None:
            state = ckpt.state
            if int(state.get("world_size", 1)) != info.world_size:
                raise ValueError(
                    f"cannot resume {run_dir}: it was trained with {state.get('world_size', 1)} process(es), this run "
                    f"has {info.world_size}; the global batch and its split would change"
                )
            self.step = self.saved = ckpt.step
            self.opt.load_state_dict(state["optimizer"])
            self.batches.load_state_dict(state["data_order"])
            ranks = state.get("rng_ranks", [state["rng"]])
            self._set_rng(ranks[info.rank] if info.rank < len(ranks) else {**state["rng"], "torch": None})
            if self.scaled.scaler is not None and "scaler" in state:
                self.scaled.scaler.load_state_dict(state["scaler"])
            self.window = state["log_window"]
            self.objective.load_state_dict(state.get("objective", {}))
        self.history = read_log(run_dir / "log.csv", self.step, LOG_COLUMNS) if info.is_main else []
        self.images = data.ndim == 4

    def _rng(self) -> dict[str, Any]:
        rng = {"noise": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_rng(self, rng: dict[str, Any]) -> None:
        self.gen.set_state(rng["noise"])
        if rng["torch"] is None:  # saved on Ctrl-C under torchrun: only rank 0's dropout RNG was known
            torch.manual_seed(self.seeds[1] + self.info.rank + self.step)
            return
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save(self, interrupted: bool = False) -> None:
        """Write a checkpoint (rank 0), with every rank's RNG state; collective unless ``interrupted``."""
        ranks = [self._rng()] if interrupted else self.info.gather(self._rng())
        if self.info.is_main:
            state = {
                "step": self.step,
                "world_size": self.info.world_size,
                "optimizer": self.opt.state_dict(),
                "rng": ranks[0],
                "data_order": self.batches.state_dict(),
                "log_window": self.window,
                "objective": self.objective.state_dict(),
                **({"rng_ranks": ranks} if self.info.enabled else {}),
                **({"scaler": self.scaled.scaler.state_dict()} if self.scaled.scaler is not None else {}),
            }
            save_checkpoint(self.run_dir, net=self.net, ema_net=self.ema_net, config=self.cfg.to_dict(), state=state)
        if not interrupted:
            self.info.barrier()
        self.saved = self.step

    def update(self) -> dict[str, float]:
        """One optimizer step. Raises before touching the weights if the loss or gradient is not finite."""
        self.net.train()
        lr, rng, order = lr_at(self.step, self.cfg), self._rng(), self.batches.state_dict()
        try:
            shape, uniforms, f = tuple(self.data.shape[1:]), self.objective.uses_uniforms, self.cfg.super_resolution
            low_res = (shape[0], shape[1] // f, shape[2] // f) if f else None
            batch = self.batches.next(
                self.process, shape, self.device, self.cfg.flip, self.cfg.label_dropout, uniforms, low_res
            )
            self.opt.zero_grad(set_to_none=True)
            loss = self.scaled.backward(self.data, self.labels, batch, step=self.step, null_label=self.null_label)
            clip = self.cfg.grad_clip or math.inf  # with inf, clip_grad_norm_ only measures the norm
            info = {"loss": loss, "lr": lr, "grad_norm": nn.utils.clip_grad_norm_(self.net.parameters(), clip).item()}
        except KeyboardInterrupt:  # the step was not taken: undo its random draws so a resume redoes them
            self._set_rng(rng)
            self.batches.load_state_dict(order)
            raise
        # With fp16's GradScaler an inf gradient is normal (the scaler skips the step and lowers its scale).
        if not math.isfinite(loss) or (self.scaled.scaler is None and not math.isfinite(info["grad_norm"])):
            raise FloatingPointError(
                f"non-finite loss {info['loss']} / grad norm {info['grad_norm']} at step {self.step + 1}; "
                "the weights were not updated and no checkpoint is written of them. "
                "Try a lower lr (--lr), grad_clip, precision='fp32' (--precision fp32), or check the data"
            )
        self.updating = True  # from here to the end the weights, EMA and step change together
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.scaled.step()
        ema_update(self.ema_net, self.net, ema_decay_at(self.step, self.cfg.ema_decay))
        self.objective.after_step(self.net, self.step)
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

    def write_samples(self, writer) -> None:
        cfg = self.cfg
        classes = cfg.net.get("num_classes") if cfg.class_conditional else None
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        kw = dict(config=cfg.to_dict(), n=cfg.sample_count, seed=self.seeds[0])
        if cfg.super_resolution:  # upsample the first training images' pooled versions
            idx = torch.arange(cfg.sample_count, device=self.device) % len(self.data)
            kw["cond"] = {"low_res": torch.nn.functional.avg_pool2d(self.data[idx], cfg.super_resolution)}
        shape = tuple(self.data.shape[1:])
        if cfg.autoencoder is not None:  # a latent model: show the decoded samples
            from .autoencoder import decode_latents, load_autoencoder

            ae, meta = load_autoencoder(self.run_dir / "autoencoder", device=self.device)
            kw["decode"] = lambda z: decode_latents(ae, z, float(meta["scale_factor"]))
        write_sample_grid(
            self.ema_net, self.process, shape, path, num_classes=classes, writer=writer, step=self.step, **kw
        )

    def run(self, progress: bool, callback) -> TrainResult:
        cfg, log_path, main = self.cfg, self.run_dir / "log.csv", self.info.is_main
        t0, smooth = time.perf_counter(), None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (progress and main), unit="step", dynamic_ncols=True)
        writer = open_tensorboard(self.run_dir, self.step) if cfg.tensorboard and main else None
        self.updating = False
        try:
            with open(log_path, "a", newline="") if main else nullcontext() as fh:
                csv_writer = csv.DictWriter(fh, LOG_COLUMNS) if main else None
                while self.step < cfg.steps:
                    info = self.update()
                    self.window.append(info)
                    smooth = info["loss"] if smooth is None else 0.98 * smooth + 0.02 * info["loss"]
                    bar.update()
                    bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
                    end = self.step == cfg.steps
                    if self.step % cfg.log_every == 0 or end:
                        row = self._log_row(time.perf_counter() - t0)
                        if main:
                            csv_writer.writerow(row)
                            fh.flush()
                            self.history.append(row)
                            for key in ("loss", "lr", "grad_norm", "steps_per_s"):
                                writer is not None and writer.add_scalar(f"train/{key}", row[key], self.step)
                        self.window, t0 = [], time.perf_counter()
                    if self.step % cfg.checkpoint_every == 0 or end:
                        self.save()
                    if main and self.images and cfg.sample_every and (self.step % cfg.sample_every == 0 or end):
                        started = time.perf_counter()
                        self.write_samples(writer)
                        t0 += time.perf_counter() - started  # sampling time does not count against steps/s
                    if callback is not None:
                        callback(self.step, info)
        except KeyboardInterrupt:
            # Save the last completed step so the run can resume; not if the weights were half updated.
            if not self.updating and self.step != self.saved:
                self.save(interrupted=True)
            raise
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        self.net.eval()
        self.ema_net.eval()
        return TrainResult(self.net, self.ema_net, self.process, self.cfg.to_dict(), self.history, self.run_dir)
