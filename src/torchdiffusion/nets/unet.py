"""A U-Net for images in the style of DDPM (Ho et al. 2020, Appendix B) and ADM (Dhariwal & Nichol 2021).

Layout (both papers; the skips of ADM's ``UNetModel``, which are those of Ho et al.'s TF code):

    conv_in -> [down level: num_res_blocks x (ResBlock [+ Attention]), Downsample except last]
            -> middle: ResBlock, Attention, ResBlock
            -> [up level: (num_res_blocks + 1) x (ResBlock on [h, skip] [+ Attention]), Upsample except first]
            -> GroupNorm, SiLU, conv_out (zero-initialised, so the net starts at 0)

Every down block pushes its output as a skip and every up block pops one. Ho et al.'s CIFAR-10 model is
``UNet(3, image_size=32, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
num_heads=1, dropout=0.1, scale_shift=False)``: 35,746,307 parameters (they report 35.7M; diffusers'
conversion of their checkpoint, google/ddpm-cifar10-32, has the same count).

CPU speed without changing the math (``benchmarks/bench_unet.py``): the dropout mask is drawn as uniform >= p
(``bernoulli_`` costs more than a convolution); the time embedding's SiLU is applied once, not in every block;
attention is ``scaled_dot_product_attention`` on a (B, H*W, C) view; and with at least two channels per
GroupNorm group the weights, hence the activations, are channels-last, where oneDNN's convolutions are faster
and attention's (B, C, H, W) -> (B, H*W, C) is free (PyTorch's channels-last GroupNorm is several times slower
with one channel per group, which outweighs that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import SinusoidalEmbedding, check_embedding

__all__ = ["UNet", "ResBlock", "Attention"]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups <= ``groups`` that divides ``channels``."""
    g = next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(g, channels)


