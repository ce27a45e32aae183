"""Automatic checks for the assignments: run a student's function against the library's reference.

A notebook calls ``check("A1.q_sample", q_sample)``. The check runs the function on random and edge-case
inputs, compares it with minidiff's own implementation, and prints one line::

    PASS A1.q_sample (2/2): matches minidiff.forward.q_sample on 6 cases
    FAIL A1.q_sample (0/2): your q_sample uses alphas_cumprod[t] where sqrt(alphas_cumprod[t]) is needed [case: t = 0]

When a wrong answer matches a known mistake (a missing sqrt, an off-by-one timestep, ...) the message names it.
A student's exception never escapes: it is reported with its type, message and the student's line.

Each assignment module (``a1_forward``, ...) registers its tasks with ``@task``; ``TASKS`` maps a task name to
its ``Task``. When $MINIDIFF_GRADE_LOG names a file, every result is appended to it as one JSON line, and
``regrade`` (run by ``python -m minidiff.grade`` at the end of a notebook) re-runs every check on the functions
the notebook defined, so deleted or edited check cells change nothing.
"""
from __future__ import annotations

import inspect
import json
import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from minidiff.course.checks.diagnose import (
    ReferenceCalled,
    describe_difference,
    extra_noise,
    library_step,
    is_stub,
    reference_codes,
    student_line,
    trace_references,
    with_helpers,
)

__all__ = ["CheckResult", "Task", "TASKS", "task", "check", "run_task", "regrade", "tasks_for",
           "Mismatch", "call", "expect", "extra_noise", "library_step", "LOG_ENV"]

LOG_ENV = "MINIDIFF_GRADE_LOG"


@dataclass
class CheckResult:
    """The outcome of one check: ``status`` is "pass", "fail", "error", "not attempted" or "missing"."""
    task: str
    passed: bool
    points: float
    max_points: float
    message: str
    status: str

    def line(self) -> str:
        label = {"pass": "PASS", "not attempted": "NOT ATTEMPTED", "missing": "MISSING"}.get(self.status, "FAIL")
        return f"{label} {self.task} ({self.points:g}/{self.max_points:g}): {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Task:
    """A gradable task: the function name the student defines, its points, the check and the reference it mirrors."""
    name: str
    func_name: str
    points: float
    run: Callable[[Callable], str]  # returns the PASS message, raises Mismatch (or a student error)
    references: tuple[str, ...]  # qualified names of library functions the student must not simply call
    helpers: dict = field(default_factory=dict)  # name of another task's function -> its reference implementation


TASKS: dict[str, Task] = {}


def task(name: str, *, func: str, points: float, references: tuple[str, ...] = (), helpers: dict | None = None):
    """Register the decorated ``run(student_fn) -> pass message`` as the check of task ``name``.

    ``helpers`` names the student's functions from earlier tasks that this one may call, with their reference
    implementations: when the task fails, it is re-run with the references in place, to tell a bug in the helper
    from a bug in this function.
    """
    def register(run):
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        TASKS[name] = Task(name, func, points, run, references, dict(helpers or {}))
        return run
    return register


def tasks_for(assignment: str) -> list[Task]:
    """The tasks of one assignment ("A1", ...), in registration order."""
    return [t for n, t in TASKS.items() if n.split(".")[0] == assignment]


# ----------------------------------------------------------------------------- errors a check raises
class Mismatch(Exception):
    """The student's function gave a wrong answer; the message says what is wrong and in which case."""


class NotAttempted(Exception):
    """The student's function still raises NotImplementedError."""


class StudentError(Exception):
    """The student's function raised; the message names the exception and the student's line."""


class _TimeLimit(BaseException):
    """Raised by the alarm inside a student's function that runs too long (a BaseException, so ``except
    Exception`` in student code cannot swallow it)."""


def _arg_names(fn, args, kwargs) -> list[tuple[str, object]]:
    try:
        return list(inspect.signature(fn).bind(*args, **kwargs).arguments.items())
    except (TypeError, ValueError):
        return [(f"#{i + 1}", a) for i, a in enumerate(args)] + list(kwargs.items())


