"""Editing with a trained model: image-to-image (SDEdit), training-free inpainting, RePaint resampling.

All three keep the one denoiser contract ``D(x, sigma, **cond) -> x0_hat`` and the one sampler signature:

- image-to-image noises the input's latent z0 to the level that ``strength`` selects and runs any sampler from
  there (SDEdit, Meng et al. 2022, Sec. 3: "perturb with noise, then denoise"); ``strength`` 1 is text-to-image.
- ``InpaintDenoiser`` wraps a denoiser so that, at every level, the network sees the *known* region as the
  forward-noised original and returns z0 there (the "replacement" method of Song et al. 2021, App. I.2, and
  of RePaint, Lugmayr et al. 2022, Eq. 8); the sampler never knows.
- RePaint's resampling (Lugmayr et al. 2022, Alg. 1) is a sampler, ``samplers.sample_repaint``: after each
  DDPM step, jump back to the previous level with fresh noise and step again, ``jumps`` times, so the
  generated region can agree with the known one across the seam.

| symbol  | code name   | meaning                                                                     |
|---------|-------------|-----------------------------------------------------------------------------|
| z0      | ``z0``      | the latent of the input image (the autoencoder's scaled latent)             |
| m       | ``mask``    | latent mask (B, 1, h, w): 1 = generate here, 0 = keep the input             |
| eps     | ``noise``   | the fixed draw that noises the known region: x_known = a z0 + b eps         |
| s       | ``strength``| img2img: of N sampling levels, start at index N - int(N * strength)         |

**The mask rule.** A pixel mask (B, 1, H, W) or (H, W), bool or float in [0, 1] (1 = repaint), is binarised
at 0.5 and max-pooled by the autoencoder's factor H / h: a latent cell is generated if *any* of its pixels is
to be repainted, so every requested pixel is regenerated (Stable Diffusion's pipeline interpolates the mask
instead, which can leave the edge of a thin mask unedited). An all-zero mask is a no-op: the result is the
autoencoder's round trip of the input.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from minidiff.forward import q_sample_sigma
from minidiff.utils import check_generator, randn

__all__ = ["check_mask", "latent_mask", "img2img_start", "img2img_start_latents", "InpaintDenoiser"]


def check_mask(mask, batch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """The pixel mask as float (B, 1, H, W) in {0, 1} (binarised at 0.5); clear errors for anything else."""
    H, W = size
    if not torch.is_tensor(mask):
        raise ValueError(f"mask must be a tensor (B, 1, H, W) or (H, W) with 1 = repaint, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise ValueError(f"mask must be bool or float in [0, 1] (1 = repaint), got dtype {mask.dtype}")
    if mask.ndim == 2 and tuple(mask.shape) == (H, W):
        mask = mask[None, None].expand(batch_size, 1, H, W)
    if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (H, W) or mask.shape[0] not in (1, batch_size):
        raise ValueError(f"mask must have shape (B, 1, H, W) = ({batch_size}, 1, {H}, {W}) or (H, W) = ({H}, {W}) "
                         f"like the images, got {tuple(mask.shape)}")
    mask = mask.float().expand(batch_size, 1, H, W)
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"mask values must lie in [0, 1] (1 = repaint, 0 = keep), got values in "
                         f"[{mask.min().item():g}, {mask.max().item():g}]")
    return (mask >= 0.5).float()


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Latent mask (B, 1, h, w) from a checked pixel mask (B, 1, H, W): max-pooled, so any repainted pixel marks
    its latent cell (the module's mask rule)."""
    H, W = mask.shape[-2:]
    h, w = latent_size
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"the image size {H}x{W} must be the latent size {h}x{w} times one integer factor")
    return nn.functional.max_pool2d(mask, kernel_size=H // h)


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first of ``steps`` sampling levels for ``strength`` (diffusers' img2img rule): N - int(N s)."""
    if torch.is_tensor(strength) and strength.numel() == 1:
        strength = float(strength)
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0 = return the input, 1 = ignore it), "
                         f"got {strength!r}")
    return steps - min(int(steps * strength), steps)


def img2img_start_latents(z0: torch.Tensor, sigmas: torch.Tensor, strength: float, *,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x at the start level, the remaining sigmas) for SDEdit (Meng et al. 2022, Eq. 4 noising).

    The noise is drawn first from ``generator`` (as ``samplers.sample`` draws its prior), so that strength 1,
    which starts from that draw itself and ignores z0, *is* text-to-image with the same generator. (On the
    cosine table the first level keeps sqrt(alpha_bar) ~ 5e-5 of z0; diffusers noises it anyway.)
    """
    check_generator(generator)
    noise = randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    start = img2img_start(len(sigmas) - 1, strength)
    tail = sigmas[start:]
    if start == 0:
        return noise, tail
    return q_sample_sigma(z0, torch.full((len(z0),), float(tail[0]), dtype=z0.dtype, device=z0.device), noise), tail


class InpaintDenoiser(nn.Module):
    """Training-free inpainting as a denoiser wrapper (Song et al. 2021, App. I.2; Lugmayr et al. 2022, Eq. 8).

    D_inp(x, sigma) = m * D(x', sigma) + (1 - m) * z0, where x' = m * x + (1 - m) * (a z0 + b eps): the network
    always sees the known region at the forward-noised level of the current sigma, its estimate there is z0
    itself, and so the sampler's output ends at z0 in the known region, for any sampler. One deviation from
    RePaint, which draws fresh noise for the known region at every step: eps is one fixed draw (``noise``), so
    that a deterministic sampler stays deterministic.
    """

    def __init__(self, denoiser: nn.Module, z0: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        super().__init__()
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != z0.shape[0] or mask.shape[2:] != z0.shape[2:]:
            raise ValueError(f"mask must be a latent mask (B, 1, h, w) matching z0 {tuple(z0.shape)}, "
                             f"got {tuple(mask.shape)}")
        if noise.shape != z0.shape:
            raise ValueError(f"noise must have the shape of z0 {tuple(z0.shape)}, got {tuple(noise.shape)}")
        self.denoiser, self.z0, self.mask, self.noise = denoiser, z0, mask.to(z0), noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        m = self.mask
        if len(x) != len(m):  # a batch of n copies (e.g. a second sample per input): tile the known inputs
            m, z0, noise = (t.repeat(len(x) // len(m), 1, 1, 1) for t in (m, self.z0, self.noise))
        else:
            z0, noise = self.z0, self.noise
        x_known = q_sample_sigma(z0, sigma, noise)
        x0_hat = self.denoiser(m * x + (1 - m) * x_known, sigma, **cond)
        return m * x0_hat + (1 - m) * z0
