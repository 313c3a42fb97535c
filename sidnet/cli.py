"""What every entry point (``train``, ``train.evaluate``, ``train.anchors``, ``export``, ``deploy``) does with an
exception: one ``error: ...`` line on stderr and exit status 1, never a traceback; ``-v`` re-raises instead.

Bad input surfaces as ``ValueError`` (``DataError``, ``CheckpointError``, ``ExportError``, ``ConfigError`` derive from
it) or ``OSError`` (missing, unwritable, full disk): their message is the line. Anything else is a bug of ours and is
named as one, with the hint to rerun with ``-v``.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from sidnet.safety import one_line

T = TypeVar("T")
EXIT_INTERRUPTED = 130
TRAIN_INTERRUPTED = "training interrupted; the run continues from its last complete epoch with resume=true"


def error_line(e: BaseException) -> str:
    """The ``error: ...`` line for ``e``."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        return f"error: no space left on device{where}; free space (files already written are intact) and rerun"
    if isinstance(e, PermissionError):
        return f"error: permission denied: {e.filename or e}; choose a folder you can write to"
    if isinstance(e, OSError) and e.filename and not str(e).startswith(str(e.filename)):
        return f"error: {e.strerror or e}: {e.filename}"
    if isinstance(e, (ValueError, OSError)):
        return f"error: {one_line(e)}"
    return f"error: internal error ({type(e).__name__}: {one_line(e)[:300]}); rerun with -v for the traceback"


def interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C that caused ``e``, if any: a ``KeyboardInterrupt`` arriving while a C extension initialises comes out
    as that extension's ``ImportError: initialization failed`` (pybind11 chains the interrupt as its cause)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def run_guarded(fn: Callable[[], T], *, verbose: bool, interrupted: str | Callable[[KeyboardInterrupt], str]) -> T:
    """Call ``fn()``; on an exception print one line and exit non-zero (``verbose``: let the traceback through).

    ``interrupted``: what Ctrl-C stopped and what it left, in the command's own words (or a function of the
    ``KeyboardInterrupt`` giving them)."""
    try:
        return fn()
    except SystemExit:
        raise
    except KeyboardInterrupt as e:
        if verbose:
            raise
        _say_interrupted(e, interrupted)
    except Exception as e:  # noqa: BLE001  (the one place that turns every failure into one line)
        if verbose:
            raise
        if (stop := interrupt_behind(e)) is not None:
            _say_interrupted(stop, interrupted)
        raise SystemExit(error_line(e)) from None  # Python prints it to stderr and exits with status 1


def _say_interrupted(e: KeyboardInterrupt, interrupted: str | Callable[[KeyboardInterrupt], str]) -> None:
    print(f"error: {interrupted(e) if callable(interrupted) else interrupted}", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED) from None


def pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``-v``/``--verbose`` from ``argv`` (for entry points whose other arguments are Hydra overrides)."""
    return pop_flag(argv, "-v", "--verbose")


def pop_flag(argv: list[str], *names: str) -> tuple[list[str], bool]:
    """Remove every spelling in ``names`` (e.g. ``-q``, ``--quiet``) from ``argv``; (the rest, whether present)."""
    rest = [a for a in argv if a not in names]
    return rest, len(rest) != len(argv)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line (exit 2) instead of usage text plus a message."""

    def error(self, message: str):  # type: ignore[override]
        raise SystemExit(f"error: {message} (see {self.prog} --help)")

    def add_verbose(self) -> OneLineParser:
        self.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
        return self


def flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` → ``[("a.b", 1)]`` (lists are values)."""
    if not isinstance(tree, dict):
        return [(prefix, tree)]
    out = []
    for k, v in tree.items():
        out += flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]
    return out


def config_help(*, usage: str, groups: dict[str, list[str]], chosen: dict[str, str | None], keys: dict[str, Any],
                examples: list[str], notes: str = "") -> str:  # fmt: skip
    """The ``--help`` of a Hydra entry point (as ``yolo help`` / Hydra's help template): config groups with their
    options (the default marked), then every key with its default, then examples."""
    lines = [usage.replace("``", ""), "", "Config groups (group=option; * = default):"]
    width = max(map(len, groups), default=0)
    for group, options in groups.items():
        marked = [f"{o}*" if o == chosen.get(group) else o for o in options]
        off = "" if chosen.get(group) else "  (off by default)"
        lines.append(f"  {group:<{width}}  {' | '.join(marked)}{off}")
    lines += ["", "Keys (key=value; defaults shown for the default groups):"]
    flat = flatten(keys)
    for key, value in [kv for kv in flat if "." not in kv[0]] + [kv for kv in flat if "." in kv[0]]:  # top level first
        lines.append(f"  {key}={value}")
    lines += ["", "Examples:", *(f"  {e}" for e in examples)]
    if notes:
        lines += ["", notes]
    return "\n".join(lines)
def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def unit_interval(text: str) -> float:
    """argparse type: a finite number in (0, 1] (confidence and IoU thresholds)."""
    v = _number(text, float)
    if not (math.isfinite(v) and 0 < v <= 1):
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]: use a threshold such as 0.3")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (frame counts, batch sizes)."""
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return v


def non_negative_int(text: str) -> int:
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return v


def positive_float(text: str) -> float:
    v = _number(text, float)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return v
