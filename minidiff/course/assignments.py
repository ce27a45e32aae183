"""Build the student notebooks in exercises/ from the single-source notebooks in solutions/.

    python -m minidiff.assignments build [--check] [--solutions DIR] [--exercises DIR]

A solution notebook marks student code nbgrader-style::

    def q_sample(x0, t, noise, alphas_cumprod):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

and may hide tests from students between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``. In the exercise,
a solution region becomes ``# YOUR CODE HERE`` + ``raise NotImplementedError()`` at the indentation of its
BEGIN line (``YOUR ANSWER HERE`` in a markdown cell), hidden tests disappear, and outputs and execution counts
are cleared. Cell ids and metadata (the grader's ``"minidiff": {"task": ..., "points": ...}``) are kept.
``--check`` writes nothing and exits 1 if exercises/ differs from a fresh build.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

from minidiff.utils import command_line

__all__ = ["MarkerError", "strip_source", "make_exercise", "build", "main"]

ROOT = Path(__file__).resolve().parents[2]
MARKERS = {"### BEGIN SOLUTION": ("solution", True), "### END SOLUTION": ("solution", False),
           "### BEGIN HIDDEN TESTS": ("hidden", True), "### END HIDDEN TESTS": ("hidden", False)}


class MarkerError(ValueError):
    """An unpaired or nested marker; the message names the notebook and the cell index."""


def strip_source(source: str, cell_type: str, where: str) -> str:
    """The student version of one cell's source; ``where`` ("A1.ipynb, cell 4") goes into error messages."""
    out, region, begin_line = [], None, 0
    for lineno, line in enumerate(source.splitlines(keepends=True), start=1):
        marker = MARKERS.get(line.strip())
        if marker is None:
            if region is None:
                out.append(line)
            continue
        kind, is_begin = marker
        if is_begin:
            if region is not None:
                raise MarkerError(f"{where}: line {lineno}: '{line.strip()}' inside an open {region[0]} region "
                                  f"(begun at line {begin_line}); markers cannot nest")
            region, begin_line = (kind, line[: len(line) - len(line.lstrip())]), lineno
        else:
            if region is None or region[0] != kind:
                raise MarkerError(f"{where}: line {lineno}: '{line.strip()}' without a matching BEGIN")
            if kind == "solution":
                indent = region[1]
                stub = ["YOUR ANSWER HERE\n"] if cell_type == "markdown" else \
                       [f"{indent}# YOUR CODE HERE\n", f"{indent}raise NotImplementedError()\n"]
                out.extend(stub)
            region = None
    if region is not None:
        raise MarkerError(f"{where}: line {begin_line}: '### BEGIN {'SOLUTION' if region[0] == 'solution' else 'HIDDEN TESTS'}' "
                          f"is never closed")
    text = "".join(out)
    return text[:-1] if text.endswith("\n") and not source.endswith("\n") else text


def make_exercise(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """A new notebook: ``nb`` with solutions stubbed, hidden tests removed, outputs and counts cleared."""
    ex = nbformat.from_dict(nb)
    for index, cell in enumerate(ex.cells):
        cell.source = strip_source(cell.source, cell.cell_type, f"{name}, cell {index}")
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    return ex


def _dumps(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def build(solutions: Path = ROOT / "solutions", exercises: Path = ROOT / "exercises", *,
          check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) every exercise; return the problems found (stale/missing/extra files)."""
    sources = sorted(solutions.glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no notebooks in {solutions}")
    problems, expected = [], set()
    for path in sources:
        text = _dumps(make_exercise(nbformat.read(path, as_version=4), path.name))
        target = exercises / path.name
        expected.add(path.name)
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        problems.append(f"{target}: {'missing' if current is None else 'out of date'}")
        if not check:
            exercises.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    extra = [p for p in sorted(exercises.glob("*.ipynb")) if p.name not in expected]
    problems += [f"{p}: has no source in {solutions}" for p in extra]
    return problems


@command_line("python -m minidiff.assignments")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidiff.assignments", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate exercises/ from solutions/")
    b.add_argument("--check", action="store_true", help="write nothing; exit 1 if exercises/ is out of date")
    b.add_argument("--solutions", type=Path, default=ROOT / "solutions")
    b.add_argument("--exercises", type=Path, default=ROOT / "exercises")
    args = parser.parse_args(argv)
    try:
        problems = build(args.solutions, args.exercises, check=args.check)
    except (MarkerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        for p in problems:
            print(p)
        print("exercises/ is up to date" if not problems else "run: python -m minidiff.assignments build")
        return 1 if problems else 0
    for p in problems:
        print(f"wrote {p.split(':')[0]}" if "has no source" not in p else f"warning: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
