"""Small helpers shared by every minidiff module: broadcasting, devices, smoke mode.

Notation used across the library (see docs/DESIGN.md):

| symbol        | code name                  | meaning                                        |
|---------------|----------------------------|------------------------------------------------|
| T             | ``T``                      | number of discrete training timesteps          |
| alpha_bar_t   | ``alphas_cumprod[t]``      | signal fraction, DDPM (Ho et al. 2020, Eq. 4)  |
| sigma         | ``sigma``                  | VE noise level sqrt((1-alpha_bar)/alpha_bar)   |
| x_t           | ``x``                      | sqrt(alpha_bar) x_0 + sqrt(1-alpha_bar) eps    |
| x0_hat        | ``x0_hat``                 | the denoiser's estimate of x_0                 |
"""
from __future__ import annotations

import functools
import os
import sys

import torch

__all__ = ["append_dims", "get_device", "resolve_device", "smoke_mode", "smoke", "budget", "check_finite", "randn",
           "rand", "check_generator", "check_tensor", "command_line"]


def append_dims(v: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so ``v`` (shape (B,) or ()) broadcasts against a tensor of ``target_ndim`` dims."""
    v = torch.as_tensor(v)
    missing = target_ndim - v.ndim
    if missing < 0:
        raise ValueError(
            f"append_dims: input has {v.ndim} dims {tuple(v.shape)}, more than target_ndim={target_ndim}"
        )
    return v.reshape(*v.shape, *([1] * missing))


def get_device(prefer: str | None = None) -> torch.device:
    """The one device helper of the course: CUDA, then Apple MPS, then CPU (or ``prefer`` / $MINIDIFF_DEVICE)."""
    prefer = prefer or os.environ.get("MINIDIFF_DEVICE")
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device=None) -> torch.device:
    """``device`` (a str, an int GPU index or a torch.device; None = CPU) as a torch.device that this machine has,
    else a ValueError that names it: loaders call this so that ``device="cuda"`` without a GPU fails plainly."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps', an int GPU index or a torch.device, "
                         f"got {device!r}") from e
    mps = getattr(torch.backends, "mps", None)
    if (dev.type == "cuda" and not torch.cuda.is_available()) or (dev.type == "mps" and not (mps and
                                                                                          mps.is_available())):
        raise ValueError(f"device={device!r}, but {dev.type.upper()} is not available on this machine: use 'cpu', "
                         f"or minidiff.utils.get_device() for the best device there is")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return dev


def smoke_mode() -> bool:
    """True when $MINIDIFF_SMOKE is set to a true value: CI runs every notebook with tiny workloads."""
    return os.environ.get("MINIDIFF_SMOKE", "").strip().lower() in {"1", "true", "yes", "on"}


def smoke(full, small):
    """Return ``small`` in smoke mode and ``full`` otherwise (the same code path, a smaller workload)."""
    return small if smoke_mode() else full


def budget(n: int, smoke_n: int | None = None) -> int:
    """A workload size (steps, samples, batch): ``n`` normally, ``smoke_n`` (default ``max(1, n // 100)``) in smoke mode.

    Notebooks write ``n_steps = budget(3000)``: students see the real number, CI runs a hundredth of it.
    """
    if n < 1:
        raise ValueError(f"budget: n must be >= 1, got {n}")
    if not smoke_mode():
        return n
    return smoke_n if smoke_n is not None else max(1, n // 100)


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Raise ValueError naming ``name`` if ``x`` holds NaN or inf; return ``x`` unchanged otherwise."""
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite, got {n_bad} NaN/inf values out of {x.numel()}")
    return x


def check_tensor(name: str, x, *, ndim: int | None = None, min_ndim: int = 1, channels: int | None = None,
                 shape_doc: str = "(B, C, H, W)") -> torch.Tensor:
    """The one boundary check for image-like inputs (docs/DESIGN.md, "Validation"): ``x`` must be a floating-point
    torch.Tensor (float16, bfloat16, float32 or float64; computations keep its dtype), with ``ndim`` dims (or at
    least ``min_ndim``), ``channels`` channels on axis 1 if given, and no NaN or inf. Integer images (e.g. uint8 in
    0..255) are refused rather than silently converted: scale them to [-1, 1] first, ``x.float() / 127.5 - 1``."""
    if not isinstance(x, torch.Tensor):
        hint = "torch.as_tensor(x, dtype=torch.float32)" if hasattr(x, "__array__") or isinstance(x, (list, tuple)) \
            else "a torch.Tensor"
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}; convert with {hint}")
    if not x.is_floating_point():
        hint = " (images in 0..255? use x.float() / 127.5 - 1 for the course's [-1, 1] range)" if x.dtype == torch.uint8 \
            else " (convert with x.float())"
        raise ValueError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                         f"got {x.dtype}{hint}")
    if (ndim is not None and x.ndim != ndim) or x.ndim < min_ndim:
        want = f"{ndim} dims {shape_doc}" if ndim is not None else f"at least {min_ndim} dims {shape_doc}"
        extra = " (a single image? add the batch axis with x[None]; a grey image without a channel axis? " \
                "x[:, None])" if ndim is not None and x.ndim == ndim - 1 else ""
        raise ValueError(f"{name} must have {want}, got shape {tuple(x.shape)}{extra}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s) on axis 1 {shape_doc}, got shape {tuple(x.shape)}")
    return check_finite(name, x)


def check_generator(generator) -> torch.Generator | None:
    """Return ``generator`` if it is a torch.Generator or None; raise naming what was given otherwise."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None (e.g. torch.Generator().manual_seed(0)), "
                         f"got {type(generator).__name__} {generator!r}")
    return generator


def _draw(fn, shape, generator, device, dtype) -> torch.Tensor:
    check_generator(generator)
    source = generator.device if generator is not None else device
    return fn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


def randn(shape, *, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
    """N(0, I) noise of ``shape`` drawn on the generator's device, then moved to ``device`` (diffusers'
    ``randn_tensor`` rule): the same seed gives the same noise whatever device the model runs on."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape, *, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
    """U[0, 1) draws of ``shape``, with the device rule of ``randn``."""
    return _draw(torch.rand, shape, generator, device, dtype)


USER_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError)  # CheckpointError is a ValueError


def command_line(prog: str):
    """Decorator for a ``main(argv=None)``: a user error prints one line (what is wrong, what to do) on stderr and
    exits with status 2; ``--debug`` in argv or MINIDIFF_DEBUG=1 shows the full traceback instead."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            argv = sys.argv[1:] if argv is None else list(argv)
            debug = "--debug" in argv or os.environ.get("MINIDIFF_DEBUG", "") not in ("", "0")
            try:
                return main([a for a in argv if a != "--debug"])
            except USER_ERRORS as err:
                if debug:
                    raise
                msg = err.args[0] if isinstance(err, KeyError) and err.args else err
                print(f"{prog}: error: {msg} (run with --debug for the traceback)", file=sys.stderr)
                raise SystemExit(2) from None
        return run
    return wrap
