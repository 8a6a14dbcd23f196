"""Tests of the image U-Net (nets/unet.py; Ho et al. 2020, App. B; Dhariwal & Nichol 2021).

Closed forms: the zero-initialised output (an untrained eps-network predicts 0), the parameter count
of Ho et al.'s CIFAR-10 model (35.7M; 35,746,307 exactly, as diffusers' conversion of their checkpoint),
the attention output against softmax(q k^T / sqrt(d)) v written out, and its equivariance under a
permutation of the spatial positions, the dropout mask's law, and (where diffusers is installed) the same
function as diffusers' UNet2DModel given its weights. Small networks, CPU, a second or so each.
"""

import copy
import json

import pytest
import torch
from torch import nn

from conftest import Z, gen
from torchdiffusion import VP, Preconditioned
from torchdiffusion.names import build_net
from torchdiffusion.nets import FourierEmbedding
from torchdiffusion.nets.unet import Attention, UNet, _dropout

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
TINY = dict(image_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,))
HO_CIFAR10 = dict(  # Ho et al. 2020, App. B and their diffusion_tf/models/unet.py
    in_channels=3,
    image_size=32,
    channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    num_heads=1,
    dropout=0.1,
    scale_shift=False,
)
CONFIGS = {
    "digits-8x8": dict(in_channels=1, **TINY),
    "rgb-8x8-classes": dict(in_channels=3, num_classes=10, **TINY),
    "digits-16x16-updown-ddpm": dict(
        in_channels=1,
        image_size=16,
        channels=16,
        channel_mult=(1, 2, 2),
        attention_resolutions=(8, 4),
        num_heads=2,
        resblock_updown=True,
        scale_shift=False,
        num_res_blocks=1,
    ),
    "rgb-32x32-fourier": dict(
        in_channels=3,
        out_channels=6,
        image_size=32,
        channels=16,
        channel_mult=(1, 2, 2, 2),
        attention_resolutions=(16,),
        head_channels=8,
        time_embedding=FourierEmbedding,
        groups=8,
    ),
}


def _net(seed: int = 0, **kw) -> UNet:
    torch.manual_seed(seed)
    return UNet(**{"in_channels": 1, **TINY, **kw})


def _perturb_zeros(net: UNet, seed: int = 1, std: float = 0.1) -> None:
    """Give every all-zero parameter (the zero-initialised layers and the biases) random values."""
    g = gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _inputs(B: int, C: int, H: int, W: int | None = None, seed: int = 2, dtype=torch.float32):
    g = gen(seed)
    x = torch.randn(B, C, H, W or H, generator=g, dtype=dtype)
    return x, torch.rand(B, generator=g, dtype=dtype) * 4 - 2


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shape_and_zero_at_init(name):
    kw = CONFIGS[name]
    net = UNet(**kw)
    x, c = _inputs(3, kw["in_channels"], kw["image_size"])
    out = net(x, c)
    assert out.shape == (3, kw.get("out_channels", kw["in_channels"]), *x.shape[2:])
    assert out.is_contiguous()
    assert torch.count_nonzero(out) == 0  # zero-initialised last layer: an eps-network starts at the prior mean 0
    _perturb_zeros(net)
    assert net(x, c).abs().max() > 0


def test_defaults_build_an_8x8_net():
    net = UNet()
    assert net.config["attention_resolutions"] == [4] and net.config["channel_mult"] == [1, 2, 2, 2]
    x, c = _inputs(2, 1, 8)
    assert net(x, c).shape == (2, 1, 8, 8)


def test_other_input_sizes_run():
    """A fully convolutional net: any H, W divisible by 2^(levels - 1), not only image_size."""
    net = _net()
    _perturb_zeros(net)
    x, c = _inputs(2, 1, 4, 10)
    assert net(x, c).shape == (2, 1, 4, 10)


