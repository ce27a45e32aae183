"""Measuring edits: does the edit do what the prompt asks, and does the rest of the picture survive?

Two test problems with exact answers, built from the shapes renderer (so the perfect edit can be rendered):

- **replace** (inpainting): a two-object scene; the mask is the box of one object (plus a 0.02 margin); the
  prompt is the scene's caption with that object changed to another (shape, colour) of the same size. The ideal
  result is the new scene rendered at the same layout, which the judge scores as the ceiling.
- **recolor** (image-to-image): a one-object scene and the caption with a new colour; success is the judge's
  all-correct on the new caption, and *structure kept* is the IoU of the foreground (non-background pixels)
  with the input's: SDEdit's trade-off between faithfulness to the prompt and to the input (Meng et al. 2022).

Preservation and seams are measured in pixels against the autoencoder's round trip, the floor any latent edit
has: ``outside`` is the mean absolute error outside the mask (the round trip's beside it), ``seam`` the excess
error over the round trip in the 4-pixel band just outside the mask (where decoder bleed and mismatched
content show), ``far`` the excess beyond that band (0 if the known latent cells are kept exactly).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from minidiff.data.shapes import (BACKGROUND_RGB, COLORS, RELATIONS, SHAPES, caption, held_out_mask,
                                  object_box_mask, render_layout, sample_layout)
from minidiff.eval.classifiers import load_classifier
from minidiff.eval.text import judge, prompt_attrs

__all__ = ["replace_scenes", "recolor_scenes", "foreground", "foreground_iou", "object_correct", "round_trip",
           "preservation", "evaluate_inpainting", "evaluate_img2img", "INPAINT_METHODS"]

INPAINT_METHODS = {  # name -> (pipeline kind, pipe.inpaint options)
    "training-free": ("text", {"sampler": "dpmpp_2m"}),
    "training-free, DDPM": ("text", {"sampler": "ddpm"}),
    "training-free + RePaint (5 jumps)": ("text", {"jumps": 5}),
    "inpainting model": ("inpaint", {"sampler": "dpmpp_2m"}),
}


def _layouts(attrs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.stack([sample_layout(a, generator=g) for a in attrs])


def _new_object(a: torch.Tensor, slot: int, g: torch.Generator, *, change: str) -> torch.Tensor:
    """``a`` with object ``slot``'s colour (``change="color"``) or (shape, colour) redrawn: different, and no
    held-out (colour, shape) pair, so the edit asks only for combinations the model saw."""
    while True:
        b = a.clone()
        b[3 * slot + 1] = int(torch.randint(len(COLORS), (), generator=g))
        if change == "shape+color":
            b[3 * slot] = int(torch.randint(len(SHAPES), (), generator=g))
        if not torch.equal(b, a) and not held_out_mask(b[None])[0]:
            return b


def replace_scenes(n: int, *, seed: int = 0) -> dict:
    """The replace problem: images, target attrs and captions, masks (n, 1, 64, 64), the edited slot, the ideal."""
    g = torch.Generator().manual_seed(seed)
    attrs = prompt_attrs(n, objects=2, split="seen", seed=seed)
    centres = _layouts(attrs, g)
    slot = torch.randint(2, (n,), generator=g)
    target = torch.stack([_new_object(a, int(k), g, change="shape+color") for a, k in zip(attrs, slot)])
    return {"images": render_layout(attrs, centres), "attrs": attrs, "target": target, "slot": slot,
            "prompts": [caption(t) for t in target], "mask": object_box_mask(attrs, centres, slot),
            "ideal": render_layout(target, centres)}


def recolor_scenes(n: int, *, seed: int = 0) -> dict:
    """The recolor problem: one-object images, the caption with a new colour, and the ideal result."""
    g = torch.Generator().manual_seed(seed)
    attrs = prompt_attrs(n, objects=1, split="seen", seed=seed)
    centres = _layouts(attrs, g)
    target = torch.stack([_new_object(a, 0, g, change="color") for a in attrs])
    return {"images": render_layout(attrs, centres), "attrs": attrs, "target": target,
            "prompts": [caption(t) for t in target], "ideal": render_layout(target, centres)}


def foreground(images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """(n, 1, H, W) bool: pixels whose largest channel differs from the background colour by > threshold."""
    background = (BACKGROUND_RGB * 2 - 1).view(1, 3, 1, 1).to(images)
    return ((images - background).abs().amax(dim=1, keepdim=True) > threshold)


def foreground_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) IoU of the foregrounds of two image batches (1 where both are empty)."""
    fa, fb = foreground(a).flatten(1), foreground(b.to(a.device)).flatten(1)
    union = (fa | fb).sum(1)
    return torch.where(union > 0, (fa & fb).sum(1) / union.clamp(min=1), torch.ones(len(a), device=a.device))


