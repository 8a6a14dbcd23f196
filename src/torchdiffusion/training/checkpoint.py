"""Checkpoints: one directory of plain files, written atomically, read back with clear errors.

Layout of ``<run_dir>/checkpoint/``::

    model.safetensors   raw network weights (``net.state_dict()``)
    ema.safetensors     EMA weights, the ones to sample with
    config.json         the resolved training config (with "process", "net", "target",
                        "sigma_data"), plus "step" and "format_version"
    state.pt            optimizer state, step, RNG states, data order (``torch.save``)

``state.pt`` holds only tensors, numbers, strings, lists, tuples and dicts, so it is read with
``torch.load(weights_only=True)``: loading a checkpoint never unpickles arbitrary objects.

Writes are atomic. The files go into a fresh ``<run_dir>/.checkpoint-tmp-<pid>`` and are fsynced;
then ``checkpoint`` is renamed to ``checkpoint.old``, the temp dir to ``checkpoint``, and
``checkpoint.old`` is deleted. A crash at any point leaves a complete checkpoint: the previous one
(as ``checkpoint``, or as ``checkpoint.old`` if the crash fell between the two renames, which
``find_checkpoint`` falls back to) or the new one. A write that fails (disk full, file too large, read-only
folder) removes the temp dir and raises ``CheckpointWriteError`` naming the file, the problem and the
checkpoint that is still loadable; a process killed mid-write leaves its temp dir, which the next
``train`` in that run dir deletes (``remove_stale_temp_dirs``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from ..core.process import NoiseProcess
from ..core.support import clip_denoiser
from ..names import PREDICTIONS, build_net, build_process
from .objective import model_of

__all__ = [
    "FORMAT_VERSION",
    "FILES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "find_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_denoiser",
    "remove_stale_temp_dirs",
]

FORMAT_VERSION = 1
CHECKPOINT_DIR, OLD_DIR, TMP_PREFIX = "checkpoint", "checkpoint.old", ".checkpoint-tmp-"
MODEL, EMA, CONFIG, STATE = "model.safetensors", "ema.safetensors", "config.json", "state.pt"
FILES = (MODEL, EMA, CONFIG, STATE)
_REQUIRED_KEYS = ("process", "net", "target", "step")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match its own config."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``net`` and ``ema_net`` are rebuilt from ``config`` and hold its weights."""

    path: Path
    config: dict[str, Any]
    net: nn.Module
    ema_net: nn.Module
    process: NoiseProcess
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.config["step"])


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``<run_dir>/checkpoint``, else ``<run_dir>/checkpoint.old`` (crash between renames), else None."""
    for name in (CHECKPOINT_DIR, OLD_DIR):
        if (Path(run_dir) / name).is_dir():
            return Path(run_dir) / name
    return None


def remove_stale_temp_dirs(run_dir: Path) -> None:
    """Delete the ``.checkpoint-tmp-<pid>`` folders of processes that no longer run.

    ``save_checkpoint`` removes its temp folder on any exception, but a process killed while saving (kill -9,
    or SIGTERM, whose default action runs no handler) leaves it, and a resumed run has another pid. Only
    folders of dead processes go: a run directory has one writer, but a live pid may be one that still is.
    """
    if os.name != "posix":
        return  # os.kill(pid, 0) would terminate the process on Windows
    for tmp in run_dir.glob(f"{TMP_PREFIX}*"):
        pid = tmp.name[len(TMP_PREFIX) :]
        if not (tmp.is_dir() and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (OverflowError, OSError):
            pass  # alive under another user (PermissionError), or not a pid at all: leave it


# -- writing ---------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a directory entry) to disk so a rename never exposes empty files."""
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _weights(net: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views).
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file too large, no permission, ...).

    An ``OSError`` (``errno`` is the failed call's), whose message names the file, the problem, and where
    the previous checkpoint still lies, loadable: a failed write never touches it.
    """


class _StateFile:
    """The file ``torch.save`` writes ``state.pt`` through, keeping the ``OSError`` of a failed write.

    torch.save turns a failed write (disk full, RLIMIT_FSIZE) into an opaque RuntimeError ("unexpected pos
    704 vs 598"); ``save_checkpoint`` reports the OSError kept here instead.
    """

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            self.fh.write(data)  # a BufferedWriter writes every byte or raises
        except OSError as e:
            self.error = e
            raise
        return len(data)

    def flush(self) -> None:
        self.fh.flush()


def _previous(run_dir: Path) -> str:
    """What a failed write left for the user: the checkpoint ``find_checkpoint`` would load, and its step."""
    found = find_checkpoint(run_dir)
    if found is None:
        return f"{run_dir} holds no earlier checkpoint"
    try:
        step = json.loads((_locate(found) / CONFIG).read_text(encoding="utf-8"))["step"]
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
        return f"the last checkpoint, {found}, is itself unreadable ({e})"
    return f"the last complete checkpoint, {found} (step {step}), is intact and loadable: resume from it"


def save_checkpoint(
    run_dir: str | os.PathLike, *, net: nn.Module, ema_net: nn.Module, config: dict, state: dict
) -> Path:
    """Atomically write ``<run_dir>/checkpoint/`` and return its path.

    Args:
        run_dir: the run directory (created if missing).
        net, ema_net: raw networks (not wrapped in ``Preconditioned``).
        config: JSON-able dict that rebuilds them: "process" and "net" specs, "target", ...
        state: must contain "step" (int); tensors, numbers, strings, lists and dicts only.

    Raises:
        CheckpointWriteError: a file could not be written or renamed (disk full, file too large, read-only
            folder, ...). The temporary folder is removed and the previous checkpoint is left as it was; the
            message names the file, the problem and the checkpoint that remains loadable.
    """
    if "step" not in state:
        raise ValueError("state must contain 'step' (the number of completed optimizer steps)")
    run_dir = Path(run_dir)
    meta = {**config, "step": int(state["step"]), "format_version": FORMAT_VERSION}
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)  # fail before touching disk
    tmp, final, old = run_dir / f"{TMP_PREFIX}{os.getpid()}", run_dir / CHECKPOINT_DIR, run_dir / OLD_DIR
    doing = f"creating {run_dir}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by an earlier crash of a process with our pid
        doing = f"creating {tmp}"
        tmp.mkdir()
        # bytes written with open(): safetensors' save_file creates its files 0600 whatever the umask.
        doing = f"writing {tmp / MODEL}"
        (tmp / MODEL).write_bytes(save_safetensors(_weights(net), metadata={"format": "pt"}))
        doing = f"writing {tmp / EMA}"
        (tmp / EMA).write_bytes(save_safetensors(_weights(ema_net), metadata={"format": "pt"}))
        doing = f"writing {tmp / CONFIG}"
        (tmp / CONFIG).write_text(text + "\n", encoding="utf-8")
        doing = f"writing {tmp / STATE}"
        with open(tmp / STATE, "wb") as fh:
            out = _StateFile(fh)
            try:
                torch.save(state, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None
        doing = f"flushing {tmp} to disk"
        for name in FILES:
            _fsync(tmp / name)
        _fsync(tmp)
        if final.is_dir():
            shutil.rmtree(old, ignore_errors=True)  # stale: a complete `checkpoint` exists
            doing = f"renaming {final} to {old}"
            os.replace(final, old)
        doing = f"renaming {tmp} to {final}"
        os.replace(tmp, final)
        doing = f"flushing {run_dir} to disk"
        _fsync(run_dir)
    except BaseException as e:  # also KeyboardInterrupt: never leave a half-written temp dir behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        left = f"; the temporary folder {tmp} could not be removed, delete it" if tmp.exists() else ""
        error = CheckpointWriteError(
            f"cannot write the checkpoint of step {meta['step']}: {doing} failed: {e.strerror or e}; "
            f"{_previous(run_dir)}{left}"
        )
        error.errno = e.errno  # the message stays as written above (OSError's str uses strerror when both are set)
        raise error from e
    shutil.rmtree(old, ignore_errors=True)
    return final


# -- reading ---------------------------------------------------------------------------------------


def _locate(path: Path) -> Path:
    """The checkpoint directory for ``path`` (a run dir or a checkpoint dir), with all its files."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; expected a run or checkpoint directory")
    if not any((path / name).exists() for name in FILES):
        found = find_checkpoint(path)
        if found is None:
            raise CheckpointError(
                f"{path}: not a checkpoint: it holds none of {', '.join(FILES)} and no "
                f"{CHECKPOINT_DIR}/ (or {OLD_DIR}/) subdirectory"
            )
        path = found
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return path


def _read_config(file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable JSON, the file may be truncated or corrupt ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format_version {version!r} is not supported "
            f"(this torchdiffusion reads version {FORMAT_VERSION})"
        )
    if config.get("kind") == "autoencoder":
        raise CheckpointError(
            f"{file}: this is an autoencoder (train-autoencoder), not a diffusion model; train a latent model on it: "
            "train --autoencoder RUN"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{file}: config lacks required keys {missing}")
    if config["target"] not in PREDICTIONS:
        raise CheckpointError(f"{file}: unknown target {config['target']!r}; expected one of {list(PREDICTIONS)}")
    return config


def _load_weights(net: nn.Module, file: Path) -> None:
    """Load ``file`` into ``net``, first checking that keys and shapes match exactly."""
    try:
        weights = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types (and OSError) on bad files
        raise CheckpointError(f"{file}: unreadable safetensors file, it may be truncated or corrupt ({e})") from None
    expected = net.state_dict()
    problem = f"{file}: weights do not match the network described in config.json"
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"{problem}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{problem}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all)")
    for key, value in expected.items():
        if weights[key].shape != value.shape:
            raise CheckpointError(
                f"{problem}: key {key!r} has shape {tuple(weights[key].shape)}, "
                f"the network expects {tuple(value.shape)}"
            )
    net.load_state_dict(weights)


def _read_state(file: Path) -> dict[str, Any]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, unpickling refused, ...
        # weights_only refuses a pickle that names any global outside plain data, before calling anything. Say
        # so in our words: torch's message suggests retrying with weights_only=False, which would run it.
        found = re.search(r"GLOBAL (\S+?)\.?(\s|$)", str(e))
        if found:
            raise CheckpointError(
                f"{file}: refused: the training state names the Python object {found.group(1)}; state.pt holds "
                "only tensors, numbers, strings, lists and dicts, and loading it never runs code"
            ) from None
        raise CheckpointError(f"{file}: unreadable training state, it may be truncated or corrupt ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict, got {type(state).__name__}")
    return state


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint from a run directory or from the checkpoint directory itself.

    The networks are rebuilt with ``names.build_net(config["net"])`` and moved to ``device``; the
    process with ``names.build_process(config["process"])``. Raises ``CheckpointError`` naming the
    path and the problem when anything is missing, corrupt or inconsistent.
    """
    ckpt = _locate(Path(path))
    config = _read_config(ckpt / CONFIG)
    try:
        process = build_process(config["process"])
        # fork_rng: the random initialisation (overwritten below) must not disturb the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            net, ema_net = build_net(config["net"]), build_net(config["net"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{ckpt / CONFIG}: cannot rebuild the process or network: {e}") from None
    _load_weights(net, ckpt / MODEL)
    _load_weights(ema_net, ckpt / EMA)
    state = _read_state(ckpt / STATE)
    return Checkpoint(ckpt, config, net.to(device), ema_net.to(device), process, state)


def load_denoiser(path: str | os.PathLike, ema: bool = True, *, device: str | torch.device = "cpu", clip: bool = True):
    """``(denoiser, process, config)`` from a checkpoint, ready for any sampler (eval mode, weights frozen).

    The denoiser is ``as_denoiser(Preconditioned(net, process, sigma_data), process, target)``:
    the same wrapping as in training (``objective.model_of``; a consistency run's model is its
    ``ConsistencyModel``, which returns a sample rather than a posterior mean). ``ema=True`` uses the EMA
    weights (Ho et al. 2020, Sec. 4; Song & Ermon 2020, Sec. 3.5), which sample better than the raw ones.
    """
    ckpt = load_checkpoint(path, device=device)
    # A loaded model is for inference: with frozen weights, sampling it records no autograd graph however it
    # is called (without torch.no_grad, 2,000 samples x 50 DDPM steps of a moons MLP held 2.7 GB in it).
    # Gradients with respect to the input still flow, as likelihood.py's divergence needs.
    ckpt.net.requires_grad_(False)
    ckpt.ema_net.requires_grad_(False)
    if not isinstance(ckpt.config.get("sigma_data"), (int, float)):
        raise CheckpointError(f"{ckpt.path / CONFIG}: config lacks a numeric 'sigma_data'")
    denoiser = model_of(ckpt.ema_net if ema else ckpt.net, ckpt.process, ckpt.config).eval()
    box = ckpt.config.get("data_box")  # absent in checkpoints written before it was recorded
    if clip and box is not None:
        try:
            denoiser = clip_denoiser(denoiser, *box).to(device).eval()  # eval: the wrapper too
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path / CONFIG}: bad 'data_box' (expected [low, high]): {e}") from None
    return denoiser, ckpt.process, ckpt.config