@pytest.mark.parametrize("shape", [(2, 1, 7, 8), (2, 1, 8, 6), (2, 8, 8), (2, 1, 1, 8, 8)])
def test_bad_input_shape_raises(shape):
    net = UNet(1, image_size=16, channels=8, channel_mult=(1, 2, 2), attention_resolutions=(), num_res_blocks=1)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(shape), torch.zeros(shape[0]))


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="level sizes"):
        _net(attention_resolutions=(16,))  # 8x8 images have levels of 8 and 4
    with pytest.raises(ValueError, match="multiple of 4"):
        _net(image_size=6, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="attention heads"):
        _net(num_heads=3)
    with pytest.raises(ValueError, match="head_channels=24"):
        _net(head_channels=24)
    with pytest.raises(TypeError, match="time_embedding"):  # a module class; names are for the edge (names.py)
        _net(time_embedding="learned")


def test_class_conditioning():
    net = _net(num_classes=3, dropout=0.0)
    x, c = _inputs(4, 1, 8)
    x, c = x[:1].expand(4, -1, -1, -1), c[:1].expand(4)  # one input, four labels
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.count_nonzero(net(x, c, labels)) == 0
    _perturb_zeros(net)
    out = net(x, c, labels)
    for i in range(3):
        assert not torch.allclose(out[i], out[i + 1])  # every label changes the output
    torch.testing.assert_close(net(x, c), out[3:].expand(4, -1, -1, -1))  # no labels = label num_classes


def test_gradient_reaches_every_parameter():
    net = _net(num_classes=2, dropout=0.0)
    _perturb_zeros(net)
    x, c = _inputs(3, 1, 8)
    net(x, c, torch.tensor([0, 1, 2])).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_ho_cifar10_parameter_count():
    net = UNet(**HO_CIFAR10)
    assert abs(net.num_parameters() - 35.7e6) <= 0.1e6  # Ho et al. 2020, App. B: "35.7 million parameters"
    assert net.num_parameters() == 35_746_307  # google/ddpm-cifar10-32 in diffusers has the same count
    assert net.summary().splitlines()[-1].split() == ["total", "35,746,307"]


def test_ho_cifar10_count_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UNet2DModel(  # the config of google/ddpm-cifar10-32
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    assert sum(p.numel() for p in theirs.parameters()) == UNet(**HO_CIFAR10).num_parameters()


def _layers_in_call_order(net, *args) -> list:
    order = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: order.append(m))
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm))
    ]
    with torch.no_grad():
        net(*args)
    for h in hooks:
        h.remove()
    return order


