"""A dedicated inpainting model: the text model's U-Net with 5 more input channels (the mask and the masked latent).

Stable Diffusion's inpainting model (Rombach et al. 2022, the "sd-v1-5-inpainting" recipe) widens the first
convolution of a trained text-to-image U-Net from 4 to 9 input channels: the noisy latent x (4), the latent mask
m (1; 1 = generate), and the latent of the masked image (4). The new input weights start at zero, so before fine-
tuning the widened net computes exactly what the text model computed; fine-tuning teaches it to use the mask.

| symbol | code name          | meaning                                                               |
|--------|--------------------|-----------------------------------------------------------------------|
| x      | ``x`` (B, 4, h, w) | noisy latent                                                          |
| m      | ``mask``           | latent mask (B, 1, h, w), 1 = generate (the ``minidiff.inpainting`` rule) |
| z_m    | ``masked_latents`` | (1 - m) * z0: the known latent with the region to generate zeroed     |

One deviation, for speed: z_m zeroes latent cells instead of encoding the masked *image* as SD does. With the
max-pooled mask rule both hide the same cells, and it spares one autoencoder pass per training step.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from minidiff.models.text_encoder import TextConditionedNet
from minidiff.models.unet import UNet
from minidiff.utils import rand

__all__ = ["InpaintingNet", "widen_for_inpainting", "masked_latents", "random_latent_masks", "inpainting_condition",
           "everything_masked",
           "EXTRA_CHANNELS"]

EXTRA_CHANNELS = 5  # mask (1) + masked latent (4 for a 4-channel latent)


def masked_latents(z0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z_m = (1 - m) * z0: the known latent, zero where the model is to generate."""
    return (1 - mask) * z0


class InpaintingNet(TextConditionedNet):
    """``net(x, t, *, tokens, token_mask, mask, masked_latents)``: the text model on cat(x, m, z_m) (9 channels)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, tokens: torch.Tensor, token_mask: torch.Tensor,
                mask: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
        if mask.shape != (x.shape[0], 1, *x.shape[2:]) or masked_latents.shape != x.shape:
            raise ValueError(f"mask must be (B, 1, h, w) and masked_latents (B, C, h, w) like x {tuple(x.shape)}, "
                             f"got {tuple(mask.shape)} and {tuple(masked_latents.shape)}")
        return super().forward(torch.cat([x, mask.to(x), masked_latents.to(x)], dim=1), t, tokens=tokens,
                               token_mask=token_mask)


def widen_for_inpainting(net: TextConditionedNet) -> InpaintingNet:
    """An ``InpaintingNet`` with a copy of ``net``'s weights (device and dtype kept), its first conv widened by
    zero-initialised input channels; ``net`` itself is left unchanged."""
    config = net.unet.config
    if config.in_channels != config.out_channels:
        raise ValueError(f"net must be a text model with in_channels == out_channels, got {config.in_channels} and "
                         f"{config.out_channels} (already widened?)")
    state = net.unet.state_dict()
    w = state["conv_in.weight"]  # (C0, 4, 3, 3)
    unet = UNet(replace(config, in_channels=config.in_channels + 1 + config.out_channels)).to(w.device, w.dtype)
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], 1 + config.out_channels, *w.shape[2:])], dim=1)
    unet.load_state_dict(state)
    return InpaintingNet(unet, copy.deepcopy(net.text_encoder))


def random_latent_masks(batch_size: int, size: tuple[int, int], *, generator: torch.Generator | None = None,
                        p_full: float = 0.1) -> torch.Tensor:
    """(B, 1, h, w) training masks: a random box (a quarter of rows), a border strip (outpainting), or, with
    probability ``p_full``, everything (plain text-to-image), as SD's inpainting fine-tune mixes them."""
    h, w = size
    masks = torch.zeros(batch_size, 1, h, w)
    u = rand((batch_size, 6), generator=generator)
    for i in range(batch_size):
        if u[i, 0] < p_full:
            masks[i] = 1
        elif u[i, 0] < 0.3:  # a strip along one border, a quarter to a half of the image
            k = int(h * (0.25 + 0.25 * u[i, 1]))
            side = int(u[i, 2] * 4)
            rows, cols = [(slice(0, k), slice(None)), (slice(h - k, h), slice(None)),
                          (slice(None), slice(0, k)), (slice(None), slice(w - k, w))][side]
            masks[i, 0, rows, cols] = 1
        else:  # a box from 3x3 cells to most of the image
            bh, bw = (3 + (u[i, 1:3] * (h - 5)).long()).tolist()
            top, left = int(u[i, 3] * (h - bh + 1)), int(u[i, 4] * (w - bw + 1))
            masks[i, 0, top:top + bh, left:left + bw] = 1
    return masks


def inpainting_condition(z0: torch.Tensor, mask: torch.Tensor) -> dict:
    """The extra keywords an ``InpaintingNet`` takes for inputs z0 (B, C, h, w) and latent mask (B, 1, h, w)."""
    return {"mask": mask, "masked_latents": masked_latents(z0, mask)}


def everything_masked(n: int, latent_shape, device=None) -> dict:
    """``inpainting_condition`` with the whole latent masked: text-to-image (what 10% of the fine-tune saw)."""
    C, h, w = latent_shape
    return inpainting_condition(torch.zeros(n, C, h, w, device=device), torch.ones(n, 1, h, w, device=device))

