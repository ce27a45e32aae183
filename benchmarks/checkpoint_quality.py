"""Quality table of a shipped class-conditional checkpoint (issue 4), printed and optionally stored in its model card.

For each (sampler, steps) row and guidance scale, generate ``n`` class-balanced samples with the same seed and
score them with the shipped Fashion-MNIST classifier: classifier-FID (with the real-vs-real floor at the same n),
class accuracy, precision and recall (Kynkaanniemi et al. 2019).

Run:
    OMP_NUM_THREADS=2 python benchmarks/checkpoint_quality.py --checkpoint fashion-mnist-cond --n 200 \
        --card minidiff/weights/fashion-mnist-cond.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from minidiff import pretrained
from minidiff.evaluate import evaluate

# (sampler, steps, spacing): the rows the issue asks for. Heun with 10 steps makes 19 network calls. The few-step
# rows run with both timestep spacings: "leading" (DDIM's original, first step at t = T - T/n) and "trailing"
# (first step at t = T - 1; Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
# Sec. 3.3). At 1000 steps both spacings give every timestep, so DDPM-1000 runs once.
FEW_STEP = [("ddim", 50), ("euler", 20), ("heun", 10), ("dpmpp_2m", 10), ("dpmpp_2m", 20)]
ROWS = [("ddpm", 1000, "trailing")] + [(s, n, "trailing") for s, n in FEW_STEP] + [(s, n, "leading") for s, n in FEW_STEP]


def run(checkpoint: str, n: int, guidances: list[float], seed: int, batch_size: int) -> list[dict]:
    denoiser = pretrained.load(checkpoint)
    rows = []
    for guidance in guidances:
        for sampler, steps, spacing in ROWS:
            start = time.time()
            r = evaluate(denoiser, dataset="fashion-mnist", sampler=sampler, steps=steps, guidance=guidance,
                         n=n, seed=seed, batch_size=batch_size, progress=False, spacing=spacing)
            r["spacing"] = spacing
            r["eval_wall_s"] = round(time.time() - start, 1)
            rows.append(r)
            print(format_row(r), flush=True)
    return rows


def format_row(r: dict) -> str:
    return (f"| {r['sampler']:8s} | {r['spacing']:8s} | {r['steps']:4d} | {r['nfe']:4d} | {r['guidance']:3.1f} | {r['fid']:7.2f} | "
            f"{r['fid_floor']:5.2f} | {100 * r['class_accuracy']:5.1f}% | {r['precision']:5.3f} | {r['recall']:5.3f} |"
            f" {r['wall_time_s']:6.0f} |")


HEADER = ("| sampler  | spacing  | steps | NFE | guidance | FID | floor | class acc | precision | recall | gen s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def verdict(rows: list[dict]) -> str:
    """The issue's bar: accuracy >= 85% at guidance 3 with DPM++ 2M/20, FID within 3x of DDPM-1000's."""
    at = {(r["sampler"], r["steps"], r["spacing"], r["guidance"]): r for r in rows}
    dpm, ddpm = at.get(("dpmpp_2m", 20, "trailing", 3.0)), at.get(("ddpm", 1000, "trailing", 3.0))
    if dpm is None or ddpm is None:
        return "bar not evaluated (needs guidance 3 rows)"
    acc_ok, fid_ok = dpm["class_accuracy"] >= 0.85, dpm["fid"] <= 3 * ddpm["fid"]
    return (f"DPM++ 2M/20 (trailing) at guidance 3: class accuracy {100 * dpm['class_accuracy']:.1f}% (>= 85%: {acc_ok}); "
            f"FID {dpm['fid']:.2f} vs DDPM-1000 {ddpm['fid']:.2f} (within 3x: {fid_ok})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="fashion-mnist-cond")
    parser.add_argument("--n", type=int, default=200, help="samples per row (FID is biased upward for small n)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--card", default=None, help="model card JSON to store the table in (key 'metrics')")
    args = parser.parse_args(argv)
    print(f"checkpoint {args.checkpoint}, n = {args.n} per row, seed {args.seed}, "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(HEADER)
    start = time.time()
    rows = run(args.checkpoint, args.n, args.guidance, args.seed, args.batch_size)
    print(verdict(rows))
    print(f"(took {time.time() - start:.0f} s)")
    if args.card:
        card_path = Path(args.card)
        card = json.loads(card_path.read_text())
        card["metrics"] = {"command": "python benchmarks/checkpoint_quality.py " + " ".join(argv or []),
                           "n_per_row": args.n, "feature_net": "classifier-fashion-mnist (shipped)",
                           "rows": rows, "verdict": verdict(rows)}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"stored in {card_path}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
