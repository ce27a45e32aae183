"""Text encoders and the text-conditioned net: prompt -> tokens -> context (B, L, D) -> cross-attention in the U-Net.

One interface for every text encoder (the jointly trained transformer here, the frozen tiny CLIP in
``minidiff.models.clip``, the pretrained adapters in ``minidiff.models.pretrained_text``)::

    ids, mask = encoder.tokenize(prompts)        # int64 (B, L), bool (B, L)
    context, mask = encoder(ids, mask)           # float (B, L, D), bool (B, L)
    context, mask = encoder.encode(prompts)      # both steps

| symbol | code name | meaning                                              |
|--------|-----------|------------------------------------------------------|
| L      | ``L``     | tokens per prompt (the tokenizer's ``max_length``)    |
| D      | ``dim``   | width of the context = the U-Net's ``context_dim``    |
| h, d   | ``heads`` | attention heads and channels per head (D = h d)       |

``TextConditionedNet`` puts an encoder in front of a U-Net, so the net takes token tensors
(``net(x, t, tokens=ids, token_mask=mask)``) and the ``Denoiser`` contract, CFG (uncond = the empty prompt's
tokens, or a negative prompt's) and every sampler work unchanged. The encoder runs at every call: it is tiny next
to the U-Net, and it is what lets the two train jointly (Rombach et al. 2022, Sec. 3.3, "trainable conditioning").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.data.tokenizer import Tokenizer

__all__ = ["TextEncoder", "TransformerBlock", "TransformerTextEncoder", "PooledTextEncoder", "TextConditionedNet",
           "check_tokens", "encoder_from_spec"]


def check_tokens(ids, mask, vocab_size: int | None = None) -> None:
    """Raise unless ids is int64 (B, L) (values < vocab_size) and mask is bool of the same shape."""
    if not torch.is_tensor(ids) or ids.dtype != torch.int64 or ids.ndim != 2:
        raise ValueError(f"tokens must be an int64 tensor (B, L) from encoder.tokenize(prompts), got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.shape != ids.shape:
        raise ValueError(f"token_mask must be a bool tensor of shape {tuple(ids.shape)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    if vocab_size is not None and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
        raise ValueError(f"tokens must be ids in 0..{vocab_size - 1}, got values in {int(ids.min())}..{int(ids.max())}")


class TextEncoder(nn.Module):
    """Base class: subclasses set ``self.tokenizer`` and ``self.dim`` and implement ``forward(ids, mask)``."""

    tokenizer: Tokenizer
    dim: int

    def tokenize(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L), mask (B, L)) on this encoder's device."""
        ids, mask = self.tokenizer(prompts)
        device = next(self.parameters()).device
        return ids.to(device), mask.to(device)

    def encode(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (list of str) -> (context (B, L, D), mask (B, L))."""
        return self(*self.tokenize(prompts))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block (Vaswani et al. 2017; pre-LN as in GPT-2 and CLIP's text tower)."""

    def __init__(self, dim: int, heads: int, *, causal: bool = False):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"heads must divide dim ({dim}), got {heads}")
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, L, D), mask (B, L) bool: padded keys are never attended to."""
        B, L, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        allowed = mask[:, None, None, :]  # (B, 1, 1, L): every query may look at real keys
        if self.causal:
            allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, heads, L, d)
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return h + self.mlp(self.norm2(h))


class TransformerTextEncoder(TextEncoder):
    """Token + position embeddings, ``layers`` transformer blocks, a final LayerNorm: the per-token context.

    The default encoder of the course's text model, trained jointly with the U-Net (LDM's trainable
    conditioning, Rombach et al. 2022, Sec. 3.3; their text model is a transformer of the same shape, larger).
    """

    def __init__(self, tokenizer: Tokenizer | None = None, *, dim: int = 128, layers: int = 2, heads: int = 4,
                 causal: bool = False):
        super().__init__()
        self.tokenizer = tokenizer or Tokenizer()
        self.dim = dim
        self.token_emb = nn.Embedding(len(self.tokenizer), dim)
        self.pos_emb = nn.Parameter(torch.zeros(self.tokenizer.max_length, dim))
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.01)
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, causal=causal) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def spec(self) -> dict:
        """What ``encoder_from_spec`` needs to rebuild this encoder (sizes and the tokenizer's vocabulary)."""
        return {"kind": "transformer", "dim": self.dim, "layers": len(self.blocks), "heads": self.blocks[0].heads,
                "causal": self.blocks[0].causal, "vocabulary": list(self.tokenizer.vocabulary[4:]),
                "max_length": self.tokenizer.max_length, "truncation": self.tokenizer.truncation}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L), mask (B, L)) -> (context (B, L, D), mask)."""
        check_tokens(ids, mask, len(self.tokenizer))
        if ids.shape[1] > self.tokenizer.max_length:
            raise ValueError(f"tokens have length {ids.shape[1]} > max_length {self.tokenizer.max_length}")
        h = self.token_emb(ids) + self.pos_emb[:ids.shape[1]]  # (B, L, D)
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h), mask


class PooledTextEncoder(TextEncoder):
    """Wrap an encoder and keep one vector per prompt, the masked mean of its tokens: context (B, 1, D).

    The ablation of per-token cross-attention: with one key, softmax attention is 1 everywhere, so the U-Net gets
    the same vector at every pixel (like a class embedding) and cannot say which word goes where.
    """

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder, self.tokenizer, self.dim = encoder, encoder.tokenizer, encoder.dim

    def spec(self) -> dict:
        return {**self.encoder.spec(), "pooled": True}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, mask = self.encoder(ids, mask)
        w = mask.to(context.dtype)[..., None]  # (B, L, 1)
        pooled = (context * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)  # (B, 1, D)
        return pooled, torch.ones(len(ids), 1, dtype=torch.bool, device=ids.device)


class TextConditionedNet(nn.Module):
    """``net(x, t, *, tokens, token_mask)``: encode the tokens, then run the U-Net with cross-attention to them."""

    def __init__(self, unet: nn.Module, text_encoder: TextEncoder):
        super().__init__()
        if unet.config.context_dim != text_encoder.dim:
            raise ValueError(f"the U-Net's context_dim ({unet.config.context_dim}) must equal the text encoder's "
                             f"dim ({text_encoder.dim})")
        self.unet, self.text_encoder = unet, text_encoder

    @property
    def config(self):
        """The U-Net's config (``Denoiser.context_dim`` reads it)."""
        return self.unet.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, tokens: torch.Tensor,
                token_mask: torch.Tensor) -> torch.Tensor:
        context, mask = self.text_encoder(tokens, token_mask)
        return self.unet(x, t, context=context.to(x.dtype), context_mask=mask)


def encoder_from_spec(spec: dict) -> TextEncoder:
    """Rebuild the encoder that ``encoder.spec()`` describes: the course's transformer untrained (its weights come
    from the file), a pretrained adapter (``models.pretrained_text``) with its own weights."""
    if spec.get("kind") != "transformer":
        from minidiff.models.pretrained_text import pretrained_encoder_from_spec
        return pretrained_encoder_from_spec(spec)
    tokenizer = Tokenizer(spec["vocabulary"], max_length=spec["max_length"], truncation=spec.get("truncation", "warn"))
    encoder = TransformerTextEncoder(tokenizer, dim=spec["dim"], layers=spec["layers"], heads=spec["heads"],
                                     causal=spec["causal"])
    return PooledTextEncoder(encoder) if spec.get("pooled") else encoder
