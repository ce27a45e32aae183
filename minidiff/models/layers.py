"""Building blocks of the minidiff U-Net: time embedding, residual block, resampling (attention: ``attention.py``).

The blocks follow the DDPM U-Net (Ho et al. 2020, Appendix B), itself a PixelCNN++ / Wide-ResNet
design, with the two later additions used everywhere today: scale-shift ("AdaGN") time conditioning
(Dhariwal & Nichol 2021, Sec. 3) and cross-attention to a context sequence (Rombach et al. 2022, Eq. 3).

Notation:

| symbol   | code name   | meaning                                              |
|----------|-------------|------------------------------------------------------|
| B        | ``B``       | batch size                                           |
| C        | ``C``       | channels of the feature map                          |
| H, W     | ``H, W``    | spatial size of the feature map                      |
| emb      | ``emb``     | SiLU of the time (+ class) embedding, (B, emb_dim)   |
| L, D     | ``L, D``    | context length and context feature size              |
| h, d     | ``heads, d``| attention heads and channels per head                |

All blocks are plain ``nn.Module`` s with keyword-only configuration and no device assumptions,
so they run on CPU, CUDA and MPS alike.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["timestep_embedding", "ResBlock", "Downsample", "Upsample"]


def timestep_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous timesteps t (B,) -> (B, dim); Vaswani et al. 2017, Sec. 3.5 (as in DDPM)."""
    if dim % 2 != 0:
        raise ValueError(f"timestep_embedding: dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """Residual block GN-SiLU-conv, + time projection, GN-SiLU-dropout-conv; Ho et al. 2020, App. B.

    With ``scale_shift=True`` the time embedding modulates the second norm as
    ``GN(h) * (1 + scale) + shift`` (Dhariwal & Nichol 2021, Sec. 3, "AdaGN"). With ``emb_dim=None`` the
    block has no time input at all: the autoencoder's block (Rombach et al. 2022, App. G), ``forward(x)``.
    """

    def __init__(self, in_ch: int, out_ch: int, *, emb_dim: int | None, num_groups: int,
                 dropout: float = 0.0, scale_shift: bool = False):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = None if emb_dim is None else nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.dropout = dropout
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.scale_shift = scale_shift

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_ch, H, W), emb = SiLU(time embedding) (B, emb_dim) or None -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is None:
            h = self.norm2(h)
        elif emb is None:
            raise ValueError("emb is required: this ResBlock was built with a time embedding (emb_dim is set)")
        elif self.scale_shift:
            e = self.emb_proj(emb)[:, :, None, None]  # (B, 2*out_ch, 1, 1)
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + self.emb_proj(emb)[:, :, None, None])
        h = F.silu(h)
        if self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=self.training)
        return self.skip(x) + self.conv2(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (Ho et al. 2020, App. B)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W with nearest-neighbour upsampling then a 3x3 convolution (Ho et al. 2020, App. B)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
