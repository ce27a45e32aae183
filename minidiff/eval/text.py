"""Judging a text-to-image model: does each image show what its prompt says? (GenEval-style, per slot.)

The judge is the shipped shapes attribute classifier (``load_classifier("shapes")``), never the model's own text
encoder: it reads shape, colour and size of each object and their relation from the image (at the classifier's
32x32, average-pooled from 64x64). For a prompt with attributes a (7,) and a generated image it checks each slot:

| slot       | correct when                                                              |
|------------|---------------------------------------------------------------------------|
| shape      | both shape heads match (for one object: shape1, and shape2 = "absent")    |
| color      | both colour heads match                                                   |
| size       | both size heads match                                                     |
| relation   | the relation head matches ("absent" for one object)                       |
| all        | every head matches: the GenEval criterion (Ghosh et al. 2023)             |

The same judge applied to real images rendered from the same prompts gives the *ceiling*: what a perfect model
would score with this judge (the relation of a diagonal pair is ambiguous, for one). Prompts come in four sets:
one or two objects, with every (colour, shape) pair seen in training, or with at least one pair from
``data.shapes.HELD_OUT`` (compositional generalisation: the colour and the shape were seen, never together).
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from minidiff.data.shapes import COLORS, SHAPES, caption, held_out_mask, render, sample_attrs
from minidiff.eval.autoencoder import to_classifier_size
from minidiff.eval.classifiers import attrs_to_targets, extract_features, load_classifier
from minidiff.eval.metrics import frechet_distance_from_features

__all__ = ["SLOTS", "prompt_attrs", "real_images", "judge", "summarize", "generate_for", "evaluate_cell",
           "evaluate_text_model"]

SLOTS = {"shape": ("shape1", "shape2"), "color": ("color1", "color2"), "size": ("size1", "size2"),
         "relation": ("relation",)}


def prompt_attrs(n: int, *, objects: int, split: str, seed: int = 0) -> torch.Tensor:
    """(n, 7) random prompt attributes with ``objects`` in (1, 2), from the "seen" or "held_out" combinations."""
    if objects not in (1, 2) or split not in ("seen", "held_out"):
        raise ValueError(f"objects must be 1 or 2 and split 'seen' or 'held_out', got {objects!r}, {split!r}")
    g, rows = torch.Generator().manual_seed(seed), []
    while len(rows) < n:
        a = sample_attrs(max_objects=2, generator=g)
        if (int(a[3] >= 0) + 1) == objects and bool(held_out_mask(a[None])[0]) == (split == "held_out"):
            rows.append(a)
    return torch.stack(rows) if rows else torch.empty(0, 7, dtype=torch.int64)


def real_images(attrs: torch.Tensor, *, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Real renders (n, 3, size, size) of each prompt, at random positions (``seed``): the judge's ceiling."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([render(a, size, generator=g) for a in attrs])


@torch.no_grad()
def judge(images: torch.Tensor, attrs: torch.Tensor, classifier=None) -> dict:
    """Per-image correctness (n,) bool of every head, every slot and "all" for images (n, 3, H, W) vs attrs (n, 7)."""
    classifier = classifier or load_classifier("shapes")
    if len(images) != len(attrs):
        raise ValueError(f"need one attrs row per image, got {len(images)} images and {len(attrs)} attrs")
    heads = classifier.config.heads
    targets = attrs_to_targets(attrs, heads)
    logits = [classifier.logits(to_classifier_size(chunk.float()))
              for chunk in images.clamp(-1, 1).split(500)]
    ok = {name: torch.cat([lg[name] for lg in logits]).argmax(1) == targets[:, j] for j, name in enumerate(heads)}
    out = {slot: torch.stack([ok[h] for h in hs]).all(0) for slot, hs in SLOTS.items()}
    out["all"] = torch.stack(list(ok.values())).all(0)
    return {**ok, **out}


def summarize(correct: dict) -> dict:
    """Fractions of ``judge``'s slots (and "all"), rounded to 4 digits."""
    return {k: round(float(correct[k].double().mean()), 4) for k in (*SLOTS, "all")}