def test_same_function_as_diffusers_ddpm_unet():
    """With diffusers' weights, our DDPM-style net computes what UNet2DModel does (their port of Ho et al.).

    c_noise = t / 100 gives our sinusoidal embedding (scale 100) the arguments t * freqs of theirs. Their
    attention has separate q, k, v projections, which stack into our qkv.
    """
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ours = UNet(
        3,
        image_size=16,
        channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_heads=1,
        scale_shift=False,
        dropout=0.0,
    ).double()
    theirs = diffusers.UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
    )
    theirs = theirs.double().eval()
    x, t = torch.randn(2, 3, 16, 16, generator=gen(6), dtype=F64), torch.tensor([3.0, 700.0], dtype=F64)
    mine, src = _layers_in_call_order(ours, x, t / 100), iter(_layers_in_call_order(theirs, x, t))
    qkv = {id(m.qkv) for m in ours.modules() if isinstance(m, Attention)}
    with torch.no_grad():
        for m in mine:
            group = [next(src) for _ in range(3 if id(m) in qkv else 1)]
            for name in ("weight", "bias"):
                getattr(m, name).copy_(torch.cat([getattr(s, name) for s in group]))
    assert next(src, None) is None
    expected = theirs(x, t).sample
    torch.testing.assert_close(ours(x, t / 100), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_config_is_json_and_rebuilds():
    net = _net(num_classes=10, head_channels=16)
    config = json.loads(json.dumps(net.config))
    twin = build_net({"name": "unet", **config})  # JSON becomes objects at the edge
    twin.load_state_dict(net.state_dict())
    assert twin.config == net.config and twin.num_parameters() == net.num_parameters()


def test_dropout_only_in_training():
    net = _net(dropout=0.5)
    _perturb_zeros(net)
    x, c = _inputs(2, 1, 8)
    assert not torch.equal(net(x, c), net(x, c))  # training: two dropout masks
    net.eval()
    torch.testing.assert_close(net(x, c), net(x, c), rtol=0, atol=0)


def test_preconditioned_on_double():
    net = _net(dropout=0.0).double()
    _perturb_zeros(net)
    model = Preconditioned(net, VP())
    x, _ = _inputs(2, 1, 8, dtype=F64)
    out = model(x, torch.tensor([0.3, 0.7], dtype=F64))
    assert out.dtype == F64 and out.shape == x.shape


def _attention(seed: int = 0, C: int = 16, heads: int = 4) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(C, heads, groups=4).double()
    with torch.no_grad():
        attn.proj.weight.normal_(0, 0.3)  # proj starts at zero (the block starts as the identity)
        attn.proj.bias.normal_(0, 0.3)
    return attn


def test_attention_is_softmax_attention():
    """x + proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h) (Vaswani et al. 2017, Eqs. 1 and the MHA formula)."""
    attn, (B, C, H, W) = _attention(), (2, 16, 3, 5)
    x = torch.randn(B, C, H, W, generator=gen(3), dtype=F64)
    tokens = attn.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = attn.qkv(tokens).chunk(3, dim=-1)
    d = C // attn.heads
    heads = []
    for i in range(attn.heads):
        qi, ki, vi = (z[..., i * d : (i + 1) * d] for z in (q, k, v))
        heads.append(torch.softmax(qi @ ki.transpose(1, 2) / d**0.5, dim=-1) @ vi)
    expected = x + attn.proj(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(B, C, H, W)
    torch.testing.assert_close(attn(x), expected)


def test_attention_is_permutation_equivariant():
    """Permuting the H*W positions permutes the output (GroupNorm and attention ignore the order)."""
    attn, (B, C, H, W) = _attention(), (2, 16, 4, 4)
    x = torch.randn(B, C, H, W, generator=gen(4), dtype=F64)
    perm = torch.randperm(H * W, generator=gen(5))

    def permute(z):
        return z.flatten(2)[:, :, perm].reshape(B, C, H, W)

    torch.testing.assert_close(attn(permute(x)), permute(attn(x)))
    assert not torch.allclose(attn(x), x)


@pytest.mark.parametrize("groups", [32, 8])
def test_memory_formats_agree(groups):
    """Channels-last is chosen with >= 2 channels per group; either layout, and any input layout, give one answer."""
    net = _net(dropout=0.0, groups=groups).double()
    _perturb_zeros(net)
    expected = torch.channels_last if groups == 8 else torch.contiguous_format
    assert net.memory_format == expected
    other = copy.deepcopy(net).to(memory_format=torch.channels_last if groups == 32 else torch.contiguous_format)
    assert other.memory_format != expected
    x, c = _inputs(2, 1, 8, dtype=F64)
    out = net(x, c)
    torch.testing.assert_close(other(x, c), out)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last), c), out)
    torch.testing.assert_close(net(x.transpose(2, 3), c), net(x.transpose(2, 3).contiguous(), c))


def test_dropout_mask_is_bernoulli():
    """Kept with probability 1 - p and scaled by 1 / (1 - p): the law of ``F.dropout``, so E[out] = h."""
    p, n = 0.3, 200_000
    torch.manual_seed(0)
    out = _dropout(torch.ones(n), p, training=True)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    assert abs(1 - kept.double().mean() - p) < Z * (p * (1 - p) / n) ** 0.5
    assert _dropout(torch.ones(3), p, training=False).equal(torch.ones(3))


def test_autocast_bfloat16():
    """Under CPU autocast the output is bfloat16 (the last layer is a convolution), finite and close."""
    net = UNet(**CONFIGS["rgb-8x8-classes"]).eval()
    _perturb_zeros(net)
    x, c = _inputs(4, 3, 8)
    ref = net(x, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, c, torch.tensor([0, 1, 2, 10]))
        out_uncond = net(x, c)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out_uncond.float() - ref).norm() / ref.norm()
    assert err < 0.05, err
