"""Text to image: prompt -> tokens -> context -> guided denoiser -> sampler -> latents -> decoder -> image.

    pipe = minidiff.pretrained.load_pipeline("shapes64-text")
    images = pipe.text_to_image(["a small red circle above a large blue square"], guidance=5.0,
                                generator=torch.Generator().manual_seed(0))   # (1, 3, 64, 64) in [-1, 1]

The pipeline (``pipelines.pipeline``) is a thin bundle over the plain functions below (the style guide: expose the loop):
``guided_text_denoiser`` builds the classifier-free-guided denoiser (Ho & Salimans 2022, Eq. 6) whose
unconditional branch is the empty prompt, or the negative prompt when one is given (the unconditional branch
*is* the negative prompt in Stable Diffusion's pipelines); ``text_to_image_latents`` runs any sampler over
any spacing from N(0, I) latents; the autoencoder decodes them (Rombach et al. 2022, Sec. 3).
"""
from __future__ import annotations

import math

import torch

from minidiff.guidance import CFGDenoiser
from minidiff.samplers import SAMPLERS, sample
from minidiff.schedules import SAMPLING_SPACINGS, sampling_sigmas

__all__ = ["check_prompts", "guided_text_denoiser", "text_to_image_latents"]


def check_prompts(prompts, negative_prompt=None) -> tuple[list[str], list[str] | None]:
    """(prompts, negative prompts) as lists of str; a str is one prompt, a single negative prompt is broadcast."""
    if not isinstance(prompts, (str, list, tuple)):
        raise ValueError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt, e.g. ['a small red circle'] (\"\" is the "
                         "empty prompt)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    if negative_prompt is None:
        return prompts, None
    if not isinstance(negative_prompt, (str, list, tuple)):
        raise ValueError(f"negative_prompt must be None, a str or a list of str, got {type(negative_prompt).__name__}")
    negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negative) != len(prompts):
        raise ValueError(f"negative_prompt must be one str or a list with one per prompt ({len(prompts)}), got a "
                         f"list of {len(negative)}")
    bad = [p for p in negative if not isinstance(p, str)]
    if bad:
        raise ValueError(f"negative_prompt must hold strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return prompts, negative


def _check_options(guidance: float, sampler: str, steps: int, spacing: str, T: int = 1000) -> None:
    """Refuse a bad guidance, sampler, step count (1 to the denoiser's T levels) or spacing, naming it."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0 (1 = no guidance, 0 = the unconditional model), "
                         f"got {guidance!r}")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int from 1 to {T} (the denoiser's T noise levels), got {steps!r}")
    if not isinstance(spacing, str) or spacing not in SAMPLING_SPACINGS:
        raise ValueError(f"spacing must be one of {list(SAMPLING_SPACINGS)}, got {spacing!r}")


def guided_text_denoiser(denoiser, tokenizer, prompts, *, negative_prompt=None, guidance: float = 5.0,
                         guidance_rescale: float = 0.0, device=None, image_cond: dict | None = None):
    """(guided denoiser, extra_args) for ``prompts``: CFG with the empty prompt (or ``negative_prompt``) as uncond.

    ``image_cond`` (an inpainting model's mask and masked latent) goes to both branches unchanged: only the
    prompt is guided, as in Stable Diffusion's inpainting pipeline."""
    prompts, negative = check_prompts(prompts, negative_prompt)
    ids, mask = tokenizer(prompts)
    u_ids, u_mask = tokenizer(negative if negative is not None else [""])
    image_cond = {k: v.to(device) for k, v in (image_cond or {}).items()}
    cond = {"tokens": ids.to(device), "token_mask": mask.to(device), **image_cond}
    uncond = {"tokens": u_ids.to(device), "token_mask": u_mask.to(device), **image_cond}
    return CFGDenoiser(denoiser, guidance, uncond=uncond, guidance_rescale=guidance_rescale), cond


@torch.no_grad()
def text_to_image_latents(denoiser, tokenizer, prompts, *, negative_prompt=None, guidance: float = 5.0,
                          guidance_rescale: float = 0.0, sampler: str = "dpmpp_2m", steps: int = 20,
                          spacing: str = "trailing", generator: torch.Generator | None = None,
                          latent_shape: tuple | None = None, progress: bool = True,
                          image_cond: dict | None = None) -> torch.Tensor:
    """Latents (B, C, h, w) sampled for ``prompts`` with CFG; ``latent_shape`` defaults to the denoiser's."""
    _check_options(guidance, sampler, steps, spacing, len(denoiser.alphas_cumprod))
    device = next(denoiser.parameters()).device
    guided, cond = guided_text_denoiser(denoiser, tokenizer, prompts, negative_prompt=negative_prompt,
                                        guidance=guidance, guidance_rescale=guidance_rescale, device=device,
                                        image_cond=image_cond)
    shape = tuple(latent_shape or denoiser.image_shape)
    sigmas = sampling_sigmas(denoiser.alphas_cumprod, steps, spacing)
    return sample(guided, (len(cond["tokens"]), *shape), sigmas, sampler=sampler, generator=generator,
                  device=device, extra_args=cond, progress=progress)
