"""Atomic file writes: a crash mid-write leaves the previous file (or none), never a truncated one.

Fault injection for the fault campaign (``tests/test_faults.py``), the way SQLite tests its journal: the environment
variable ``SIDNET_FAULT=<fault>:<file name>:<n>`` makes the ``n``-th atomic write of a file with that name (1-based,
counted per process) fail after half of it reached the temporary file and before the rename:
``kill`` sends this process SIGKILL, ``enospc`` raises ``OSError(ENOSPC)`` as a full disk does, ``sigint`` is Ctrl-C.
Unset, it costs one dictionary lookup per write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from sidnet.safety import check_output_file

_fault_counts: dict[str, int] = {}


def _inject_fault(path: Path, f: IO[bytes]) -> None:
    spec = os.environ.get("SIDNET_FAULT")
    if not spec:
        return
    fault, name, n = spec.split(":")
    if path.name != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] != int(n):
        return
    f.truncate(f.tell() // 2)
    f.flush()
    os.fsync(f.fileno())
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if fault == "sigint":
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: Python raises KeyboardInterrupt at its next instruction
        return
    raise ValueError(f"SIDNET_FAULT={spec}: unknown fault {fault!r}; use kill, enospc or sigint")


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[IO[bytes]], None],
    *,
    mode: int = 0o644,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, then rename it over ``path``.

    ``mode``: mkstemp creates 0600 files; reports, configs and checkpoints are meant to be shared.
    ``before_replace``: called once the new content is safely on disk, just before the rename (keeps a previous
    generation, see :func:`sidnet.checkpoint.save_checkpoint`).
    An existing ``path`` that is not a regular file (FIFO, device, folder, symlink) is refused, never replaced.
    """
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            _inject_fault(path, f)
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        check_output_file(path)  # again: the write may have taken long
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is: without this a power cut can lose the new name.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files a killed writer left in ``folder`` (call only while holding the run lock)."""
    stale = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class OutputDirError(ValueError):
    """An output folder cannot be created or written; the message is one line with the fix."""


def ensure_writable_dir(folder: str | os.PathLike[str], *, fix: str) -> Path:
    """Create ``folder`` if needed and prove it writable with a probe file, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe."):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OutputDirError(f"output folder {folder} cannot be written ({reason}); {fix}") from e
    return folder


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints, engines and packages run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def created_for_this_run(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """If ``folder`` does not exist yet and the block fails (an error or Ctrl-C), remove it again when it is left
    empty: a refused command leaves the disk as it found it, not an empty output folder."""
    folder = Path(folder)
    fresh = []  # the folder and those of its parents that do not exist yet, deepest first
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            break
        fresh.append(p)
    try:
        yield folder
    except BaseException:
        for p in fresh:
            try:
                p.rmdir()  # only when empty
            except OSError:
                break
        raise


STAGING_PREFIX = ".partial-"


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh folder ``out_dir/.partial-*`` to write a whole artifact set into; on success its files move into
    ``out_dir`` (regular-file destinations only, one rename each), on any exception or Ctrl-C it is deleted, so
    ``out_dir`` holds the finished set or none of it (the previous set, if any, stays whole until the moves)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=STAGING_PREFIX))
    try:
        yield stage
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        for f in files:
            check_output_file(out_dir / f.relative_to(stage))
        for f in files:
            dest = out_dir / f.relative_to(stage)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
        _fsync_dir(out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

