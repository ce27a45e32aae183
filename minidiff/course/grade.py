"""Grade submitted assignment notebooks: run each in a fresh kernel and re-run every check on what it defined.

    python -m minidiff.grade SUBMISSION.ipynb [...] --out reports/ [--timeout 120] [--cell-timeout 60]

For each notebook: execute every code cell in a fresh kernel (errors do not stop later cells; a cell running past
``--cell-timeout`` is interrupted; cells after the ``--timeout`` budget are skipped; a dead kernel is restarted
and the earlier cells replayed, without the one that killed it). Then a fresh Python process imports the installed
minidiff's checks first, executes only the definitions of the cells that ran (``course/recheck.py``), and re-runs
the check of every task on those functions: points come from this re-run, never from what the notebook printed or
logged, and nothing a student cell did to files, ``sys.path``, import hooks or ``torch`` reaches it. Writes ``OUT/<name>.json``,
``OUT/<name>.txt``, ``OUT/<name>.executed.ipynb`` and, for all notebooks, ``OUT/summary.csv``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from minidiff.course import checks
from minidiff.course.recheck import recheck, suspicious_lines
from minidiff.utils import command_line

__all__ = ["grade_notebook", "grade_all", "main"]

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
RECHECK_SECONDS = 30  # per task, inside the grader's own cell
PREAMBLE = "import torch\nimport minidiff.course.checks"
TIMEOUT_ERROR = {"ename": "CellTimeoutError", "evalue": "cell interrupted by the grader's time limit", "traceback": []}


def _assignment(nb, path: Path) -> str | None:
    """The assignment id: notebook metadata, else the tasks named in cell metadata, else the file name prefix."""
    known = {name.split(".")[0] for name in checks.TASKS}
    meta = nb.metadata.get("minidiff", {}).get("assignment")
    if meta in known:
        return meta
    for cell in nb.cells:
        task = cell.metadata.get("minidiff", {}).get("task", "")
        if task.split(".")[0] in known:
            return task.split(".")[0]
    prefix = path.stem.split("_")[0].upper()
    return prefix if prefix in known else None


def _questions(nb) -> list[dict]:
    """Prose answers for the teacher: cells whose metadata names a question."""
    out = []
    for index, cell in enumerate(nb.cells):
        meta = cell.metadata.get("minidiff", {})
        if "question" in meta:
            out.append({"question": meta["question"], "max_points": meta.get("points", 0), "cell": index,
                        "answer": cell.source.strip()})
    return out


class _Runner:
    """Executes a notebook cell by cell, surviving errors, timeouts and kernel deaths."""

    def __init__(self, nb, workdir: str, env: dict, cell_timeout: int):
        self.nb, self.env = nb, env
        self.client = NotebookClient(nb, timeout=cell_timeout, allow_errors=True, interrupt_on_timeout=True,
                                     error_on_timeout=TIMEOUT_ERROR, kernel_name="python3",
                                     shutdown_kernel="immediate", resources={"metadata": {"path": workdir}})
        self.done, self.errors, self.timed_out, self.killers, self.skipped = [], [], [], [], []

    def start(self):
        """A fresh kernel with torch and minidiff imported, so a cell's time limit measures the student's work."""
        self.client.km = self.client.create_kernel_manager()
        self.client.start_new_kernel(env=self.env)
        self.client.start_new_kernel_client()
        self._aside(PREAMBLE, max(120, self.client.timeout or 0))

    def _aside(self, source: str, seconds: int):
        """Run a grader cell that is not part of the notebook (nbclient writes a cell back at its index)."""
        cell, saved = nbformat.v4.new_code_cell(source), self.client.timeout
        self.nb.cells.append(cell)
        self.client.timeout = seconds
        try:
            self.client.execute_cell(cell, len(self.nb.cells) - 1)
        finally:
            self.client.timeout = saved
            self.nb.cells.pop()
        return cell

    def stop(self):
        self.client._cleanup_kernel()

    def run_cell(self, cell, index: int) -> None:
        started = time.monotonic()
        try:
            self.client.execute_cell(cell, index)
        except (DeadKernelError, CellTimeoutError):
            self.killers.append(index)
            self._restart()
            return
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if time.monotonic() - started >= self.client.timeout or any(o.get("ename") == "KeyboardInterrupt" for o in errors):
            self.timed_out.append(index)
            if not self._responsive():
                self._restart()
        elif errors:
            self.errors.append({"cell": index, "ename": errors[0].get("ename"), "evalue": errors[0].get("evalue")})
        self.done.append(index)

    def _responsive(self, seconds: int = 10) -> bool:
        """After an interrupt: does the kernel answer a trivial cell (or is the student's loop ignoring it)?"""
        try:
            probe = self._aside("pass", seconds)
        except (DeadKernelError, CellTimeoutError):
            return False
        return not any(o.get("ename") in ("KeyboardInterrupt", "CellTimeoutError") for o in probe.get("outputs", []))

    def _restart(self):
        """A fresh kernel with the cells run so far replayed (the cell that killed the kernel is left out)."""
        self.stop()
        self.start()
        for i in [i for i in self.done if i not in self.timed_out]:
            try:
                self.client.execute_cell(self.nb.cells[i], i)
            except (DeadKernelError, CellTimeoutError):
                self.stop()
                self.start()
                return


def grade_notebook(path: Path, *, timeout: float = 120, cell_timeout: int = 60) -> dict:
    """Execute one submission and return its report (a dict, also the JSON report)."""
    path = Path(path)
    report = {"notebook": str(path), "assignment": None, "score": 0, "max_score": 0, "status": "ok",
              "tasks": [], "questions": [], "cells": {}, "notes": []}
    start = time.monotonic()
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001 -- an unreadable file still gets a report
        report.update(status="unreadable", notes=[f"cannot read the notebook: {type(e).__name__}: {e}"])
        return report
    assignment = _assignment(nb, path)
    tasks = checks.tasks_for(assignment) if assignment else []
    report.update(assignment=assignment, max_score=sum(t.points for t in tasks), questions=_questions(nb))
    if not tasks:
        report.update(status="unknown assignment", notes=["cannot tell which assignment this is (no minidiff "
                                                          "metadata, no A<n>_ file name prefix)"])
        return report
    with tempfile.TemporaryDirectory(prefix="minidiff-grade-") as workdir:
        log, nonce = Path(workdir) / "checks.jsonl", secrets.token_hex(16)
        env = {**os.environ, checks.LOG_ENV: str(log),
               "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        runner = _Runner(nb, workdir, env, cell_timeout)
        runner.start()
        try:
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                if time.monotonic() - start > timeout:
                    runner.skipped.append(index)
                    continue
                runner.run_cell(cell, index)
            names = [t.name for t in tasks]
            ran = sorted(i for i in runner.done if i not in runner.timed_out and i not in runner.killers)
            sources = [nb.cells[i].source for i in ran]
            outcome = recheck(sources, names, log_path=log, nonce=nonce, time_limit=RECHECK_SECONDS,
                              timeout=RECHECK_SECONDS * len(names) + 60)
            report["recheck"] = {"process": "fresh (python -I -m minidiff.course.recheck)",
                                 "returncode": outcome["returncode"], "skipped_definitions": outcome["skipped"]}
            if outcome["returncode"] != 0:
                report["notes"].append(f"the grader's re-check process failed: {outcome['output'][-500:]}")
            for line in suspicious_lines(sources):
                report["notes"].append(f"for the teacher: a cell touches the import system, builtins or library "
                                       f"attributes (the re-check does not run it): {line[:160]}")
        finally:
            runner.stop()
        lines = [json.loads(s) for s in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
    graded = {d["task"]: d for d in lines if d.get("source") == "grader" and d.get("nonce") == nonce}
    reported = {d["task"]: d for d in lines if d.get("source") == "notebook"}
    for t in tasks:
        r = graded.get(t.name) or {"task": t.name, "passed": False, "points": 0, "max_points": t.points,
                                   "status": "error", "message": "the grader's re-check did not finish "
                                   "(the kernel died or timed out while checking this task)"}
        seen = reported.get(t.name)
        r["notebook_check"] = None if seen is None else ("PASS" if seen["passed"] else "FAIL")
        if seen is not None and seen["passed"] and not r["passed"]:
            report["notes"].append(f"{t.name}: the notebook's own check said PASS, the grader's re-check failed "
                                   f"(the function was changed after its check, or the result was faked)")
        report["tasks"].append(r)
    report["score"] = sum(r["points"] for r in report["tasks"])
    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    report["cells"] = {"code": len(code_cells), "errors": runner.errors, "timed_out": runner.timed_out,
                       "killed_kernel": runner.killers, "skipped": runner.skipped}
    report["status"] = ("crashed" if runner.killers else "timeout" if runner.timed_out or runner.skipped
                        else "errors" if runner.errors else "ok")
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    report["_executed"] = nb
    return report


def _text(report: dict) -> str:
    lines = [f"Notebook:   {report['notebook']}", f"Assignment: {report['assignment']}",
             f"Score:      {report['score']:g} / {report['max_score']:g} (automatic checks)",
             f"Status:     {report['status']}", ""]
    for r in report["tasks"]:
        lines.append(f"  [{'PASS' if r['passed'] else 'FAIL'}] {r['task']} {r['points']:g}/{r['max_points']:g}: "
                     f"{r['message']}")
    cells = report.get("cells", {})
    for e in cells.get("errors", []):
        lines.append(f"  cell {e['cell']} raised {e['ename']}: {e['evalue']}")
    for key, what in [("timed_out", "timed out and was interrupted"), ("killed_kernel", "killed the kernel"),
                      ("skipped", "was skipped (notebook time limit)")]:
        lines += [f"  cell {i} {what}" for i in cells.get(key, [])]
    lines += [f"  note: {n}" for n in report["notes"]]
    if report["questions"]:
        lines += ["", "Questions to grade by hand:"]
        for q in report["questions"]:
            lines += [f"  {q['question']} (/{q['max_points']:g}), cell {q['cell']}:",
                      *[f"    {s}" for s in q["answer"].splitlines()]]
    return "\n".join(lines) + "\n"


def _names(paths: list[Path]) -> list[str]:
    """Report names: the file stem, or parent__stem when two submissions share a stem."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}__{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def grade_all(paths, out: Path, *, timeout: float = 120, cell_timeout: int = 60) -> list[dict]:
    """Grade every notebook, write its reports into ``out`` and the class summary ``out/summary.csv``."""
    out, paths = Path(out), [Path(p) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name, path in zip(_names(paths), paths):
        print(f"grading {path} ...", flush=True)
        report = grade_notebook(path, timeout=timeout, cell_timeout=cell_timeout)
        report["student"] = name
        executed = report.pop("_executed", None)
        if executed is not None:
            nbformat.write(executed, out / f"{name}.executed.ipynb")
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        (out / f"{name}.txt").write_text(_text(report), encoding="utf-8")
        print(f"  {report['score']:g}/{report['max_score']:g} ({report['status']})", flush=True)
        reports.append(report)
    task_names = sorted({r["task"] for rep in reports for r in rep["tasks"]})
    questions = sorted({f"{q['question']} (manual /{q['max_points']:g})" for rep in reports for q in rep["questions"]})
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student", "notebook", "assignment", "score", "max_score", "status", *task_names, *questions])
        for rep in reports:
            points = {r["task"]: r["points"] for r in rep["tasks"]}
            w.writerow([rep["student"], rep["notebook"], rep["assignment"], rep["score"], rep["max_score"],
                        rep["status"], *[points.get(t, "") for t in task_names], *[""] * len(questions)])
    return reports


@command_line("python -m minidiff.grade")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidiff.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="submitted .ipynb files")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for the reports (default reports/)")
    parser.add_argument("--timeout", type=float, default=120, help="time budget per notebook in seconds")
    parser.add_argument("--cell-timeout", type=int, default=60, help="time limit per cell in seconds")
    args = parser.parse_args(argv)
    missing = [p for p in args.notebooks if not p.is_file()]
    if missing:
        print(f"error: no such notebook: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    reports = grade_all(args.notebooks, args.out, timeout=args.timeout, cell_timeout=args.cell_timeout)
    print(f"wrote {len(reports)} reports and {args.out / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
