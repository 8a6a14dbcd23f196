"""fp16 training's loss scaling (``training.step.ScaledStep`` with a ``GradScaler``), run on the CPU.

fp16 training is meant for CUDA (``train`` refuses it on a CPU: there fp16 autocast made a digits U-Net training
step ~70x slower than fp32), so no test had ever run its loss scaling. ``ScaledStep`` makes its ``GradScaler`` for
the device it trains on, and torch's CPU autocast and GradScaler implement fp16, so the scaling logic runs here on a
small MLP (the CUDA kernels themselves still need a GPU):

- after ``backward`` the gradients are unscaled: they equal the fp32 step's up to fp16 rounding. Autocast rounds the
  inputs of every matrix product to fp16 (unit roundoff u = 2^-11; LayerNorm and the loss stay fp32). The MLP's
  deepest path has 6 Linear layers (input, two residual blocks of two, output), so a gradient passes through at
  most 6 forward and 12 backward products (input and weight gradients), each adding at most 2 u of relative error
  (two rounded operands): about 36 u if every one added up in the same direction. 64 u bounds the gradient norm's
  relative error with room for the fp32 sums; the scale 2^16 is a power of two, so scaling and unscaling are exact.
- a step whose scaled gradients overflow is skipped (the weights stay as they were) and the scale is halved
  (``backoff_factor`` 0.5); a finite step moves the weights and keeps the scale (it grows only after 2000 steps).
"""

import copy

import pytest
import torch

from torchdiffusion import VP
from torchdiffusion.names import build_net
from torchdiffusion.training.config import TrainConfig
from torchdiffusion.training.distributed import DistInfo
from torchdiffusion.training.objective import TrainingObjective
from torchdiffusion.training.step import Batch, ScaledStep

pytestmark = pytest.mark.usefixtures("single_thread")

U16 = 2.0**-11  # float16's unit roundoff (11 significant bits)
B = 64


def _setup(dtype):
    torch.manual_seed(0)
    cfg = TrainConfig(data="moons", net={"name": "mlp", "dim": 2, "width": 32, "depth": 2}, sigma_data=0.5)
    net = build_net(cfg.net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    objective = TrainingObjective(cfg, VP(), None, net, B)
    return net, opt, ScaledStep(net, opt, objective, dtype=dtype, info=DistInfo(), device=torch.device("cpu"))


def _batch():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return Batch([torch.arange(B)], [t], [torch.randn(B, 2, generator=g)], [None], [None], [None])


def _data():
    return torch.randn(B, 2, generator=torch.Generator().manual_seed(2)) * 0.5


def _grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def test_unscaled_gradients_equal_fp32s_to_fp16_rounding():
    net32, _, step32 = _setup(None)
    net16, _, step16 = _setup(torch.float16)
    assert step32.scaler is None and step16.scaler is not None and step16.scaler.get_scale() == 2.0**16
    loss32 = step32.backward(_data(), None, _batch())
    loss16 = step16.backward(_data(), None, _batch())
    g32, g16 = _grads(net32), _grads(net16)
    assert abs(loss16 - loss32) <= 64 * U16 * abs(loss32)
    assert float((g16 - g32).norm()) <= 64 * U16 * float(g32.norm())  # not 2^16 times larger: unscaled


def test_an_overflowing_step_is_skipped_and_the_scale_halved():
    net, opt, step = _setup(torch.float16)
    before = copy.deepcopy(net.state_dict())
    step.backward(_data(), None, _batch())  # a finite step: the weights move, the scale stays
    assert torch.isfinite(_grads(net)).all()
    step.step()
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert step.scaler.get_scale() == 2.0**16
    before = copy.deepcopy(net.state_dict())
    opt.zero_grad(set_to_none=True)
    step.scaler.update(new_scale=2.0**120)  # scaled gradients beyond float16's and float32's range
    step.backward(_data(), None, _batch())
    step.step()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert step.scaler.get_scale() == 2.0**119


def test_train_refuses_fp16_on_the_cpu_with_the_reason(tmp_path):
    from torchdiffusion.training.loop import train

    cfg = TrainConfig(data="moons", net={"name": "mlp", "width": 8, "depth": 1}, steps=1, precision="fp16")
    with pytest.raises(ValueError, match=r"precision=.fp16. .*is for CUDA.*slower than fp32 on the CPU.*use bf16"):
        train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
