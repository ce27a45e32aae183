"""Editing measured: inpainting methods side by side, and image-to-image's strength curve.

    python benchmarks/editing.py --n 300 --out docs/images/editing.json

Two problems with exact answers (``minidiff.eval.editing``):

- **replace**: mask one object of a two-object scene and prompt for the scene with that object changed. Every
  method sees the same scenes, masks, prompts and seeds: training-free inpainting with the text model (DPM-Solver++
  2M 20 steps; DDPM 20 steps; RePaint, DDPM 20 steps x 5 jumps) and the dedicated inpainting model
  ``shapes64-inpaint`` (DPM-Solver++ 2M 20 steps) if it is installed. Columns: judge all-correct on the new
  scene, edited object right, kept object right, the rendered ideal's scores (the ceiling), mean |error| outside
  the mask beside the round trip's, seam (excess error in the 4-pixel band outside the mask), NFE, seconds.
- **recolor**: image-to-image of one-object scenes to a new colour, strength 0.2 ... 1.0: success (judge), shape
  and size kept, foreground IoU with the input (structure kept).

It prints measured numbers and writes them as JSON (and a text table beside it); it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minidiff.eval.editing import INPAINT_METHODS, evaluate_img2img, evaluate_inpainting, recolor_scenes, replace_scenes
from minidiff.pretrained import available, load_pipeline

NFE = {"training-free": 20, "training-free, DDPM": 20, "training-free + RePaint (5 jumps)": 19 * 5 + 1,
       "inpainting model": 20}


def replace_table(pipes: dict, n: int) -> dict:
    scenes, rows = replace_scenes(n, seed=0), {}
    for name, (kind, options) in INPAINT_METHODS.items():
        if kind not in pipes:
            print(f"skipping {name!r}: no {kind} pipeline installed")
            continue
        t0 = time.perf_counter()
        result = evaluate_inpainting(pipes[kind], scenes, **options)
        result.pop("images")
        rows[name] = {**{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
                      "nfe": NFE[name], "seconds": round(time.perf_counter() - t0, 1)}
    return rows


def format_tables(result: dict) -> str:
    lines = [f"replace (n = {result['n']}; DPM-Solver++ 2M unless named, guidance 5)",
             f"{'method':36s} {'all':>6s} {'edited':>7s} {'kept':>6s} {'outside':>8s} {'floor':>7s} {'seam':>7s} "
             f"{'NFE':>5s} {'s':>6s}"]
    ceiling = None
    for name, r in result["replace"].items():
        ceiling = (r["ceiling_all"], r["ceiling_edited"], r["ceiling_kept"])
        lines.append(f"{name:36s} {r['all']:6.3f} {r['edited']:7.3f} {r['kept']:6.3f} {r['outside']:8.4f} "
                     f"{r['outside_floor']:7.4f} {r['seam']:7.4f} {r['nfe']:5d} {r['seconds']:6.1f}")
    if ceiling:
        lines.append(f"{'ceiling (the ideal edit, rendered)':36s} {ceiling[0]:6.3f} {ceiling[1]:7.3f} {ceiling[2]:6.3f}")
    lines += ["", f"recolor by image-to-image (n = {result['n']}; DPM-Solver++ 2M 20 steps, guidance 5)",
              f"{'strength':>8s} {'success':>8s} {'shape+size kept':>16s} {'structure IoU':>14s}"]
    for r in result["recolor"]:
        lines.append(f"{r['strength']:8.1f} {r['success']:8.3f} {r['shape_size_kept']:16.3f} {r['structure_iou']:14.3f}")
    lines.append(f"{'ceiling':>8s} {result['recolor'][0]['ceiling']:8.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="scenes per problem")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (a .txt table is written beside it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipes = {"text": load_pipeline("shapes64-text-v1")}  # the base shapes64-inpaint was fine-tuned from
    if "shapes64-inpaint" in available():
        pipes["inpaint"] = load_pipeline("shapes64-inpaint")
    result = {"n": args.n, "replace": replace_table(pipes, args.n), "recolor": []}
    for row in evaluate_img2img(pipes["text"], recolor_scenes(args.n, seed=0)):
        row.pop("images")
        result["recolor"].append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    text = format_tables(result)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out).with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
