"""A noise-conditional image classifier: the U-Net's downsampling half and a pooled linear head.

Dhariwal & Nichol 2021 (Sec. 4.1, App. C) guide with "the downsampling trunk of the UNet model with an attention
pool at the 8x8 layer", trained on noised images of the diffusion process; this is that trunk (the blocks of
:mod:`.unet`, with its time embedding and middle block) with ADM's simpler "adaptive" head, GroupNorm, SiLU,
global average pooling and a linear map to K logits, which starts at zero so an untrained classifier is uniform.
``guidance.NoiseConditionalClassifier`` feeds it (c_in x_t, c_noise); ``torchdiffusion train-classifier`` trains it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import SinusoidalEmbedding, check_embedding
from .unet import Attention, ResBlock, _norm, _Resample, _Seq, _zero, check_levels

__all__ = ["UNetClassifier"]


class UNetClassifier(nn.Module):
    """(x (B, C, H, W), c_noise (B,)) -> logits (B, out_dim): the U-Net encoder, pooled.

    Args (as :class:`.unet.UNet`'s, for the down path and middle):
        in_channels: C.                          out_dim: K, the number of classes.
        image_size: training resolution; ``attention_resolutions`` are read at it.
        channels: base width; level i has channels * channel_mult[i].
        num_res_blocks: per level.               attention_resolutions: sizes with self-attention.
        num_heads / head_channels, dropout, time_embedding, emb_dim, scale_shift: as the U-Net's.
        groups: GroupNorm groups. Fewer than the U-Net's 32: the head pools after a GroupNorm, and with one
            channel per group that norm would remove every channel's mean (an image's colour, say) before the
            pool (ADM's classifiers have 128+ channels, 4+ per group).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_dim: int = 10,
        image_size: int = 16,
        channels: int = 32,
        channel_mult=(1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions=(),
        num_heads: int = 4,
        head_channels: int | None = None,
        dropout: float = 0.0,
        time_embedding: type[nn.Module] = SinusoidalEmbedding,
        emb_dim: int | None = None,
        scale_shift: bool = True,
        groups: int = 8,
    ):
        super().__init__()
        check_embedding(time_embedding)
        emb_dim = emb_dim or 4 * channels
        channel_mult, attention_resolutions = list(channel_mult), list(attention_resolutions)
        if out_dim < 1:
            raise ValueError(f"out_dim (the number of classes) must be >= 1, got {out_dim}")
        self.multiple = check_levels(image_size, channel_mult, attention_resolutions)
        sizes = [image_size // 2**i for i in range(len(channel_mult))]
        self.config = dict(
            in_channels=in_channels,
            out_dim=out_dim,
            image_size=image_size,
            channels=channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            num_heads=num_heads,
            head_channels=head_channels,
            dropout=dropout,
            time_embedding=getattr(time_embedding, "name", time_embedding.__name__),  # JSON: the name
            emb_dim=emb_dim,
            scale_shift=scale_shift,
            groups=groups,
        )

        def res(cin, cout):
            return ResBlock(cin, cout, emb_dim, dropout, groups, scale_shift)

        def attn(c):
            if head_channels and c % head_channels:
                raise ValueError(f"{c} channels do not split into heads of head_channels={head_channels}")
            return Attention(c, c // head_channels if head_channels else num_heads, groups)

        self.time = nn.Sequential(
            time_embedding(channels), nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        c, self.down = channels, _Seq()  # the U-Net's down path, without its skips
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(res(c, channels * mult))
                c = channels * mult
                if sizes[level] in attention_resolutions:
                    self.down.append(attn(c))
            if level < len(channel_mult) - 1:
                self.down.append(_Resample(c, up=False))
        self.mid = _Seq([res(c, c), attn(c), res(c, c)])
        self.norm = _norm(c, groups)
        self.head = _zero(nn.Linear(c, out_dim))
        self.channels_last = c // self.norm.num_groups >= 2  # as the U-Net (its module docstring says why)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[-2] % self.multiple or x.shape[-1] % self.multiple:
            raise ValueError(
                f"UNetClassifier takes (B, C, H, W) with H and W multiples of {self.multiple} "
                f"(2^(len(channel_mult) - 1)), got shape {tuple(x.shape)}"
            )
        emb = F.silu(self.time(c_noise))  # (B, emb_dim), the SiLU every block's projection starts with
        h = self.inp(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        h = self.mid(self.down(h, emb), emb)  # (B, c, H / 2^(L-1), W / 2^(L-1))
        return self.head(F.silu(self.norm(h)).mean(dim=(2, 3)))  # global average pool -> (B, K)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
