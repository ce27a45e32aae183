"""Editing on the course's text model: image-to-image, inpainting (two ways) and outpainting, as plain functions.

    pipe = minidiff.pretrained.load_pipeline("shapes64-text")
    edited = pipe.image_to_image("a large blue circle", images, strength=0.6, generator=g)
    filled = pipe.inpaint("a small red square above a large white cross", images, mask, generator=g)
    wider = pipe.outpaint("a large green diamond left of a small red circle", images, right=32, generator=g)

Everything runs in latent space: encode the input with the autoencoder (z0 = its posterior mean, scaled),
edit the latent, decode. The editing math lives in ``minidiff.inpainting``; these functions wire it to the
prompt, CFG (``guided_text_denoiser``) and any sampler:

- ``image_to_image_latents``: SDEdit (Meng et al. 2022): noise z0 to the level ``strength`` selects, denoise.
- ``inpaint_latents``: with the text model, the training-free ``InpaintDenoiser`` (optionally with RePaint
  resampling, ``jumps``); with a dedicated inpainting model (``InpaintingNet``, shipped as ``shapes64-inpaint``)
  its mask and masked latent go in as extra channels (Rombach et al. 2022's inpainting fine-tune). ``jumps``
  > 1 samples with RePaint's resampling (``samplers.sample_repaint``) instead of ``sampler``. Either way
  the final latent keeps z0 outside the mask (``keep_unmasked``; exact already for the training-free method).
- outpainting is inpainting on a wider or taller canvas: the input's latent padded with zeros, the mask 1
  on the padding (the U-Net is convolutional, so it samples any multiple of 4 latent cells).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from minidiff.inpainting import InpaintDenoiser, check_mask, img2img_start, img2img_start_latents, latent_mask
from minidiff.models.inpainting_net import InpaintingNet, inpainting_condition
from minidiff.pipelines.text_to_image import _check_options, check_prompts, guided_text_denoiser
from minidiff.samplers import get_sampler, sample_repaint
from minidiff.schedules import sampling_sigmas
from minidiff.utils import check_generator, randn

__all__ = ["check_images", "match_batch", "encode_images", "image_to_image_latents", "inpaint_latents",
           "outpaint_canvas", "pixel_to_latent_mask"]


def check_images(images, vae) -> torch.Tensor:
    """images as float (B, 3, H, W) in [-1, 1] with H, W multiples of the autoencoder's factor; clear errors."""
    if not torch.is_tensor(images) or not images.dtype.is_floating_point:
        hint = (" (a numpy array: torch.from_numpy(a).float(), channels first)" if type(images).__module__ == "numpy"
                else " (8-bit pixels: x.float() / 127.5 - 1)" if torch.is_tensor(images) and images.dtype == torch.uint8
                else "")
        raise ValueError(f"images must be a float tensor (B, 3, H, W) in [-1, 1], got "
                         f"{type(images).__name__}" + (f" of dtype {images.dtype}" if hasattr(images, "dtype") else "")
                         + hint)
    if images.ndim == 3:
        raise ValueError(f"images must have a batch axis, (B, 3, H, W); for one image use images[None], got "
                         f"{tuple(images.shape)}")
    f = vae.factor
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
        raise ValueError(f"images must have shape (B, 3, H, W) with H and W multiples of {f}, got "
                         f"{tuple(images.shape)}")
    if not torch.isfinite(images).all() or images.min() < -1.001 or images.max() > 1.001:
        raise ValueError(f"images must lie in [-1, 1] (map [0, 1] images with x * 2 - 1), got values in "
                         f"[{images.min().item():.3g}, {images.max().item():.3g}]")
    if images.min() >= 0 and images.max() > images.min():
        warnings.warn(f"images lie in [{images.min().item():.3g}, {images.max().item():.3g}], no value below 0: "
                      f"the models' images are in [-1, 1] (black = -1); if these are [0, 1] images, pass "
                      f"images * 2 - 1 (a bright [-1, 1] image needs nothing)", stacklevel=4)
    return images


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """z0: the scaled posterior mean of checked images (the deterministic encoding every edit starts from)."""
    device = next(vae.parameters()).device
    return vae.encode_latents(images.to(device).float())


def match_batch(prompts, images: torch.Tensor) -> torch.Tensor:
    """``images`` repeated to one per prompt when one image is given for several prompts."""
    n = len(check_prompts(prompts)[0])
    return images.expand(n, *images.shape[1:]) if len(images) == 1 and n > 1 else images


def _match_prompts(prompts, negative_prompt, n: int):
    prompts = check_prompts(prompts)[0]
    if len(prompts) == 1 and n > 1:  # one prompt for every image; then a negative prompt per image is fine
        prompts = prompts * n
        if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) == 1:
            negative_prompt = list(negative_prompt) * n
    prompts, negative = check_prompts(prompts, negative_prompt)
    if len(prompts) != n:
        raise ValueError(f"prompts must be one str or one per image ({n}), got {len(prompts)}")
    return prompts, negative


