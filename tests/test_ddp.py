"""Data-parallel training (distributed.py): 2 CPU processes (gloo) compute what one process computes.

Each step every rank draws the same global batch (indices, times, noise) and takes its contiguous half;
DDP averages the two half-batch gradients, which is the gradient of the mean loss over the whole batch.
So 2 ranks x batch B must end with the weights of 1 process x batch 2B. They agree up to the order of
float32 sums: a rank sums B per-example terms and the two halves are added, where one process sums 2B
at once, and a matrix product over B rows may block its sums differently from one over 2B; five Adam
steps carry these ~1e-7 relative differences into the weights, far below the 1e-5 tolerance.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from torchdiffusion.names import NETS
from torchdiffusion.nets.unet import UNet
from torchdiffusion.training import loop as train_mod
from torchdiffusion.training.checkpoint import load_checkpoint
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.loop import train

NETS.setdefault("unet", UNet)  # until nets/__init__ registers it (the spawned workers import this module too)
ROOT = Path(__file__).resolve().parents[1]
NET = {"name": "mlp", "width": 32, "depth": 2, "emb_dim": 16}
UNET = {"name": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4]}
B = 16  # per-rank batch
# A 2-D MLP, and a U-Net on the 8x8 digits with flips, class labels and 2 micro-batches per rank.
KINDS = {
    "mlp-2d": dict(n_data=256, net=NET),
    "unet-digits": dict(data="digits", net={**UNET, "dropout": 0.0, "groups": 8}, flip=True, class_conditional=True),
}


def tiny(kind: str = "mlp-2d", **kw) -> TrainConfig:
    base = dict(steps=5, batch_size=B, warmup=2, lr=2e-3, log_every=1, checkpoint_every=3, **KINDS[kind])
    base["precision"] = "fp32"  # the exactness checks are float32's; "auto" would pick bf16 where the CPU has it
    return TrainConfig(**{**base, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stop(Exception):
    pass


def _worker(rank: int, world: int, port: int, config: dict, run_dir: str, out_dir: str, stop_at=None, resume=False):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ.update(env, WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    saves, real = [], train_mod.save_checkpoint

    def counting_save(*args, **kwargs):
        saves.append(kwargs["state"]["step"])
        return real(*args, **kwargs)

    def stop(step, info):  # every rank stops at the same step, as a callback must
        if step == stop_at:
            raise Stop

    train_mod.save_checkpoint = counting_save
    try:
        result = train(TrainConfig.from_dict(config), run_dir, progress=False, resume=resume, callback=stop)
    except Stop:
        return
    weights = {k: v.clone() for k, v in result.net.state_dict().items()}
    torch.save({"weights": weights, "saves": saves, "rows": len(result.history)}, Path(out_dir) / f"rank{rank}.pt")


def spawn(config: TrainConfig, run_dir, out_dir, **kw) -> list[dict]:
    Path(out_dir).mkdir(exist_ok=True)
    rest = (config.to_dict(), str(run_dir), str(out_dir), kw.get("stop_at"), kw.get("resume", False))
    for attempt in range(3):  # the free port can be taken by another test worker before rank 0 binds it
        args = (2, free_port(), *rest)
        try:
            mp.spawn(_worker, args=args, nprocs=2, join=True)
            break
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise
    return [torch.load(p) for p in sorted(Path(out_dir).glob("rank*.pt"))]


def weights_of(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir).net.state_dict()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path, kind):
    accum = 2 if kind == "unet-digits" else 1
    single = train(tiny(kind, batch_size=2 * B), tmp_path / "single", progress=False)
    ranks = spawn(tiny(kind, batch_size=B // accum, grad_accum=accum), tmp_path / "ddp", tmp_path / "ranks")
    reference = single.net.state_dict()
    diff = max_diff(ranks[0]["weights"], reference)
    print(f"{kind}: max |w_ddp - w_single| = {diff:.3g}")
    assert diff < 1e-5
    assert max_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0.0  # DDP keeps the ranks identical
    assert max_diff(weights_of(tmp_path / "ddp"), ranks[0]["weights"]) == 0.0
    # Only rank 0 writes: its checkpoints (steps 3 and 5) and log rows; rank 1 none.
    assert ranks[0]["saves"] == [3, 5] and ranks[1]["saves"] == []
    assert ranks[0]["rows"] == 5 and ranks[1]["rows"] == 0
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint", "log.csv"]
    lines = (tmp_path / "ddp" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["step", "1", "2", "3", "4", "5"]  # each step once
    losses = [float(line.split(",")[1]) for line in lines[1:]]
    assert losses == pytest.approx([h["loss"] for h in single.history], rel=1e-5)  # the global batch's mean


def test_resume_under_ddp_is_bit_exact(tmp_path):
    """With dropout each rank has its own torch RNG; checkpoints keep all of them, so a resume continues exactly."""
    cfg = tiny("unet-digits", net={**KINDS["unet-digits"]["net"], "dropout": 0.1}, steps=4, checkpoint_every=2)
    full = spawn(cfg, tmp_path / "full", tmp_path / "out-full")
    assert spawn(cfg, tmp_path / "cut", tmp_path / "out-cut", stop_at=3) == []  # stopped after step 3
    assert load_checkpoint(tmp_path / "cut").step == 2
    resumed = spawn(cfg, tmp_path / "cut", tmp_path / "out-resumed", resume=True)
    for a, b in zip(resumed, full, strict=True):
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert max_diff(full[0]["weights"], full[1]["weights"]) == 0.0


def test_torchrun_entry_point(tmp_path):
    """The documented command: torchrun --standalone --nproc_per_node 2 -m torchdiffusion train --config ..."""
    overrides = ["steps=4", "n_data=256", f"batch_size={B}", "net={name: mlp, width: 32, depth: 2, emb_dim: 16}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "torchdiffusion", "train", "--config", str(ROOT / "configs" / "moons.yaml")]
    cmd += ["--out", str(tmp_path / "ddp"), "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 4 steps") == 1  # rank 0 alone reports
    config = TrainConfig.from_yaml(ROOT / "configs" / "moons.yaml", **dict(o.split("=", 1) for o in overrides[:3]))
    config = TrainConfig.from_dict({**config.to_dict(), "net": NET, "batch_size": 2 * B})
    single = train(config, tmp_path / "single", progress=False)
    assert max_diff(weights_of(tmp_path / "ddp"), single.net.state_dict()) < 1e-5
