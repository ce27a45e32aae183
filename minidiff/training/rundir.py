"""The run folder of ``train``: checked before anything is loaded, and locked while a run writes it.

| file                          | meaning                                                                 |
|-------------------------------|-------------------------------------------------------------------------|
| ``.lock``                     | "host pid" of the run writing the folder; a second live run is refused   |
| ``.checkpoint.safetensors.*.tmp`` | a checkpoint write interrupted by a kill; removed by the next start  |
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from pathlib import Path

__all__ = ["RunLockedError", "check_out_dir", "acquire_lock", "config_changes"]


def config_changes(saved: dict, config) -> dict:
    """{field: (saved, given)} for each field of the dataclass ``config`` (outside ``config.RESUMABLE``) that differs
    from ``saved``, the checkpoint's JSON of it; a field added since the checkpoint was written counts as its
    default. Compared as JSON, so tuples equal the lists they were saved as."""
    mine = json.loads(json.dumps(asdict(config)))
    defaults = json.loads(json.dumps(asdict(type(config)())))
    return {k: (saved.get(k, defaults[k]), v) for k, v in mine.items()
            if k not in config.RESUMABLE and saved.get(k, defaults[k]) != v}


class RunLockedError(RuntimeError):
    """Another live run is writing this run folder."""


def check_out_dir(out_dir: Path) -> None:
    """``out_dir`` must be a folder we can write (created if missing), not a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; give a folder for the checkpoint, samples and config")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"out_dir {out_dir} is not writable; choose another folder")


def acquire_lock(out_dir: Path) -> Path:
    """Create ``out_dir/.lock`` holding this process's host and pid, or refuse if a live run holds it.

    A lock left by a killed run (its pid no longer exists on this host) is taken over, so kill -9 never leaves a
    folder stuck. Then temporary files of interrupted checkpoint writes (``.checkpoint.safetensors.*.tmp``) go.
    """
    lock, me = out_dir / ".lock", f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = lock.read_text().strip().rpartition(" ")
            if host == socket.gethostname() and pid.isdigit() and _alive(int(pid)):
                raise RunLockedError(f"another run (pid {pid}) is writing {out_dir}; wait for it to finish, stop it, "
                                     f"or train into another --out") from None
            lock.unlink(missing_ok=True)  # stale: its run was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        for tmp in out_dir.glob(".checkpoint.safetensors.*.tmp"):
            tmp.unlink(missing_ok=True)
        return lock
    raise RunLockedError(f"could not take the lock {lock}; remove it if no run is writing {out_dir}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
