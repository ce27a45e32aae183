"""Classifier-free guidance as a denoiser wrapper, guidance rescale, and label dropout for training it.

| symbol      | code name           | meaning                                                               |
|-------------|---------------------|-----------------------------------------------------------------------|
| w           | ``guidance_scale``  | CFG weight (Ho & Salimans 2022; w = 1 + their w), 1 = no guidance     |
| phi         | ``guidance_rescale``| mix of the std-rescaled and plain guided prediction (Lin et al. 2024) |
| x0_c, x0_u  | ``x0_c, x0_u``      | conditional and unconditional (or negative-prompt) predictions        |
| x0_cfg      | ``x0_cfg``          | x0_u + w (x0_c - x0_u)                                                |
"""
from __future__ import annotations

import math

import torch
from torch import nn

from minidiff.utils import rand

__all__ = ["CFGDenoiser", "rescale_guidance", "condition_dropout", "caption_dropout"]


def _check_scales(guidance_scale: float, guidance_rescale: float) -> None:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or \
            not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be finite and >= 0 (a number; 1 = no guidance), got {guidance_scale!r}")
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) or \
            not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be a number in [0, 1] (0 = off), got {guidance_rescale!r}")


def rescale_guidance(x0_cfg: torch.Tensor, x0_c: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2024, Eq. 15-16: scale x0_cfg to the std of x0_c (per sample), then mix by phi.

    std is taken per sample over all non-batch dims. Where x0_cfg has zero std the factor is 1 (nothing to rescale).
    """
    dims = tuple(range(1, x0_cfg.ndim))
    std_c = x0_c.std(dim=dims, keepdim=True, correction=0)
    std_cfg = x0_cfg.std(dim=dims, keepdim=True, correction=0)
    ratio = torch.where(std_cfg > 0, std_c / std_cfg, torch.ones_like(std_cfg))
    x0_rescaled = x0_cfg * ratio  # Eq. 15
    return guidance_rescale * x0_rescaled + (1 - guidance_rescale) * x0_cfg  # Eq. 16


def _broadcast_uncond(cond: dict, uncond: dict, B: int) -> dict:
    """Expand each uncond tensor to the batch size and shape of the matching cond tensor."""
    if set(cond) != set(uncond):
        raise ValueError(f"uncond must have the same keys as the conditioning passed to the denoiser: "
                         f"cond has {sorted(cond)}, uncond has {sorted(uncond)}")
    out = {}
    for k, c in cond.items():
        u = uncond[k]
        if c is None or u is None:
            if c is not None or u is not None:
                raise ValueError(f"uncond[{k!r}] and cond {k!r} must both be tensors or both None")
            out[k] = None
            continue
        u = torch.as_tensor(u, device=c.device, dtype=c.dtype)
        try:
            out[k] = u.expand(c.shape) if u.ndim == c.ndim else u.expand(B, *c.shape[1:])
        except RuntimeError as e:
            raise ValueError(f"uncond[{k!r}] of shape {tuple(u.shape)} does not broadcast to cond {k!r} "
                             f"of shape {tuple(c.shape)}") from e
    return out


def _cat_batch(a, b):
    return None if a is None else torch.cat([a, b])


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): D_cfg = D(x, uncond) + w (D(x, cond) - D(x, uncond)).

    A denoiser with the same contract, applied to x0_hat (the contract's output; diffusers applies the same
    formula to eps_hat, which is equivalent because eps is affine in x0 at fixed x and sigma). ``uncond`` is a
    dict of cond keywords for the unconditional branch (a null class, an empty prompt, or a negative prompt),
    broadcast to the batch. Both branches run in one batched forward. w = 1 returns the conditional prediction
    exactly and w = 0 the unconditional one exactly (the other branch is skipped). ``guidance_rescale`` (phi)
    applies Lin et al. 2024, Eq. 15-16 on x0_hat (diffusers does it on eps_hat; the two differ).
    """

    def __init__(self, denoiser: nn.Module, guidance_scale: float, *, uncond: dict, guidance_rescale: float = 0.0):
        super().__init__()
        _check_scales(guidance_scale, guidance_rescale)
        if not isinstance(uncond, dict):
            raise ValueError(f"uncond must be a dict of cond keywords, e.g. {{'class_labels': null_id}}, "
                             f"got {type(uncond).__name__}")
        self.denoiser = denoiser
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.uncond = uncond

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """x0_hat with guidance, one batched forward: [uncond; cond] on the batch axis."""
        if self.guidance_scale == 1.0:
            return self.denoiser(x, sigma, **cond)
        uncond = _broadcast_uncond(cond, self.uncond, x.shape[0])
        if self.guidance_scale == 0.0:
            return self.denoiser(x, sigma, **uncond)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        cond_in = {k: _cat_batch(uncond[k], cond[k]) for k in cond}
        x0_u, x0_c = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **cond_in).chunk(2)
        x0_cfg = x0_u + self.guidance_scale * (x0_c - x0_u)
        if self.guidance_rescale > 0:
            x0_cfg = rescale_guidance(x0_cfg, x0_c, self.guidance_rescale)
        return x0_cfg


def condition_dropout(labels: torch.Tensor, p: float, null_id: int, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by ``null_id`` with probability p, to train one net for CFG (Ho & Salimans 2022, Alg. 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (condition dropout probability) must be in [0, 1], got {p}")
    if not torch.is_tensor(labels) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor, got {type(labels).__name__} {getattr(labels, 'dtype', '')}")
    drop = rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_id), labels)


def caption_dropout(tokens: torch.Tensor, token_mask: torch.Tensor, p: float, *, empty: tuple,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each prompt (a row of tokens (B, L) and mask (B, L)) by the empty prompt ``empty`` = (ids (1, L),
    mask (1, L)) with probability p: condition dropout for text (Ho & Salimans 2022, Alg. 1; Rombach et al. 2022
    drop 10% of captions). One draw per prompt, so a dropped prompt loses all its words, never some."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (caption dropout probability) must be in [0, 1], got {p}")
    empty_ids, empty_mask = empty
    if tokens.ndim != 2 or token_mask.shape != tokens.shape or empty_ids.shape[-1] != tokens.shape[1]:
        raise ValueError(f"tokens and token_mask must be (B, L) and empty (1, L) with the same L, got "
                         f"{tuple(tokens.shape)}, {tuple(token_mask.shape)} and {tuple(empty_ids.shape)}")
    drop = (rand((tokens.shape[0],), generator=generator) < p).to(tokens.device)[:, None]  # (B, 1)
    return (torch.where(drop, empty_ids.to(tokens.device), tokens),
            torch.where(drop, empty_mask.to(token_mask.device), token_mask))