def generate_for(pipe, attrs: torch.Tensor, *, guidance: float, sampler: str = "dpmpp_2m", steps: int = 20,
                 seed: int = 0, batch_size: int = 100, progress: bool = True) -> torch.Tensor:
    """Images (n, 3, 64, 64) for the captions of ``attrs``, in batches with one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    prompts = [caption(a) for a in attrs]
    chunks = []
    for k in tqdm(range(0, len(prompts), batch_size), desc=f"{sampler} {steps} steps, w={guidance}",
                  disable=not progress):
        chunks.append(pipe.text_to_image(prompts[k:k + batch_size], guidance=guidance, sampler=sampler,
                                         steps=steps, generator=g, progress=False).cpu())
    return torch.cat(chunks)


def evaluate_cell(pipe, attrs, *, guidance: float, sampler: str = "dpmpp_2m", steps: int = 20, seed: int = 0,
                  classifier=None, progress: bool = True) -> dict:
    """Scores of one (prompt set, guidance, sampler, steps) cell: summarize(judge(generated))."""
    images = generate_for(pipe, attrs, guidance=guidance, sampler=sampler, steps=steps, seed=seed, progress=progress)
    return {"n": len(attrs), "guidance": guidance, "sampler": sampler, "steps": steps,
            **summarize(judge(images, attrs, classifier))}


def evaluate_text_model(pipe, *, n: int = 300, guidance: float = 5.0, guidances=(1.0, 3.0, 5.0, 7.0),
                        samplers=(("dpmpp_2m", 10), ("dpmpp_2m", 20), ("euler", 20), ("ddim", 20), ("heun", 10)),
                        clip=None, progress: bool = True) -> dict:
    """The model card's table: per-slot scores for 1/2 objects x seen/held-out at ``guidance`` with the ceiling,
    all-correct vs guidance and vs sampler/steps, classifier-FID against real scenes, and the tiny-CLIP score."""
    t0 = time.perf_counter()
    classifier = load_classifier("shapes")
    sets = {f"{o}obj_{s}": prompt_attrs(n, objects=o, split=s, seed=10 + 2 * o + (s == "held_out"))
            for o in (1, 2) for s in ("seen", "held_out")}
    table, generated = {}, {}
    for name, attrs in sets.items():
        generated[name] = generate_for(pipe, attrs, guidance=guidance, progress=progress)
        table[name] = {"n": len(attrs), **summarize(judge(generated[name], attrs, classifier)),
                       "ceiling": summarize(judge(real_images(attrs, seed=1), attrs, classifier))}
    def all_correct(name: str, w: float, sampler: str, steps: int) -> float:
        if (w, sampler, steps) == (guidance, "dpmpp_2m", 20):  # the main cell, already generated
            return table[name]["all"]
        return evaluate_cell(pipe, sets[name], guidance=w, sampler=sampler, steps=steps, classifier=classifier,
                             progress=progress)["all"]
    vs_guidance = {f"w={w}": {k: all_correct(k, w, "dpmpp_2m", 20) for k in ("1obj_seen", "2obj_seen")}
                   for w in guidances}
    vs_sampler = {f"{s} {st}": {k: all_correct(k, guidance, s, st) for k in ("1obj_seen", "2obj_seen")}
                  for s, st in samplers}
    one = torch.cat([sets["1obj_seen"], sets["1obj_held_out"]])
    one_ok = judge(torch.cat([generated["1obj_seen"], generated["1obj_held_out"]]), one, classifier)["all"]
    out_bias = {"per_color": {c: round(float(one_ok[one[:, 1] == k].double().mean()), 3) for k, c in enumerate(COLORS)},
                "per_shape": {s: round(float(one_ok[one[:, 0] == k].double().mean()), 3) for k, s in enumerate(SHAPES)}}
    fake = torch.cat([generated["1obj_seen"], generated["2obj_seen"]])
    real = real_images(torch.cat([sets["1obj_seen"], sets["2obj_seen"]]), seed=2)
    real2 = real_images(torch.cat([sets["1obj_seen"], sets["2obj_seen"]]), seed=3)
    feats = [extract_features(classifier, to_classifier_size(x)) for x in (real, fake, real2)]
    out = {"guidance": guidance, "sampler": "dpmpp_2m", "steps": 20, "per_slot": table,
           "all_correct_vs_guidance": vs_guidance, "all_correct_vs_sampler": vs_sampler,
           "one_object_all_correct_by_attribute": out_bias,
           "fid_classifier": round(frechet_distance_from_features(feats[0], feats[1]), 3),
           "fid_floor": round(frechet_distance_from_features(feats[0], feats[2]), 3)}
    if clip is not None:
        from minidiff.models.clip import clip_score
        prompts = [caption(a) for a in torch.cat([sets["1obj_seen"], sets["2obj_seen"]])]
        out["clip_score"] = {"generated": round(float(clip_score(clip, fake, prompts).mean()), 2),
                             "real": round(float(clip_score(clip, real, prompts).mean()), 2)}
    out["eval_wall_time_s"] = round(time.perf_counter() - t0, 1)
    return out
