"""Attention blocks of the minidiff U-Net: self-attention over pixels and cross-attention to a context.

| symbol   | code name   | meaning                                              |
|----------|-------------|------------------------------------------------------|
| B        | ``B``       | batch size                                           |
| C        | ``C``       | channels of the feature map                          |
| H, W     | ``H, W``    | spatial size; the block attends over N = H * W       |
| L, D     | ``L, D``    | context length and context feature size              |
| h, d     | ``heads, d``| attention heads and channels per head (C = h d)      |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionBlock"]


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