def object_correct(result: dict, attrs: torch.Tensor, slot: torch.Tensor,
                   heads=("shape", "color", "size")) -> torch.Tensor:
    """(n,) bool: ``judge``'s heads right for object ``slot`` (n,) in {0, 1} of ``attrs`` (n, 7). The judge orders
    the objects canonically (``attrs_to_targets``: "A below B" is judged as "B above A"), so slot k of a pair
    with relation "below" or "right of" is the judge's object 2 - k."""
    swapped = (attrs[:, 6] == RELATIONS.index("below")) | (attrs[:, 6] == RELATIONS.index("right of"))
    judged = torch.where(swapped, 1 - slot, slot) + 1  # 1 or 2
    return torch.stack([torch.where(judged == 1, result[f"{h}1"], result[f"{h}2"]) for h in heads]).all(0)


def _ring(mask: torch.Tensor, width: int) -> torch.Tensor:
    grown = nn.functional.max_pool2d(mask, 2 * width + 1, stride=1, padding=width)
    return (grown > 0) & (mask == 0)


def _mean(err: torch.Tensor, where: torch.Tensor) -> float:
    where = where.expand_as(err)
    return float(err[where].mean()) if where.any() else 0.0


def preservation(out: torch.Tensor, images: torch.Tensor, round_trip: torch.Tensor, mask: torch.Tensor) -> dict:
    """Pixel errors outside the mask (module docstring): outside, its round-trip floor, seam and far excess."""
    err, floor = (out - images).abs(), (round_trip - images).abs()
    ring, outside = _ring(mask, 4), mask == 0
    far = outside & ~ring
    return {"outside": _mean(err, outside), "outside_floor": _mean(floor, outside),
            "seam": _mean(err, ring) - _mean(floor, ring), "far": _mean(err, far) - _mean(floor, far)}


def _in_chunks(fn, n: int, chunk: int, desc: str, progress: bool) -> torch.Tensor:
    """fn on slices of ``chunk`` items, results on the CPU (where the judge and the references live)."""
    return torch.cat([fn(slice(i, i + chunk)).cpu() for i in tqdm(range(0, n, chunk), desc=desc,
                                                                  disable=not progress)])


def round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's round trip of CPU ``images``, on the CPU: the floor of every latent edit."""
    device = next(vae.parameters()).device
    return vae.decode_latents(vae.encode_latents(images.to(device))).cpu()


@torch.no_grad()
def evaluate_inpainting(pipe, scenes: dict, *, guidance: float = 5.0, steps: int = 20, seed: int = 0,
                        chunk: int = 100, progress: bool = True, **options) -> dict:
    """The replace problem through ``pipe.inpaint(**options)``: judge (all, edited object, kept object) and pixels."""
    n = len(scenes["prompts"])
    g = torch.Generator().manual_seed(seed)
    out = _in_chunks(lambda s: pipe.inpaint(scenes["prompts"][s], scenes["images"][s], scenes["mask"][s],
                                            guidance=guidance, steps=steps, generator=g, progress=False, **options),
                     n, chunk, "inpainting", progress)
    floor = round_trip(pipe.vae, scenes["images"])
    classifier = load_classifier("shapes")
    ok, ideal = judge(out, scenes["target"], classifier), judge(scenes["ideal"], scenes["target"], classifier)

    def slot_ok(result, which):
        slot = scenes["slot"] if which == "edited" else 1 - scenes["slot"]
        return float(object_correct(result, scenes["target"], slot).double().mean())
    return {"all": float(ok["all"].double().mean()), "edited": slot_ok(ok, "edited"), "kept": slot_ok(ok, "kept"),
            "ceiling_all": float(ideal["all"].double().mean()), "ceiling_edited": slot_ok(ideal, "edited"),
            "ceiling_kept": slot_ok(ideal, "kept"),
            **preservation(out, scenes["images"], floor, scenes["mask"]), "n": n, "images": out}


@torch.no_grad()
def evaluate_img2img(pipe, scenes: dict, strengths=(0.2, 0.4, 0.6, 0.8, 1.0), *, guidance: float = 5.0,
                     steps: int = 20, seed: int = 0, chunk: int = 100, progress: bool = True) -> list[dict]:
    """The recolor problem at each strength: success (judge all-correct) and structure kept (foreground IoU)."""
    classifier, rows, n = load_classifier("shapes"), [], len(scenes["prompts"])
    ceiling = float(judge(scenes["ideal"], scenes["target"], classifier)["all"].double().mean())
    for strength in strengths:
        g = torch.Generator().manual_seed(seed)
        out = _in_chunks(lambda s: pipe.image_to_image(scenes["prompts"][s], scenes["images"][s], strength=strength,
                                                       guidance=guidance, steps=steps, generator=g, progress=False),
                         n, chunk, f"strength {strength}", progress)
        ok = judge(out, scenes["target"], classifier)
        rows.append({"strength": strength, "success": float(ok["all"].double().mean()),
                     "shape_size_kept": float((ok["shape"] & ok["size"]).double().mean()),
                     "structure_iou": float(foreground_iou(out, scenes["images"]).mean()), "ceiling": ceiling,
                     "n": n, "images": out[:8]})
    return rows
