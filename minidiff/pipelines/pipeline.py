"""The pipeline object: autoencoder + text encoder + denoiser, with one method per workflow.

    pipe = minidiff.pretrained.load_pipeline("shapes64-text")       # or "shapes64-inpaint"
    pipe.text_to_image(prompts, ...)              # (B, 3, 64, 64) in [-1, 1]
    pipe.image_to_image(prompts, images, strength=0.6, ...)
    pipe.inpaint(prompts, images, mask, ...)      # mask: (B, 1, H, W) or (H, W), 1 = repaint
    pipe.outpaint(prompts, images, right=32, ...) # a wider canvas, the new part generated

One image given with several prompts is edited once per prompt. Each method is a few lines over the plain functions of ``pipelines.text_to_image`` and ``pipelines.editing``
(the style guide: expose the loop); read those to see what happens.
"""
from __future__ import annotations

import difflib
import inspect

import torch

from minidiff.models.inpainting_net import InpaintingNet, everything_masked
from minidiff.pipelines.editing import (check_images, encode_images, image_to_image_latents, inpaint_latents,
                                        match_batch, outpaint_canvas, pixel_to_latent_mask)
from minidiff.pipelines.text_to_image import check_prompts, text_to_image_latents

__all__ = ["TextToImagePipeline"]


def check_option_names(method: str, options: dict, fn, *, own: tuple = ()) -> None:
    """Refuse an option ``fn`` does not take (a typo such as ``stength``), naming the closest allowed one."""
    allowed = [*own, *(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
                      and p.name not in own)]
    for name in options:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            raise ValueError(f"{method}() got an unknown option {name!r}" + (f" (did you mean {close[0]!r}?)" if close
                             else "") + f"; its options: {', '.join(allowed)}")