def call(fn, *args, hint: str = "", **kwargs):
    """Call the student's ``fn``; turn its exceptions into StudentError/NotAttempted; reject in-place edits."""
    before = [(n, a.detach().clone()) for n, a in _arg_names(fn, args, kwargs) if torch.is_tensor(a)]
    try:
        with trace_references(_ACTIVE["codes"]):
            out = fn(*args, **kwargs)
    except NotImplementedError as e:
        if is_stub(e):
            raise NotAttempted() from e
        raise StudentError(f"raised NotImplementedError: {(str(e).splitlines() or [''])[0][:300]}"
                           f"{student_line(e)}.") from e
    except Exception as e:  # noqa: BLE001 -- any student exception becomes a report, never a crash
        detail = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        shape_hint = f" Hint: {hint}" if hint and "size of tensor" in str(e) else ""
        raise StudentError(f"raised {detail}{student_line(e)}.{shape_hint}") from e
    for name, old in before:
        new = dict(_arg_names(fn, args, kwargs))[name]
        if new.shape != old.shape or not torch.equal(new.detach(), old):
            raise Mismatch(f"modifies its argument `{name}` in place; compute a new tensor instead "
                           f"(e.g. torch.where, or clone first)")
    return out


_ACTIVE = {"codes": {}}  # the reference functions of the task being run (set by run_task)


# ----------------------------------------------------------------------------- comparing answers
def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    return a.shape == b.shape and torch.allclose(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol)


def expect(got, want: torch.Tensor, *, case: str, what: str = "output", wrong=(), rtol: float = 1e-5,
           atol: float = 1e-5, dtype_hint: str = "", probe=None) -> None:
    """Raise Mismatch unless ``got`` equals ``want``; if it matches a known wrong variant, say which.

    ``wrong`` is a sequence of ``(message, value_or_thunk)``; thunks are only evaluated on a mismatch. When no
    variant and no generic diagnosis (``diagnose.describe_difference``) fits, ``probe()`` (e.g. a
    ``probe_inputs`` call) may raise a Mismatch that names an ignored input, before the plain difference is reported.
    """
    if not torch.is_tensor(got):
        raise Mismatch(f"returns {type(got).__name__}, expected a tensor {what} [case: {case}]")
    if got.shape == want.shape and _close(got, want, rtol, atol):
        if got.dtype != want.dtype:
            raise Mismatch(f"returns dtype {got.dtype}, expected {want.dtype} [case: {case}]. {dtype_hint}".strip())
        return
    for message, variant in wrong:
        try:
            v = variant() if callable(variant) else variant
        except (IndexError, RuntimeError, ValueError, ZeroDivisionError):
            continue  # this mistake cannot even be computed on this case, so it is not the one
        if torch.is_tensor(v) and _close(got, v, rtol, atol) and not _close(v, want, rtol, atol):
            raise Mismatch(f"{message} [case: {case}]")
    if got.shape != want.shape:
        raise Mismatch(f"{what} has shape {tuple(got.shape)}, expected {tuple(want.shape)} [case: {case}]")
    bad = ~torch.isfinite(got) & torch.isfinite(want)
    if bad.any():
        raise Mismatch(f"{what} has {int(bad.sum())} NaN/inf values where the reference is finite "
                       f"(a division by zero?) [case: {case}]")
    description = describe_difference(got, want, rtol=rtol, atol=atol)
    if description:
        raise Mismatch(f"{what} {description} [case: {case}]")
    if probe is not None:
        probe()
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    raise Mismatch(f"wrong {what} [case: {case}]: max abs difference to the reference is {err:.3g}, and it is "
                   f"not one of the usual mistakes this check knows")


# ----------------------------------------------------------------------------- running a task
def expect_pair(got, what: str, case: str):
    """``got`` if it is a tuple of two tensors, else a Mismatch that names what came back (``what``: their names)."""
    if torch.is_tensor(got):
        raise Mismatch(f"returns one tensor; return both results, a tuple ({what}) [case: {case}]")
    if not isinstance(got, (tuple, list)) or len(got) != 2 or not all(torch.is_tensor(t) for t in got):
        raise Mismatch(f"returns {type(got).__name__}; return a tuple of two tensors ({what}) [case: {case}]")
    return got


