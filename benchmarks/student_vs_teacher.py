"""A distilled few-step student against its teacher (issue 18): classifier-FID, class accuracy, precision and recall
per sampler and NFE at guidance 1, one table, and the issue's bar checked on the measured rows.

The student samples with DDIM on the trailing grid (what progressive distillation trains it for); the teacher with any ``SAMPLERS`` entry, given as
``sampler:NFE``. Every row draws the same class-balanced labels and noise seed (``flow_vs_diffusion.run``).
Bar (issue 18): the student at 4 NFE has classifier-FID <= 1.5x the teacher's at ``--reference`` and class
accuracy >= 95% of it.

Run (the shipped card's table):
    OMP_NUM_THREADS=2 python benchmarks/student_vs_teacher.py --student fashion-mnist-cond-4step \\
        --teacher fashion-mnist-cond-fm --student-nfe 1 2 4 8 --teacher-rows dpmpp_2m:20 ddim:4 ddim:20 dpmpp_2m:1000 \\
        --n 300 --card minidiff/weights/fashion-mnist-cond-4step.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flow_vs_diffusion beside this file

import torch  # noqa: E402

from flow_vs_diffusion import run, table  # noqa: E402


def teacher_rows(specs: list[str]) -> list[tuple[str, int]]:
    """``["dpmpp_2m:20", ...]`` -> [("dpmpp_2m", 20), ...]."""
    out = []
    for spec in specs:
        sampler, _, nfe = spec.partition(":")
        if not nfe.isdigit() or int(nfe) < 1:
            raise SystemExit(f"--teacher-rows: expected SAMPLER:NFE like dpmpp_2m:20, got {spec!r}")
        out.append((sampler, int(nfe)))
    return out


def bar(rows: list[dict], student: str, reference: tuple[str, int]) -> dict:
    """The issue's bar at 4 NFE, from the measured rows: FID ratio <= 1.5 and accuracy ratio >= 0.95."""
    ref = next(r for r in rows if r["role"] == "teacher" and (r["sampler"], r["nfe"]) == reference)
    four = next(r for r in rows if r["role"] == "student" and r["nfe"] == 4)
    fid_ratio, acc_ratio = four["fid"] / ref["fid"], four["acc"] / ref["acc"]
    return {"student": student, "reference": f"teacher {reference[0]} {reference[1]} NFE",
            "fid_ratio": round(fid_ratio, 3), "acc_ratio": round(acc_ratio, 3),
            "met": bool(fid_ratio <= 1.5 and acc_ratio >= 0.95)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student-sampler", default="ddim")
    p.add_argument("--student-nfe", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--teacher-rows", nargs="+", default=["dpmpp_2m:20", "ddim:4"])
    p.add_argument("--reference", default="dpmpp_2m:20", help="the teacher row the bar compares with")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--card", default=None, help="model card JSON to store the rows in (key 'student_vs_teacher')")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for sampler, nfe in teacher_rows(args.teacher_rows):
        rows += [{**r, "role": "teacher"} for r in run([args.teacher], [sampler], [nfe], [1.0], args.n, args.seed,
                                                       args.batch_size)]
    rows += [{**r, "role": "student"} for r in run([args.student], [args.student_sampler], args.student_nfe, [1.0],
                                                   args.n, args.seed, args.batch_size)]
    print(table(rows))
    result = bar(rows, args.student, teacher_rows([args.reference])[0])
    print(f"bar at 4 NFE vs {result['reference']}: FID ratio {result['fid_ratio']:.2f} (<= 1.5), accuracy ratio "
          f"{result['acc_ratio']:.3f} (>= 0.95): {'met' if result['met'] else 'MISSED'}")
    if args.card:
        card = json.loads(Path(args.card).read_text())
        card["student_vs_teacher"] = {"command": "python benchmarks/student_vs_teacher.py " + " ".join(argv or []),
                                      "rows": rows, "bar": result}
        Path(args.card).write_text(json.dumps(card, indent=2) + "\n")
        print(f"stored in {args.card}: {len(rows)} rows")


if __name__ == "__main__":
    main(sys.argv[1:])
