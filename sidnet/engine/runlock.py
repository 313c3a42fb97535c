"""One writer per run folder: a second training started into the same ``runs/<name>`` refuses at once.

An advisory ``flock`` on ``runs/<name>/.lock``: the kernel drops it when the process ends, however it ends (SIGKILL
included), so a killed run never leaves a stale lock behind, unlike a pid file.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_held: dict[Path, int] = {}  # run folder → lock fd held by this process (re-entrant within one process)


class RunBusyError(ValueError):
    """Another process holds the run folder; the message is one line with the fix."""


def acquire_run_lock(run_dir: str | Path) -> Path:
    """Lock ``run_dir`` for this process (idempotent); raises :class:`RunBusyError` if another process holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunBusyError(f"another training (pid {owner}) is writing to {run_dir}; wait for it to end or start "
                           "this one with name=<new>") from None  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[run_dir] = fd
    return run_dir


def release_run_lock(run_dir: str | Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