def _calls_reference(fn, references: tuple[str, ...]) -> str | None:
    """The reference a student's function is, or calls by name from its globals (``forward.q_sample``)."""
    def qualname(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    if qualname(fn) in references:
        return qualname(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    try:
        scope = inspect.getclosurevars(fn)
    except (TypeError, ValueError):
        return None
    for obj in {**scope.globals, **scope.nonlocals}.values():
        if qualname(obj) in references:
            return qualname(obj)
        if inspect.ismodule(obj):
            hits = [f"{obj.__name__}.{attr}" for attr in code.co_names if f"{obj.__name__}.{attr}" in references]
            if hits:
                return hits[0]
    return None


def _with_time_limit(seconds: float | None, fn, *args):
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        return fn(*args)

    def on_alarm(signum, frame):
        raise _TimeLimit()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_task(name: str, fn, *, time_limit: float | None = None) -> CheckResult:
    """Run the check of task ``name`` on ``fn`` and return the result; never raises for a student's mistake."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    t = TASKS[name]

    def result(status, message):
        ok = status == "pass"
        return CheckResult(name, ok, t.points if ok else 0, t.points, message, status)
    if not callable(fn):
        return result("fail", f"expected your function {t.func_name}, got {type(fn).__name__}")
    used = _calls_reference(fn, t.references)
    if used:
        return result("fail", f"your {t.func_name} uses the library's reference {used}; write it yourself")
    _ACTIVE["codes"] = reference_codes(t.references)
    try:
        outcome = _run_checked(t, fn, time_limit, result)
    finally:
        _ACTIVE["codes"] = {}
    if outcome.status in ("fail", "error") and t.helpers:
        return _blame_helper(t, fn, time_limit, result) or outcome
    return outcome


def _blame_helper(t: Task, fn, time_limit, result) -> CheckResult | None:
    """If ``fn`` passes with the reference helpers in place of the student's, say that the helper is wrong."""
    patched = with_helpers(fn, t.helpers)
    if patched is None:
        return None
    _ACTIVE["codes"] = reference_codes(t.references)
    try:
        again = _run_checked(t, patched, time_limit, result)
    finally:
        _ACTIVE["codes"] = {}
    if again.status != "pass":
        return None
    used = ", ".join(n for n in t.helpers if n in fn.__code__.co_names)
    return result("fail", f"your {used} is wrong (see its own check); with the reference {used} your "
                          f"{t.func_name} passes, so fix {used} first")


def _run_checked(t: Task, fn, time_limit, result) -> CheckResult:
    try:
        return result("pass", _with_time_limit(time_limit, t.run, fn))
    except ReferenceCalled as e:
        return result("fail", f"your {t.func_name} calls the library's reference {e.name} (found while running "
                              f"it); the task is to write it yourself")
    except NotAttempted:
        return result("not attempted", f"{t.func_name} still raises NotImplementedError: replace the stub "
                                       f"`raise NotImplementedError()` with your code")
    except Mismatch as e:
        return result("fail", f"your {t.func_name} {e}")
    except StudentError as e:
        return result("error", f"your {t.func_name} {e}")
    except _TimeLimit:
        return result("error", f"your {t.func_name} did not finish within {time_limit:g} s (an infinite loop?)")
    except Exception as e:  # noqa: BLE001 -- a bug in the check itself must still not stop the notebook
        return result("error", f"the check itself failed ({type(e).__name__}: {e}); please tell your teacher")


def _log(result: CheckResult, source: str, nonce: str | None = None, path: str | None = None) -> None:
    path = path or os.environ.get(LOG_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"source": source, "nonce": nonce, **result.to_dict()}) + "\n")


def check(name: str, fn, *, quiet: bool = False) -> CheckResult:
    """Check a student's function for task ``name``; print a PASS/FAIL line and record it for the grader."""
    result = run_task(name, fn)
    if not quiet:
        print(result.line())
    _log(result, "notebook")
    return result


def regrade(namespace: dict, names, *, log_path: str, nonce: str, time_limit: float = 30.0) -> list[CheckResult]:
    """Re-run the checks of ``names`` on the functions defined in ``namespace`` (the grader calls this)."""
    results = []
    for name in names:
        t = TASKS[name]
        fn = namespace.get(t.func_name)
        if fn is None:
            r = CheckResult(name, False, 0, t.points, f"`{t.func_name}` is not defined: check cell missing or not "
                                                      f"executed (its cell was deleted, or failed before the def)",
                            "missing")
        else:
            r = run_task(name, fn, time_limit=time_limit)
        _log(r, "grader", nonce, log_path)
        print(r.line())
        results.append(r)
    return results


# importing the assignment modules registers their tasks
from minidiff.course.checks import (  # noqa: E402,F401
    a1_forward, a2_ddpm, a3_samplers, a4_guidance, a5_latent, a6_attention, a6_dropout, a7_editing)
