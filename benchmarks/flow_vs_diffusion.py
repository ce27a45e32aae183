"""Flow matching vs diffusion on the same U-Net, data and budget (issue 18): quality against the number of network
evaluations (NFE), printed as one table.

For each model, sampler and NFE, generate ``n`` class-balanced samples with the same seed at guidance 1 (and any
other scale asked for) and score them with the shipped Fashion-MNIST classifier: classifier-FID (with the real-vs-
real floor at the same n), class accuracy, precision and recall. Euler and DPM-Solver++(2M) make one network call
per step, so steps = NFE; the trailing spacing starts at t = T - 1 (pure noise for the flow model, whose straight
path ends at t = 1).

Run:
    OMP_NUM_THREADS=1 python benchmarks/flow_vs_diffusion.py \
        --models fashion-mnist-cond fashion-mnist-cond-fm --nfe 5 10 20 50 --n 300 --out /tmp/flow_vs_diffusion.json
A model is a shipped name (``pretrained.load``) or the path of an exported ``.safetensors`` (x0_hat clipped to
[-1, 1] like the shipped pixel models).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minidiff import pretrained
from minidiff.eval.evaluation import evaluate
from minidiff.training.checkpoint import load_model


def load(spec: str):
    """A shipped model by name, or an exported file by path, as a pixel ``Denoiser`` with clipped x0_hat."""
    if spec.endswith(".safetensors") or Path(spec).exists():
        return load_model(spec, clip_x0=True)
    return pretrained.load(spec)


def run(models: list[str], samplers: list[str], nfes: list[int], guidances: list[float], n: int, seed: int,
        batch_size: int) -> list[dict]:
    rows = []
    for spec in models:
        denoiser = load(spec)
        for w in guidances:
            for sampler in samplers:
                for nfe in nfes:
                    t0 = time.time()
                    r = evaluate(denoiser, dataset="fashion-mnist", sampler=sampler, steps=nfe, guidance=w, n=n,
                                 seed=seed, batch_size=batch_size, progress=False, spacing="trailing")
                    row = {"model": spec, "prediction": denoiser.prediction, "sampler": sampler, "nfe": nfe,
                           "guidance": w, "fid": r["fid"], "fid_floor": r["fid_floor"], "acc": r["class_accuracy"],
                           "precision": r["precision"], "recall": r["recall"], "n": n,
                           "seconds": round(time.time() - t0, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per (model, guidance, sampler, NFE)."""
    out = ["| model | prediction | guidance | sampler | NFE | classifier-FID | / floor | class acc | precision | recall |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {Path(r['model']).stem} | {r['prediction']} | {r['guidance']:g} | {r['sampler']} | {r['nfe']} "
                   f"| {r['fid']:.2f} | {r['fid'] / r['fid_floor']:.2f}x | {100 * r['acc']:.1f}% "
                   f"| {r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["fashion-mnist-cond-eps", "fashion-mnist-cond-fm"])
    p.add_argument("--samplers", nargs="+", default=["euler", "dpmpp_2m"])
    p.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20, 50])
    p.add_argument("--guidance", nargs="+", type=float, default=[1.0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--card", default=None, help="model card JSON to store the rows in (key 'flow_vs_diffusion')")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.models, args.samplers, args.nfe, args.guidance, args.n, args.seed, args.batch_size)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.card:
        card = json.loads(Path(args.card).read_text())
        card["flow_vs_diffusion"] = {"command": "python benchmarks/flow_vs_diffusion.py " + " ".join(argv or []),
                                     "rows": rows}
        Path(args.card).write_text(json.dumps(card, indent=2) + "\n")
        print(f"stored in {args.card}: {len(rows)} rows")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