def _dropout(h: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(h, p, training)``, with the Bernoulli(1 - p) mask drawn as uniform >= p: the same
    distribution, and twice as fast on the CPU as ``bernoulli_`` (which costs more than a convolution here)."""
    if not training or p == 0:
        return h
    return h * (torch.rand_like(h, dtype=torch.float32) >= p) * (1 / (1 - p))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_levels(image_size: int, channel_mult, attention_resolutions) -> int:
    """The image size's required multiple 2^(levels - 1), after checking that every level halves the image exactly
    and that attention sits at level sizes."""
    multiple = 2 ** (len(channel_mult) - 1)
    sizes = [image_size // 2**i for i in range(len(channel_mult))]
    if image_size % multiple:
        raise ValueError(f"image_size {image_size} must be a multiple of {multiple} (2^(levels - 1))")
    if not set(attention_resolutions) <= set(sizes):
        raise ValueError(f"attention_resolutions {attention_resolutions} must be among the level sizes {sizes}")
    return multiple


class ResBlock(nn.Module):
    """h = skip(x) + conv2(drop(SiLU(norm2'(conv1(SiLU(norm1(x))), emb)))) (Ho et al. 2020 App. B; ADM).

    The time (and class) embedding enters after conv1: added (Ho et al.), or with ``scale_shift`` as
    norm2(h) * (1 + scale) + shift (ADM's adaptive group norm, Dhariwal & Nichol 2021, Sec. 3). conv2 starts
    at zero, so the block starts as its skip: identity, or a 1x1 convolution when the channels change.
    ``resample`` ("up" / "down") resizes inside the block, by nearest neighbours / 2x2 average (ADM's
    ``resblock_updown``, after BigGAN). ``emb`` is the embedding after its SiLU, shared by all blocks.
    """

    def __init__(
        self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int, scale_shift: bool, resample=None
    ):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2, self.dropout = _norm(cout, groups), dropout
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None  # Ho et al.'s "NIN" shortcut
        self.scale_shift, self.resample = scale_shift, resample

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # (B, cin, H, W), (B, E) -> (B, cout, H', W')
        h = F.silu(self.norm1(x))
        if self.resample == "up":
            h, x = F.interpolate(h, scale_factor=2.0, mode="nearest"), F.interpolate(x, scale_factor=2.0)
        elif self.resample == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.conv1(h)
        e = self.emb(emb)[:, :, None, None]  # (B, cout or 2 cout, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(_dropout(F.silu(h), self.dropout, self.training))
        return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-norm and residual (Vaswani et al. 2017, Sec. 3.2).

    x + proj(softmax(q k^T / sqrt(d)) v) with q, k, v = W_qkv GroupNorm(x), per head of d = C / heads
    channels; a 1x1 convolution of Ho et al. / ADM is the ``Linear`` used here. proj starts at zero (ADM).
    """

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.heads, self.norm = heads, _norm(channels, groups)
        self.qkv, self.proj = nn.Linear(channels, 3 * channels), _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:  # (B, C, H, W) -> same
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view when x is channels-last
        q, k, v = self.qkv(h).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # PyTorch's CPU flash-attention kernel in bfloat16 is 2-20x slower than in float32, backward most (on an
            # AMX Xeon, torch 2.13: 14 ms against 0.6 ms per call at 8x8 digits), so under autocast the softmax
            # attention runs in float32; its matmuls are a small share of the network's work.
            with torch.autocast("cpu", enabled=False):
                a = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        else:
            a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        a = self.proj(a.transpose(1, 2).reshape(B, H * W, C))  # (B, HW, C)
        return x + a.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W) in x's layout


class _Resample(nn.Module):
    """Downsample: 3x3 conv of stride 2. Upsample: nearest x2, then 3x3 conv (Ho et al. 2020, App. B)."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class _Seq(nn.ModuleList):
    """Layers applied in turn, each as layer(h, emb)."""

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            h = layer(h, emb)
        return h


class UNet(nn.Module):
    """U-Net eps/x0/v-network for images: (x (B, C, H, W), c_noise (B,), [class_labels (B,)]) -> (B, C_out, H, W).

    Args (defaults: ADM-style for 8x8 digits; Ho et al. 2020's CIFAR-10 model in the module docstring):
        in_channels: C.                          out_channels: C_out (default C).
        image_size: training resolution; ``attention_resolutions`` are read at it (levels have sizes
            image_size / 2^i). Other sizes divisible by 2^(len(channel_mult) - 1) also run.
        channels: base width; level i has channels * channel_mult[i].
        num_res_blocks: per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes (at ``image_size``) with self-attention after each ResBlock.
        num_heads: attention heads; or ``head_channels``, channels per head (ADM), which overrides it.
        dropout: in every ResBlock.               groups: GroupNorm groups (reduced to divide the channels).
        num_classes: enables a class embedding (label ``num_classes`` is "unconditional").
        time_embedding: "sinusoidal", "fourier" or "table" (of c_noise, dim = channels), then an MLP to ``emb_dim``
            (default 4 * channels); ``time_embedding_options``: its keyword arguments (a diffusers model's
            embedding settings, ``interop.diffusers``).
        resblock_updown: resample inside ResBlocks instead of with (strided / upsampling) convolutions (ADM).
        scale_shift: FiLM the second GroupNorm of each ResBlock (ADM) instead of adding the embedding (DDPM).
        cond_channels: > 0 makes a super-resolution U-Net: ``forward`` then takes ``low_res`` (B, cond_channels,
            h, w), upsampled bilinearly and concatenated to x, and ``aug_level`` (B,), the noise level of its
            augmentation (default 0), embedded and added to the time embedding (Ho et al. 2022, Sec. 4.2).
    The last convolution starts at zero, so an untrained network outputs 0. Under ``torch.autocast`` the
    output has the autocast dtype (the last layer is a convolution).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 8,
        channels: int = 64,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions=(4,),
        num_heads: int = 4,
        head_channels: int | None = None,
        dropout: float = 0.1,
        num_classes: int | None = None,
        time_embedding: type[nn.Module] = SinusoidalEmbedding,
        time_embedding_options: dict | None = None,
        emb_dim: int | None = None,
        resblock_updown: bool = False,
        scale_shift: bool = True,
        groups: int = 32,
        cond_channels: int = 0,
    ):
        super().__init__()
        check_embedding(time_embedding)
        out_channels = out_channels or in_channels
        emb_dim = emb_dim or 4 * channels
        channel_mult, attention_resolutions = list(channel_mult), list(attention_resolutions)
        self.multiple = check_levels(image_size, channel_mult, attention_resolutions)
        sizes = [image_size // 2**i for i in range(len(channel_mult))]
        self.config = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            image_size=image_size,
            channels=channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            num_heads=num_heads,
            head_channels=head_channels,
            dropout=dropout,
            num_classes=num_classes,
            time_embedding=getattr(time_embedding, "name", time_embedding.__name__),  # JSON: the name
            time_embedding_options=dict(time_embedding_options or {}),
            emb_dim=emb_dim,
            resblock_updown=resblock_updown,
            scale_shift=scale_shift,
            groups=groups,
            cond_channels=cond_channels,
        )

        def res(cin, cout, resample=None):
            return ResBlock(cin, cout, emb_dim, dropout, groups, scale_shift, resample)

        def attn(c):
            if head_channels and c % head_channels:
                raise ValueError(f"{c} channels do not split into heads of head_channels={head_channels}")
            return Attention(c, c // head_channels if head_channels else num_heads, groups)

        def resample(c, up):
            return res(c, c, "up" if up else "down") if resblock_updown else _Resample(c, up)

        self.time = nn.Sequential(
            time_embedding(channels, **(time_embedding_options or {})),
            nn.Linear(channels, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        if cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {cond_channels}")
        self.cond_channels = cond_channels
        # A super-resolution model (Saharia et al. 2022, SR3; Ho et al. 2022, CDM): the low-resolution image,
        # upsampled, enters as extra input channels, and its augmentation noise level as an embedding added to the
        # time's (Ho et al. 2022, Sec. 4.2: "we condition the model on the amount of augmentation").
        self.aug = nn.Sequential(SinusoidalEmbedding(channels), nn.Linear(channels, emb_dim)) if cond_channels else None
        self.inp = nn.Conv2d(in_channels + cond_channels, channels, 3, padding=1)
        # Down: each entry of down[level] is one block whose output is a skip.
        skips, c, self.down = [channels], channels, nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            blocks, cout, has_attn = nn.ModuleList(), channels * mult, sizes[level] in attention_resolutions
            for _ in range(num_res_blocks):
                blocks.append(_Seq([res(c, cout)] + ([attn(cout)] if has_attn else [])))
                c = cout
                skips.append(c)
            if level < len(channel_mult) - 1:
                blocks.append(_Seq([resample(c, up=False)]))
                skips.append(c)
            self.down.append(blocks)
        self.mid = _Seq([res(c, c), attn(c), res(c, c)])
        # Up: each block takes the concatenation of h and one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks, cout, has_attn = nn.ModuleList(), channels * mult, sizes[level] in attention_resolutions
            for i in range(num_res_blocks + 1):
                layers = [res(c + skips.pop(), cout)] + ([attn(cout)] if has_attn else [])
                c = cout
                if level > 0 and i == num_res_blocks:
                    layers.append(resample(c, up=True))
                blocks.append(_Seq(layers))
            self.up.append(blocks)
        self.out = nn.Sequential(_norm(c, groups), nn.SiLU(), _zero(nn.Conv2d(c, out_channels, 3, padding=1)))
        if c // self.out[0].num_groups >= 2:  # see the module docstring
            self.to(memory_format=torch.channels_last)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        low_res: Tensor | None = None,
        aug_level: Tensor | None = None,
    ) -> Tensor:
        if x.ndim != 4 or x.shape[-2] % self.multiple or x.shape[-1] % self.multiple:
            raise ValueError(
                f"UNet takes (B, C, H, W) with H and W multiples of {self.multiple} "
                f"(2^(len(channel_mult) - 1)), got shape {tuple(x.shape)}"
            )
        emb = self.time(c_noise)
        if self.label is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.label.num_embeddings - 1, device=x.device)
            emb = emb + self.label(class_labels)
        if self.aug is not None:
            x = self._with_low_res(x, low_res)
            level = torch.zeros(len(x), device=x.device) if aug_level is None else aug_level.reshape(-1)
            emb = emb + self.aug(level.expand(len(x)))
        elif low_res is not None:
            raise ValueError("low_res given, but this U-Net is not a super-resolution model (cond_channels = 0)")
        emb = F.silu(emb)  # the SiLU that starts every block's embedding projection (Ho et al.; ADM)
        h = self.inp(x.contiguous(memory_format=self.memory_format))
        hs = [h]
        for blocks in self.down:
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
        h = self.mid(h, emb)
        for blocks in self.up:
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h).contiguous()

    def _with_low_res(self, x: Tensor, low_res: Tensor | None) -> Tensor:
        """[x, low_res upsampled to x's size (bilinear)] along the channels (SR3's concatenation)."""
        if low_res is None:
            raise ValueError(f"this super-resolution U-Net needs low_res=(B, {self.cond_channels}, h, w) images")
        if low_res.ndim != 4 or low_res.shape[1] != self.cond_channels or len(low_res) not in (1, len(x)):
            raise ValueError(
                f"low_res must have shape (B, {self.cond_channels}, h, w) with B = {len(x)}, got {tuple(low_res.shape)}"
            )
        if low_res.shape[-2:] != x.shape[-2:]:
            low_res = F.interpolate(low_res.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x, low_res.to(x.dtype).expand(len(x), -1, -1, -1)], dim=1)

    @property
    def memory_format(self) -> torch.memory_format:
        """The activations' layout: that of the convolution weights (``net.to(memory_format=...)`` changes it)."""
        w = self.out[-1].weight  # (C_out, c, 3, 3): its layouts differ, unlike conv_in's for one channel
        return torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def summary(self) -> str:
        """Parameter count per stage, one line each."""
        rows = [("embedding", [self.time] + ([self.label] if self.label is not None else [])), ("conv_in", [self.inp])]
        n = len(self.down)
        rows += [(f"down {i} ({self.config['image_size'] >> i}px)", [b]) for i, b in enumerate(self.down)]
        rows += [("middle", [self.mid])]
        rows += [(f"up {n - 1 - i} ({self.config['image_size'] >> (n - 1 - i)}px)", [b]) for i, b in enumerate(self.up)]
        rows += [("out", [self.out])]
        lines = [f"{name:<16} {sum(p.numel() for m in ms for p in m.parameters()):>12,}" for name, ms in rows]
        return "\n".join(lines + [f"{'total':<16} {self.num_parameters():>12,}"])
