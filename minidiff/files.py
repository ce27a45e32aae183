"""File plumbing shared by every saved object of the course: one safetensors reader, one atomic writer.

Models, training checkpoints and the evaluator classifiers are all safetensors files (tensors plus a
str -> str metadata dict; no pickle is ever loaded). They are read by ``read_safetensors`` and written by
``write_safetensors`` / ``atomic_write_bytes``, so a crash mid-write never leaves half a file under the real
name and a damaged file always gives the same error, naming the file.

| name            | meaning                                                                      |
|-----------------|------------------------------------------------------------------------------|
| ``WEIGHTS_DIR`` | ``minidiff/weights/``: the shipped models, classifiers and their model cards |
| ``metadata``    | the safetensors header's str -> str dict; JSON values are stored as strings  |
"""
from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

__all__ = ["WEIGHTS_DIR", "CheckpointError", "atomic_write_bytes", "write_safetensors", "read_safetensors",
           "read_metadata", "tensors_sha256", "file_sha256", "hardware_info"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class CheckpointError(ValueError):
    """A saved file is corrupted, truncated, or not the kind of minidiff file that was asked for."""


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a uniquely named temporary file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a saved model is an ordinary readable file
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old or the new file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def tensors_sha256(tensors: dict) -> str:
    """Hex SHA-256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        v = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_safetensors(path, tensors: dict, metadata: dict) -> Path:
    """Atomically write ``tensors`` (name -> tensor, moved to the CPU) and str metadata as a safetensors file.

    The metadata gains ``sha256``, the ``tensors_sha256`` of the tensors, which ``read_safetensors`` checks.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {**{k: str(v) for k, v in metadata.items()}, "sha256": tensors_sha256(tensors)}
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def _open_error(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is corrupted or truncated (not a readable safetensors file): {err}")


def read_safetensors(path, *, expect_format: str | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; CheckpointError naming the file if it is damaged (unreadable, or
    its tensors do not match the SHA-256 recorded when it was written) or of another ``format`` than ``expect_format``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _open_error(path, e) from e
    if expect_format is not None and metadata.get("format") != expect_format:
        raise CheckpointError(f"{path} is not a {expect_format} file (format={metadata.get('format')!r})")
    if "sha256" in metadata and tensors_sha256(tensors) != metadata["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its tensors do not match the SHA-256 recorded when it was "
                              "written (flipped bits on disk, or an edited file)")
    return tensors, metadata


def read_metadata(path) -> dict:
    """The metadata of a safetensors file (reads only the header), with the errors of ``read_safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _open_error(path, e) from e


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes (recorded in model cards, checked at load time)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hardware_info(device=None) -> dict:
    """Where a run happened, for model cards: OS, CPU model, cores, torch threads, load, torch version, GPU if any."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    device = torch.device(device) if device is not None else torch.device("cpu")
    info = {"platform": platform.platform(), "processor": cpu, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
