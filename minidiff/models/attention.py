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

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionBlock", "record_cross_attention", "sincos_2d"]

POS_DIM = 32  # features of the 2-D position code (a quarter each: sin y, cos y, sin x, cos x)


def sincos_2d(H: int, W: int, dim: int = POS_DIM, *, device=None) -> torch.Tensor:
    """(H*W, dim) sinusoidal code of each pixel's centre ((i + 0.5) / H, (j + 0.5) / W), rows first, so every level of
    the U-Net codes the same place alike: Vaswani et al. 2017, Sec. 3.5, in 2-D as in MAE (He et al. 2022), with
    frequencies pi * 2^k on coordinates in [0, 1]."""
    if dim % 4 != 0:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    freqs = math.pi * 2.0 ** torch.arange(dim // 4, device=device)  # (dim/4,)
    y = (torch.arange(H, device=device) + 0.5) / H
    x = (torch.arange(W, device=device) + 0.5) / W
    ay = (y[:, None] * freqs)[:, None, :].expand(H, W, -1)  # (H, W, dim/4)
    ax = (x[:, None] * freqs)[None, :, :].expand(H, W, -1)
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=-1).reshape(H * W, dim)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, plus optional cross-attention to a context.

    Self-attention as in DDPM (Ho et al. 2020, App. B); cross-attention
    softmax(Q K^T / sqrt(d)) V with Q from the image and K, V from the context (Rombach et al. 2022, Eq. 3).
    Both are residual and use ``F.scaled_dot_product_attention``.

    Attention alone is blind to where a pixel is (it treats the H*W positions as a set), and a relation such as
    "above" is about where. ``position=True`` adds ``sincos_2d`` through a zero-initialised linear map to the
    normalised input of both attentions (absolute position as in ViT, Dosovitskiy et al. 2021): a block built
    with it computes what one without it does until training moves that map, so a trained model can gain it.
    """

    def __init__(self, channels: int, *, num_heads: int, num_groups: int, context_dim: int | None = None,
                 position: bool = False):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"num_heads must divide the channels of an attention level ({channels}), got {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.context_dim = context_dim
        self.record = False  # True: keep the cross-attention probabilities of the last call in ``attention_maps``
        self.attention_maps = None  # (B, heads, H*W, L) when recorded
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(channels)
            self.q_cross = nn.Linear(channels, channels)
            self.kv_cross = nn.Linear(context_dim, 2 * channels)
            self.proj_cross = nn.Linear(channels, channels)
        self.pos_proj = None
        if position:
            self.pos_proj = nn.Linear(POS_DIM, channels)
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)

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
        pos = 0.0 if self.pos_proj is None else self.pos_proj(sincos_2d(H, W, device=x.device).to(x.dtype))  # (HW, C)
        q, k, v = self.qkv(self.norm(x).flatten(2).transpose(1, 2) + pos).chunk(3, dim=-1)  # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))  # (B, heads, HW, d)
        y = x_tokens + self.proj(self._merge(h))  # (B, HW, C)
        if self.context_dim is not None and context is not None:
            y = y + self._cross(y, context, context_mask, pos)
        return y.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)

    def _cross(self, tokens: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None,
               pos: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Cross-attention of image tokens (B, HW, C) to context (B, L, D); Rombach et al. 2022, Eq. 3."""
        q = self._heads(self.q_cross(self.norm_cross(tokens) + pos))  # (B, heads, HW, d)
        k, v = self.kv_cross(context).chunk(2, dim=-1)  # 2 x (B, L, C)
        mask, keep_row = None, None
        if context_mask is not None:
            # A row with every token masked would give softmax over nothing (NaN): let it attend
            # to all tokens, then zero its output, so "all masked" equals "no context".
            keep_row = context_mask.any(dim=1)  # (B,)
            mask = (context_mask | ~keep_row[:, None])[:, None, None, :]  # (B, 1, 1, L)
        k, v = self._heads(k), self._heads(v)  # (B, heads, L, d)
        if self.record:  # the same softmax written out, to keep the probabilities for pictures
            logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, heads, HW, L)
            p = logits.masked_fill(~mask, float("-inf")).softmax(-1) if mask is not None else logits.softmax(-1)
            self.attention_maps = p.detach()
            h = p @ v
        else:
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = self.proj_cross(self._merge(h))  # (B, HW, C)
        if keep_row is not None:
            h = h * keep_row[:, None, None].to(h.dtype)
        return h


class record_cross_attention:
    """Context manager: ``with record_cross_attention(net) as maps: net(...)``; then ``maps`` is a list with one
    (B, heads, H, W, L) tensor per cross-attention block, in forward order (for per-word attention pictures)."""

    def __init__(self, net: nn.Module):
        self.blocks = [m for m in net.modules() if isinstance(m, AttentionBlock) and m.context_dim is not None]
        if not self.blocks:
            raise ValueError("record_cross_attention: this net has no cross-attention (build it with context_dim=D)")
        self.maps: list[torch.Tensor] = []
        self._hooks = []

    def _hook(self, block, inputs, output) -> None:
        if block.attention_maps is not None:
            B, heads, N, L = block.attention_maps.shape
            H, W = output.shape[-2:]
            self.maps.append(block.attention_maps.view(B, heads, H, W, L))
            block.attention_maps = None

    def __enter__(self) -> list:
        for block in self.blocks:
            block.record = True
            self._hooks.append(block.register_forward_hook(self._hook))
        return self.maps

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            block.record, block.attention_maps = False, None
        for hook in self._hooks:
            hook.remove()