@torch.no_grad()
def image_to_image_latents(denoiser, tokenizer, prompts, z0: torch.Tensor, *, strength: float = 0.6,
                           negative_prompt=None, guidance: float = 5.0, guidance_rescale: float = 0.0,
                           sampler: str = "dpmpp_2m", steps: int = 20, spacing: str = "trailing",
                           generator: torch.Generator | None = None, progress: bool = True) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): z0 noised to level N - int(N * strength) of the ``steps`` levels, then denoised.

    strength 0 returns z0; strength 1 is ``text_to_image_latents`` with the same generator (see
    ``inpainting.img2img_start_latents``)."""
    _check_options(guidance, sampler, steps, spacing, len(denoiser.alphas_cumprod))
    prompts, negative = _match_prompts(prompts, negative_prompt, len(z0))
    if strength != 0 and img2img_start(steps, strength) == steps:  # diffusers raises here too
        raise ValueError(f"strength {strength} with steps={steps} runs int({steps} * {strength}) = 0 sampling steps: "
                         f"raise steps or strength (strength 0 returns the input's round trip)")
    sigmas = sampling_sigmas(denoiser.alphas_cumprod, steps, spacing)
    x, tail = img2img_start_latents(z0, sigmas, strength, generator=generator)
    if len(tail) < 2:
        return z0.clone()
    guided, cond = guided_text_denoiser(denoiser, tokenizer, prompts, negative_prompt=negative, guidance=guidance,
                                        guidance_rescale=guidance_rescale, device=z0.device)
    return get_sampler(sampler)(guided, x, tail, extra_args=cond, generator=generator, progress=progress)


@torch.no_grad()
def inpaint_latents(denoiser, tokenizer, prompts, z0: torch.Tensor, mask: torch.Tensor, *, jumps: int = 1,
                    keep_unmasked: bool = True, negative_prompt=None, guidance: float = 5.0,
                    guidance_rescale: float = 0.0, sampler: str = "dpmpp_2m", steps: int = 20,
                    spacing: str = "trailing", generator: torch.Generator | None = None,
                    progress: bool = True) -> torch.Tensor:
    """Latents with the latent ``mask`` (B, 1, h, w; 1 = generate) region generated for ``prompts``.

    The method follows the model: an ``InpaintingNet`` gets (mask, masked latent) as input channels; any other
    text model is wrapped in ``InpaintDenoiser``. ``jumps`` > 1 samples with RePaint (``samplers.sample_repaint``,
    DDPM steps each taken ``jumps`` times) instead of ``sampler``, for either method."""
    _check_options(guidance, sampler, steps, spacing, len(denoiser.alphas_cumprod))
    check_generator(generator)
    if not isinstance(keep_unmasked, bool):
        raise ValueError(f"keep_unmasked must be True or False, got {keep_unmasked!r}")
    prompts, negative = _match_prompts(prompts, negative_prompt, len(z0))
    dedicated = isinstance(getattr(denoiser, "net", None), InpaintingNet)
    noise = randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)  # the prior draw
    mask = mask.to(z0)
    model = denoiser if dedicated else InpaintDenoiser(denoiser, z0, mask, noise)
    guided, cond = guided_text_denoiser(model, tokenizer, prompts, negative_prompt=negative, guidance=guidance,
                                        guidance_rescale=guidance_rescale, device=z0.device,
                                        image_cond=inpainting_condition(z0, mask) if dedicated else None)
    sigmas = sampling_sigmas(denoiser.alphas_cumprod, steps, spacing)
    if jumps == 1:
        z = get_sampler(sampler)(guided, noise, sigmas, extra_args=cond, generator=generator, progress=progress)
    else:
        z = sample_repaint(guided, noise, sigmas, extra_args=cond, generator=generator, progress=progress, jumps=jumps)
    return mask * z + (1 - mask) * z0 if keep_unmasked else z


def outpaint_canvas(z0: torch.Tensor, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                    factor: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent canvas, latent mask) for outpainting: z0 padded with zeros by the pixel margins (multiples of
    ``factor``), the mask 1 on the padding."""
    pads = {"left": left, "right": right, "top": top, "bottom": bottom}
    bad = {k: v for k, v in pads.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v % factor}
    if bad:
        raise ValueError(f"outpainting margins must be ints >= 0 and multiples of {factor} pixels, got {bad}")
    if not any(pads.values()):
        raise ValueError("outpainting needs a margin: give left, right, top or bottom (pixels, e.g. right=32)")
    l, r, t, b = (v // factor for v in (left, right, top, bottom))
    canvas = nn.functional.pad(z0, (l, r, t, b))
    mask = nn.functional.pad(torch.zeros_like(z0[:, :1]), (l, r, t, b), value=1.0)
    return canvas, mask


def pixel_to_latent_mask(mask, images: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The checked pixel mask of ``images`` mapped to latent cells (``inpainting`` module's mask rule)."""
    m = latent_mask(check_mask(mask, len(images), tuple(images.shape[-2:])), latent_size)
    if not m.flatten(1).any(dim=1).all():
        warnings.warn("the mask selects no pixel for some images (values below 0.5 keep the input; 1 = repaint): "
                      "their output is only the autoencoder's round trip of the input", stacklevel=4)
    return m