class TextToImagePipeline:
    """Autoencoder + text encoder + denoiser: ``pipe.text_to_image(prompts, ...) -> images (B, 3, H, W) in [-1, 1]``.

    ``denoiser`` is a ``Denoiser`` around a ``TextConditionedNet`` (its text encoder and tokenizer live inside
    it); ``vae`` is the ``AutoencoderKL`` whose scaled latents the denoiser was trained on.
    """

    def __init__(self, denoiser, vae, *, name: str | None = None, card: dict | None = None):
        if not hasattr(denoiser.net, "text_encoder"):
            raise ValueError("denoiser must wrap a TextConditionedNet (a U-Net with its text encoder)")
        self.denoiser, self.vae, self.name, self.card = denoiser, vae, name, card or {}

    def __repr__(self) -> str:
        return f"TextToImagePipeline({self.name or 'unnamed'}: latents {tuple(self.denoiser.image_shape)})"

    @property
    def tokenizer(self):
        return self.denoiser.net.text_encoder.tokenizer

    @property
    def text_encoder(self):
        return self.denoiser.net.text_encoder

    def to(self, device) -> "TextToImagePipeline":
        self.denoiser.to(device)
        self.vae.to(device)
        return self

    def encode_prompt(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, D), mask (B, L)) of the prompts: what the U-Net cross-attends to."""
        return self.text_encoder.encode(check_prompts(prompts)[0])

    @torch.no_grad()
    def text_to_image(self, prompts, *, negative_prompt=None, guidance: float = 5.0, guidance_rescale: float = 0.0,
                      sampler: str = "dpmpp_2m", steps: int = 20, spacing: str = "trailing",
                      generator: torch.Generator | None = None, progress: bool = True,
                      output: str = "images") -> torch.Tensor:
        """Images (B, 3, 64, 64) in [-1, 1] for ``prompts`` (``output="latents"``: the latents before decoding)."""
        self._check_output(output)
        n = len(check_prompts(prompts)[0])
        z = text_to_image_latents(self.denoiser, self.tokenizer, prompts, negative_prompt=negative_prompt,
                                  guidance=guidance, guidance_rescale=guidance_rescale, sampler=sampler, steps=steps,
                                  spacing=spacing, generator=generator, progress=progress,
                                  image_cond=self._everything_masked(n))
        return self._output(z, output)

    @property
    def is_inpainting_model(self) -> bool:
        """True for a dedicated inpainting model (mask and masked latent as extra input channels)."""
        return isinstance(self.denoiser.net, InpaintingNet)

    def _everything_masked(self, n: int) -> dict | None:
        """An inpainting model asked for text-to-image: the whole latent masked (what 10% of its training saw)."""
        if not self.is_inpainting_model:
            return None
        return everything_masked(n, self.denoiser.image_shape, next(self.denoiser.parameters()).device)

    @staticmethod
    def _check_output(output: str) -> None:
        if output not in ("images", "latents"):
            raise ValueError(f"output must be 'images' or 'latents', got {output!r}")

    def _output(self, z: torch.Tensor, output: str) -> torch.Tensor:
        return z if output == "latents" else self.vae.decode_latents(z).clamp(-1, 1)

    @torch.no_grad()
    def image_to_image(self, prompts, images, *, strength: float = 0.6, output: str = "images",
                       **options) -> torch.Tensor:
        """SDEdit: ``images`` (B, 3, H, W) in [-1, 1] re-imagined for ``prompts``; ``strength`` in [0, 1] is how
        much of the schedule to redo (0 = the autoencoder round trip, 1 = text-to-image). ``options``: those of
        ``text_to_image`` (guidance, sampler, steps, spacing, negative_prompt, generator, ...)."""
        self._check_output(output)
        if self.is_inpainting_model:
            raise ValueError("image_to_image needs the text model (load_pipeline('shapes64-text')); an inpainting "
                             "model edits through inpaint() with a mask")
        check_option_names("image_to_image", options, image_to_image_latents, own=("strength", "output"))
        z0 = encode_images(self.vae, match_batch(prompts, check_images(images, self.vae)))
        z = image_to_image_latents(self.denoiser, self.tokenizer, prompts, z0, strength=strength, **options)
        return self._output(z, output)

    @torch.no_grad()
    def inpaint(self, prompts, images, mask, *, jumps: int = 1, keep_unmasked: bool = True, output: str = "images",
                **options) -> torch.Tensor:
        """``images`` with the ``mask`` region (B, 1, H, W) or (H, W), 1 = repaint, generated for ``prompts``.

        The text model inpaints training-free (``InpaintDenoiser``); an inpainting model through its extra input
        channels. ``jumps`` > 1 adds RePaint resampling. The mask rule: ``minidiff.inpainting``."""
        self._check_output(output)
        check_option_names("inpaint", options, inpaint_latents, own=("output",))
        images = match_batch(prompts, check_images(images, self.vae))
        z0 = encode_images(self.vae, images)
        m = pixel_to_latent_mask(mask, images, tuple(z0.shape[-2:]))
        z = inpaint_latents(self.denoiser, self.tokenizer, prompts, z0, m, jumps=jumps, keep_unmasked=keep_unmasked,
                            **options)
        return self._output(z, output)

    @torch.no_grad()
    def outpaint(self, prompts, images, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                 jumps: int = 1, output: str = "images", **options) -> torch.Tensor:
        """``images`` extended by the pixel margins (multiples of 4), the new part generated for ``prompts``
        (which describe the whole new canvas): inpainting on an enlarged latent canvas."""
        self._check_output(output)
        check_option_names("outpaint", options, inpaint_latents,
                           own=("left", "right", "top", "bottom", "jumps", "output"))
        z0 = encode_images(self.vae, match_batch(prompts, check_images(images, self.vae)))
        canvas, m = outpaint_canvas(z0, left=left, right=right, top=top, bottom=bottom, factor=self.vae.factor)
        z = inpaint_latents(self.denoiser, self.tokenizer, prompts, canvas, m, jumps=jumps, **options)
        return self._output(z, output)
