"""Diagnoses shared by every check: name the mistake, not just the difference.

Built once here and used by every task (the assignment modules add their own named variants on top):

| diagnosis                 | how                                                                                 |
|---------------------------|-------------------------------------------------------------------------------------|
| calls the reference       | a runtime trace (``sys.setprofile``) of every Python function the student's call    |
|                           | reaches, so attribute chains and local imports are caught, not only global names    |
| ignores an input          | call again with one input changed (noise, t, a generator, a scale): if the          |
|                           | reference's answer moves and the student's does not, say which input is ignored      |
| what the difference is    | a constant factor (2, 1/2, sqrt 2, ...), a sign, only the first sample of a batch   |
|                           | right, a clamp, NaN where the reference is finite                                   |
| a helper's bug            | re-run a task with the reference helper put in place of the student's               |
"""
from __future__ import annotations

import importlib
import inspect
import math
import sys
import traceback
import types
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["reference_codes", "trace_references", "ReferenceCalled", "describe_difference", "probe_inputs",
           "with_helpers", "extra_noise", "library_step", "is_stub", "student_line"]

_LIBRARY_DIRS = (str(Path(__file__).resolve().parents[2]), str(Path(torch.__file__).resolve().parent))


class ReferenceCalled(BaseException):
    """The student's function reached a library function that the task asks them to write (a BaseException, so a
    student's ``except Exception`` cannot swallow it)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _resolve(qualname: str):
    parts = qualname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def reference_codes(references: tuple[str, ...]) -> dict:
    """Code object -> qualified name, for every function (or every method of a class) named in ``references``."""
    codes = {}
    for name in references:
        obj = _resolve(name)
        funcs = [v for v in vars(obj).values() if inspect.isfunction(v)] if inspect.isclass(obj) else [obj]
        for f in funcs:
            f = inspect.unwrap(f) if callable(f) else f
            code = getattr(f, "__code__", None)
            if code is not None:
                codes[code] = name
    return codes


@contextmanager
def trace_references(codes: dict):
    """Raise ReferenceCalled as soon as a frame running one of ``codes`` starts, inside the ``with`` block."""
    if not codes:
        yield
        return
    previous = sys.getprofile()

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            sys.setprofile(previous)
            raise ReferenceCalled(codes[frame.f_code])
    sys.setprofile(profiler)
    try:
        yield
    finally:
        sys.setprofile(previous)


NAMED_FACTORS = [(2.0, "2"), (0.5, "1/2"), (math.sqrt(2), "sqrt(2)"), (1 / math.sqrt(2), "1/sqrt(2)"),
                 (4.0, "4"), (0.25, "1/4")]


def _fit(got: torch.Tensor, want: torch.Tensor):
    """Least-squares c with got ~ c * want, and the relative residual."""
    g, w = got.detach().double().flatten(), want.detach().double().flatten()
    ww = float(w @ w)
    if ww == 0:
        return None, math.inf
    c = float(g @ w) / ww
    return c, float((g - c * w).norm() / max(float(g.norm()), 1e-30))


def describe_difference(got: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float) -> str | None:
    """A short description of how ``got`` differs from ``want`` (same shape, floating point), or None when no
    pattern fits (integer outputs, such as labels, are left to the task's own diagnoses)."""
    if not (got.is_floating_point() and want.is_floating_point()) or want.numel() == 1:
        return None  # a scalar is always "a constant factor" of another: nothing to learn from its pattern
    g, w = got.detach().double(), want.detach().double()

    def close(a, b):
        return bool(torch.allclose(a, b, rtol=rtol, atol=atol))
    if close(g, -w):
        return "has the wrong sign (it is minus the reference everywhere)"
    c, resid = _fit(g, w)
    if c is not None and resid < 1e-4 and abs(c - 1) > 1e-3:
        for value, name in NAMED_FACTORS:
            if abs(c / value - 1) < 1e-3:
                return f"is off by a constant factor of {name} (every value is {name} times the reference)"
        return f"is off by a constant factor of about {c:.4g} (every value is that many times the reference)"
    if g.ndim >= 2 and g.shape[0] > 1:  # a batch of samples (a 1-D schedule table is not a batch)
        first_ok = close(g[:1], w[:1])
        if first_ok and close(g, w[:1].expand_as(w)):
            return ("uses the first sample's value for the whole batch: index per sample (e.g. alphas_cumprod[t] "
                    "reshaped to (B, 1, 1, 1)) instead of one scalar")
        if first_ok:
            return ("is right for the first sample of the batch but wrong for the others: a per-sample value (such as "
                    "alphas_cumprod[t]) is taken from the first sample, or broadcast along the wrong axis")
    lo, hi = float(g.min()), float(g.max())
    inside = (w >= lo - atol) & (w <= hi + atol)
    if not inside.all() and close(g, w.clamp(lo, hi)):
        return f"clamps its output to [{lo:.3g}, {hi:.3g}]; the reference does not clamp there"
    return None


def probe_inputs(student, args: tuple, kwargs: dict, variants: dict, reference=None, *, call, case: str) -> None:
    """Raise Mismatch naming an input the student's output ignores.

    ``variants`` maps an argument (position int or keyword str) to (alternative value or thunk, why it matters).
    With ``reference`` given, an input counts as ignored only if the reference's answer moves when it changes.
    """
    from minidiff.course.checks import Mismatch

    base = call(student, *args, **kwargs)
    if not _same(base, call(student, *args, **kwargs)):
        raise Mismatch(f"gives a different answer each time for the same inputs: it draws its own random numbers "
                       f"(torch.randn, torch.rand); use the noise or generator you are given [case: {case}]")
    for where, (alt, why) in variants.items():
        new_args, new_kwargs = list(args), dict(kwargs)
        value = alt() if callable(alt) and not isinstance(alt, torch.Generator) else alt
        if isinstance(where, int):
            new_args[where] = value
            name = list(inspect.signature(student).parameters)[where] if _has_signature(student) else f"#{where + 1}"
        else:
            new_kwargs[where] = value
            name = where
        if reference is not None:
            if _same(reference(*args, **kwargs), reference(*new_args, **new_kwargs)):
                continue  # the reference does not depend on it here either
        if _same(base, call(student, *new_args, **new_kwargs)):
            raise Mismatch(f"ignores its input `{name}`: changing it does not change the output, but it must "
                           f"({why}) [case: {case}]")


def _has_signature(fn) -> bool:
    try:
        inspect.signature(fn)
        return True
    except (TypeError, ValueError):
        return False


def _same(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a.detach(), b.detach()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):  # e.g. (out, attn): the same if each part is
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a) or torch.is_tensor(b):
        return False
    return a == b


