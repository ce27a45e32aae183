"""Building blocks of the minidiff U-Net: time embedding, residual block, attention, resampling.

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

__all__ = ["timestep_embedding", "ResBlock", "AttentionBlock", "Downsample", "Upsample"]


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
    ``GN(h) * (1 + scale) + shift`` (Dhariwal & Nichol 2021, Sec. 3, "AdaGN").
    """

    def __init__(self, in_ch: int, out_ch: int, *, emb_dim: int, num_groups: int,
                 dropout: float = 0.0, scale_shift: bool = False):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.dropout = dropout
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.scale_shift = scale_shift

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, in_ch, H, W), emb = SiLU(time embedding) (B, emb_dim) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(emb)[:, :, None, None]  # (B, out_ch or 2*out_ch, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = F.silu(h)
        if self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=self.training)
        return self.skip(x) + self.conv2(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, plus optional cross-attention to a context.

    Self-attention as in DDPM (Ho et al. 2020, App. B); cross-attention
    softmax(Q K^T / sqrt(d)) V with Q from the image and K, V from the context (Rombach et al. 2022, Eq. 3).
    Both are residual and use ``F.scaled_dot_product_attention``.
    """

    def __init__(self, channels: int, *, num_heads: int, num_groups: int, context_dim: int | None = None):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"num_heads must divide the channels of an attention level ({channels}), got {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.context_dim = context_dim
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(channels)
            self.q_cross = nn.Linear(channels, channels)
            self.kv_cross = nn.Linear(context_dim, 2 * channels)
            self.proj_cross = nn.Linear(channels, channels)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, d)."""
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, heads, N, d)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) -> (B, N, C)."""
        B, heads, N, d = x.shape
        return x.transpose(1, 2).reshape(B, N, heads * d)  # (B, N, C)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), context (B, L, D), context_mask (B, L) bool (True = attend) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        x_tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).chunk(3, dim=-1)  # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))  # (B, heads, HW, d)
        y = x_tokens + self.proj(self._merge(h))  # (B, HW, C)
        if self.context_dim is not None and context is not None:
            y = y + self._cross(y, context, context_mask)
        return y.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)

    def _cross(self, tokens: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """Cross-attention of image tokens (B, HW, C) to context (B, L, D); Rombach et al. 2022, Eq. 3."""
        q = self._heads(self.q_cross(self.norm_cross(tokens)))  # (B, heads, HW, d)
        k, v = self.kv_cross(context).chunk(2, dim=-1)  # 2 x (B, L, C)
        mask, keep_row = None, None
        if context_mask is not None:
            # A row with every token masked would give softmax over nothing (NaN): let it attend
            # to all tokens, then zero its output, so "all masked" equals "no context".
            keep_row = context_mask.any(dim=1)  # (B,)
            mask = (context_mask | ~keep_row[:, None])[:, None, None, :]  # (B, 1, 1, L)
        h = F.scaled_dot_product_attention(q, self._heads(k), self._heads(v), attn_mask=mask)
        h = self.proj_cross(self._merge(h))  # (B, HW, C)
        if keep_row is not None:
            h = h * keep_row[:, None, None].to(h.dtype)
        return h


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
