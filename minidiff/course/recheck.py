"""The grader's re-check: a fresh Python process that imports the checks first, then only the student's definitions.

The notebook itself runs in a kernel where a student cell can do anything: write files, put a fake ``minidiff`` on
``sys.path``, install an import hook, patch ``torch`` or the checks, print or log a fake PASS. None of that should
decide the points, so the grader re-checks in a new process:

1. ``python -I -m minidiff.course.recheck`` in an empty temporary folder: ``-I`` ignores ``PYTHONPATH``, the user's
   site-packages and the current folder, so ``minidiff`` is the installed package (its path is verified);
2. the checks are imported *before* any student code;
3. from the cells that ran, only definitions are executed: imports, ``def``, ``class`` and assignments to plain names
   (``T = 1000``, ``device = minidiff.get_device()``). Bare expressions and calls, assignments to attributes or
   items (``torch.allclose = ...``, ``sys.modules[...] = ...``), loops, ``with`` blocks and cell magics are dropped;
4. the checks run on those functions and write their results, tagged with a one-time nonce, to the grader's log.

What it does not protect against: code *inside* a student's function, or in the right-hand side of a plain
assignment, runs in the re-check process and could patch things there; such code is visible in the notebook, and
``suspicious_lines`` lists lines that touch ``sys.modules``, import hooks, builtins or assign to library attributes
so that the report can point a teacher at them.
"""
from __future__ import annotations

import ast
import json
import linecache
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["definitions", "suspicious_lines", "recheck", "main"]

_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_SUSPICIOUS = re.compile(r"sys\.modules|meta_path|path_hooks|sys\.path|builtins|__import__|importlib|"
                         r"settrace|setprofile|^\s*(torch|minidiff|np|numpy)\.[\w.]+\s*=[^=]", re.M)


def _cell_source(source: str) -> str:
    """A cell's code without IPython magics and shell escapes (``%matplotlib``, ``!pip``), which are not Python."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def _is_definition(node: ast.stmt) -> bool:
    if isinstance(node, _KEEP):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return node.value is not None and all(isinstance(t, ast.Name) for t in targets)
    return False


def definitions(sources: list[str]) -> list[str]:
    """The top-level definitions of code cells, in order, one source string per statement (see the module doc)."""
    out = []
    for source in sources:
        try:
            tree = ast.parse(_cell_source(source))
        except SyntaxError:
            continue  # the cell could not run in the notebook either
        out += [ast.unparse(node) for node in tree.body if _is_definition(node)]
    return out


def suspicious_lines(sources: list[str]) -> list[str]:
    """Lines a teacher may want to read: they touch the import system, builtins, or assign to library attributes."""
    return [line.strip() for s in sources for line in s.splitlines() if _SUSPICIOUS.search(line)]


def recheck(sources: list[str], names: list[str], *, log_path, nonce: str, time_limit: float,
            timeout: float) -> dict:
    """Run the re-check of tasks ``names`` in a fresh process; returns {"returncode", "output", "skipped"}."""
    payload = json.dumps({"definitions": definitions(sources), "names": names, "log_path": str(log_path),
                          "nonce": nonce, "time_limit": time_limit})
    with tempfile.TemporaryDirectory(prefix="minidiff-recheck-") as empty:
        try:
            proc = subprocess.run([sys.executable, "-I", "-m", "minidiff.course.recheck"], input=payload,
                                  capture_output=True, text=True, cwd=empty, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return {"returncode": None, "output": f"the re-check ran past {timeout:g} s: {e}", "skipped": []}
    lines = proc.stdout.splitlines()
    skipped = [json.loads(s[len("SKIPPED "):]) for s in lines if s.startswith("SKIPPED ")]
    return {"returncode": proc.returncode, "output": (proc.stdout + proc.stderr)[-4000:], "skipped": skipped}


def main() -> int:
    """The child process: import the checks, run the definitions, re-check, log (input: the JSON payload on stdin)."""
    import minidiff
    from minidiff.course import checks

    root = Path(minidiff.__file__).resolve().parent
    if Path(checks.__file__).resolve().parent.parent.parent != root:
        print(f"refusing to re-check: minidiff.course.checks comes from {checks.__file__}, not from {root}")
        return 3
    job = json.loads(sys.stdin.read())
    namespace = {"__name__": "__student__"}
    for i, statement in enumerate(job["definitions"]):
        filename = f"<student notebook, definition {i + 1}>"  # its lines in linecache: tracebacks quote them
        linecache.cache[filename] = (len(statement), None, statement.splitlines(keepends=True), filename)
        try:
            exec(compile(statement, filename, "exec"), namespace)  # noqa: S102 -- definitions only
        except Exception as e:  # noqa: BLE001 -- one failing import must not hide the other functions
            print("SKIPPED " + json.dumps({"statement": statement.splitlines()[0][:120],
                                           "error": f"{type(e).__name__}: {e}"}))
    checks.regrade(namespace, job["names"], log_path=job["log_path"], nonce=job["nonce"],
                   time_limit=job["time_limit"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
