"""Execute lectures top to bottom in a fresh kernel (full size unless --smoke), time them, export their figures and
what they printed.

Each figure a cell displays is written to ``OUT/<notebook>-<cell>-<k>.png``, the timings go to ``OUT/timings.json``
and the printed text to ``OUT/<notebook>-printed.txt``.
The README shows a few of these figures, so a reader sees what the course produces.

With ``--executed DIR`` the executed notebooks themselves (every output kept) are written to ``DIR``: the rendered
course, readable with its figures on GitHub or in any notebook viewer before anything is run. ``DIR/README.md``
indexes them with their run times and sizes. The rendered course is made with:

    python benchmarks/run_lectures.py notebooks/0[0-5]*.ipynb --out docs/images --executed docs/course
    python benchmarks/run_lectures.py notebooks/06_cifar10.ipynb --smoke --out docs/images --executed docs/course

(lecture 06's full recipe needs a GPU; on a CPU it is rendered from its smoke run, and its index entry says so;
so is any lecture whose full run did not fit a session, such as 04's three 600-step trainings, about 25 minutes).

Run:
    python benchmarks/run_lectures.py notebooks/01_forward_process.ipynb notebooks/03_samplers.ipynb --out docs/images
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient


def execute(path: Path, *, smoke: bool, timeout: int) -> tuple[nbformat.NotebookNode, float]:
    """Run the notebook in a fresh kernel from its own folder; errors propagate (no cell may fail)."""
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, MINIDIFF_SMOKE="1" if smoke else "0")
    os.environ.update(env)  # the kernel inherits this process's environment
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.time()
    client.execute()
    return nb, time.time() - start


def export_figures(nb: nbformat.NotebookNode, stem: str, out: Path) -> list[str]:
    """Write every image/png output as a file; return the file names."""
    names = []
    for i, cell in enumerate(nb.cells):
        for k, output in enumerate(cell.get("outputs", [])):
            png = output.get("data", {}).get("image/png")
            if png:
                name = f"{stem}-cell{i:02d}-{k}.png"
                (out / name).write_bytes(base64.b64decode(png))
                names.append(name)
    return names


def printed_text(nb: nbformat.NotebookNode) -> str:
    """Everything the cells printed (stream and text results), cell by cell, for quoting measured numbers."""
    parts = []
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                continue  # progress bars and warnings
            if output.get("output_type") == "stream":
                text = output.get("text", "")
            else:  # execute_result / display_data; skip reprs such as "<Figure size ...>"
                text = output.get("data", {}).get("text/plain", "")
            if text and not text.startswith("<"):
                parts.append(f"--- cell {i} ---\n{text.rstrip()}\n")
    return "\n".join(parts)


MAX_BYTES = 3_000_000  # a rendered lecture must stay readable on GitHub


def write_executed(nb: nbformat.NotebookNode, path: Path, folder: Path, *, seconds: float, smoke: bool) -> Path:
    """Write the executed notebook to ``folder`` and (re)write the index ``folder/README.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    nb.metadata["minidiff_run"] = {"seconds": round(seconds, 1), "smoke": smoke,
                                   "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                   "date": time.strftime("%Y-%m-%d")}
    target = folder / path.name
    nbformat.write(nb, target)
    size = target.stat().st_size
    if size > MAX_BYTES:
        print(f"WARNING: {target} is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit", flush=True)
    rows = []
    for p in sorted(folder.glob("*.ipynb")):
        run = nbformat.read(p, as_version=4).metadata.get("minidiff_run", {})
        mode = "smoke run (CI size; see the docstring)" if run.get("smoke") else "full run"
        rows.append(f"| [{p.stem}]({p.name}) | {mode} | {run.get('seconds', 0) / 60:.1f} min | "
                    f"{p.stat().st_size / 1e6:.2f} MB | {run.get('machine', '')}, {run.get('date', '')} |")
    (folder / "README.md").write_text(
        "# The course, rendered\n\nEvery lecture executed top to bottom in a fresh kernel, with all its outputs, by\n"
        "`benchmarks/run_lectures.py --executed docs/course` (see its docstring for the exact commands).\n"
        "The explorers are live widgets: they need a running kernel, so here they show only their controls.\n\n"
        "| lecture | run | time | size | machine |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--smoke", action="store_true", help="run with MINIDIFF_SMOKE=1 (as CI does)")
    parser.add_argument("--timeout", type=int, default=3600, help="per-cell time limit in seconds")
    parser.add_argument("--executed", type=Path, default=None, help="also write the executed notebooks here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    timings_path = args.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for path in args.notebooks:
        nb, seconds = execute(path, smoke=args.smoke, timeout=args.timeout)
        figures = export_figures(nb, path.stem, args.out)
        timings[path.stem] = {"seconds": round(seconds, 1), "smoke": args.smoke, "figures": len(figures),
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads "
                                         f"{torch.get_num_threads()}, cuda={torch.cuda.is_available()}"}
        (args.out / f"{path.stem}-printed.txt").write_text(printed_text(nb))
        if args.executed is not None:
            write_executed(nb, path, args.executed, seconds=seconds, smoke=args.smoke)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")  # after each lecture, so a later failure keeps it
        print(f"{path.name}: {seconds:.0f} s, {len(figures)} figures -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