def with_helpers(fn, helpers: dict):
    """A copy of the student's ``fn`` whose global names in ``helpers`` are replaced (the reference helpers), or
    None if ``fn`` uses none of them."""
    code = getattr(fn, "__code__", None)
    if code is None or not set(helpers) & set(code.co_names):
        return None
    patched = {**fn.__globals__, **helpers}
    return types.FunctionType(code, patched, fn.__name__, fn.__defaults__, fn.__closure__)


# ----------------------------------------------------------------------------- references for single steps
def extra_noise(got, want: torch.Tensor, noise: torch.Tensor) -> torch.Tensor | None:
    """``want + c * noise`` with c fitted to ``got``: a variant matching it means only the noise term is off."""
    if not torch.is_tensor(got) or got.shape != want.shape:
        return None
    diff, z = (got.detach().double() - want.double()).flatten(), noise.double().flatten()
    c = (diff @ z) / (z @ z)
    return want + (c * noise.double()).to(want.dtype) if abs(c) > 1e-6 else None


class _StopSampling(Exception):
    pass


def library_step(sampler, denoiser, x: torch.Tensor, sigma: float, sigma_next: float, **options) -> torch.Tensor:
    """One step of a minidiff sampler from sigma to sigma_next (the reference for single-step tasks).

    Samplers take a list ending in 0, so for sigma_next > 0 this runs [sigma, sigma_next, 0] and stops when the
    callback reports the state before step 2 (the samplers' last step to 0 is special; it is not taken here).
    """
    levels = [sigma, 0.0] if sigma_next == 0 else [sigma, sigma_next, 0.0]
    sigmas = torch.tensor(levels, dtype=torch.float64)
    if sigma_next == 0:
        return sampler(denoiser, x, sigmas, **options)
    state = {}

    def stop_after_first(info):
        if info["i"] == 1:
            state["x"] = info["x"]
            raise _StopSampling
    try:
        sampler(denoiser, x, sigmas, callback=stop_after_first, **options)
    except _StopSampling:
        pass
    return state["x"]


def name_drop_fraction(frac: float, p: float, n: int, what: str) -> None:
    """Raise Mismatch if a dropout that should drop a fraction p of ``n`` ``what`` dropped ``frac`` instead
    (5 standard errors): an inverted probability (about 1 - p) is named as such."""
    from minidiff.course.checks import Mismatch

    sd = (p * (1 - p) / n) ** 0.5
    if abs(frac - (1 - p)) < 5 * sd:
        raise Mismatch(f"drops a fraction {frac:.3f} of the {what} at p = {p}: the probability is inverted, "
                       f"drop when torch.rand(...) < p")
    if abs(frac - p) > 5 * sd:
        raise Mismatch(f"drops a fraction {frac:.3f} of the {what} at p = {p}, expected about {p}")


# ----------------------------------------------------------------------------- where an exception came from
def _library_frame(frame: traceback.FrameSummary) -> bool:
    return frame.filename.startswith(_LIBRARY_DIRS) or "site-packages" in frame.filename


def is_stub(exc: NotImplementedError) -> bool:
    """True when the student's own code raised it (the stub's ``raise NotImplementedError()``), not torch: ``1 - mask``
    on a bool mask also raises NotImplementedError, and that is an attempt with a bug, not an untouched stub."""
    last = (traceback.extract_tb(exc.__traceback__) or [None])[-1]
    if last is None or _library_frame(last):
        return False
    return "NotImplementedError" in last.line if last.line else not exc.args  # no source at hand: the bare stub


def student_line(exc: BaseException) -> str:
    """' (line N: `code`)' for the deepest frame of the traceback that is not torch or minidiff code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _library_frame(f)]
    if not frames:
        return ""
    f = frames[-1]
    return f" (line {f.lineno}: `{f.line.strip()}`)" if f.line else f" (line {f.lineno})"
